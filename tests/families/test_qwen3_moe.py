"""The qwen3_moe family passes every family check (routing, conversion, reload)."""

from family_checks import FamilyChecks


class TestQwen3Moe(FamilyChecks):
    model_type = "qwen3_moe"
