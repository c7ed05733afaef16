"""The mixtral family passes every family check (routing, conversion, reload)."""

from family_checks import FamilyChecks


class TestMixtral(FamilyChecks):
    model_type = "mixtral"
