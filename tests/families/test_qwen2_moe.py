"""The qwen2_moe family passes every family check (routing, conversion, reload)."""

from family_checks import FamilyChecks


class TestQwen2Moe(FamilyChecks):
    model_type = "qwen2_moe"
