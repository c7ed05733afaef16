"""The olmoe family passes every family check (routing, conversion, reload)."""

from family_checks import FamilyChecks


class TestOlmoe(FamilyChecks):
    model_type = "olmoe"
