"""The deepseek_v3 family passes every family check (routing, conversion, reload)."""

from family_checks import FamilyChecks


class TestDeepseekV3(FamilyChecks):
    model_type = "deepseek_v3"
