"""The SGLang tests' guard: they run wherever the `sglang` extra is installed (always in CI)."""

import importlib.util
import os

import pytest

HAVE_SGLANG = importlib.util.find_spec("sglang") is not None


def sglang_marks() -> list[pytest.MarkDecorator]:
    """Module marks: skip without SGLang, except in CI, where its absence fails the module."""
    if not HAVE_SGLANG and os.environ.get("CI"):
        pytest.fail("the sglang extra is missing: .ci/run installs it", pytrace=False)
    return [pytest.mark.sglang, pytest.mark.skipif(not HAVE_SGLANG, reason="sglang extra not installed")]


def sglang_test(test):
    """Decorate one test with :func:`sglang_marks` and ``slow`` (it starts SGLang's engine)."""
    for mark in [*sglang_marks(), pytest.mark.slow]:
        test = mark(test)
    return test
