"""The glm4_moe_lite family passes every family check (routing, conversion, reload)."""

from family_checks import FamilyChecks


class TestGlm4MoeLite(FamilyChecks):
    model_type = "glm4_moe_lite"
