"""Intervals and paired differences of per-item scores, stratified by skill.

The mean skill accuracy weighs every skill equally, so its estimates are stratified: the mean of
the per-skill means, with standard error ``sqrt(sum_s var_s / n_s) / S`` over the S skills
(``var_s`` the sample variance, ddof 1, of skill s's n_s scores; about p(1 - p) for 0/1 scores).
Two models scored on the same items are compared by the per-item differences (a paired test):
most items are right or wrong for both, so the difference's standard error is far smaller than
that of two independent accuracies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Z_95 = 1.959963984540054
"""Two-sided 95 % quantile of the standard normal."""

DECISIVE_Z = 2.0
"""A paired difference more than this many standard errors from 0 is decisive."""


@dataclass(frozen=True)
class Estimate:
    """A stratified mean and its standard error (same units as the scores)."""

    mean: float
    standard_error: float

    @property
    def low(self) -> float:
        """Lower end of the normal-approximation 95 % interval."""
        return self.mean - Z_95 * self.standard_error

    @property
    def high(self) -> float:
        """Upper end of the normal-approximation 95 % interval."""
        return self.mean + Z_95 * self.standard_error

    @property
    def z(self) -> float:
        """The mean in standard errors (0 when both are 0; +-inf for a nonzero mean without spread)."""
        if self.standard_error > 0:
            return self.mean / self.standard_error
        return 0.0 if self.mean == 0 else math.copysign(math.inf, self.mean)


def stratified_mean(scores: Mapping[str, Sequence[float]]) -> Estimate:
    """Mean over strata (skills) of each stratum's mean score, with its standard error.

    Args:
        scores: stratum -> its items' scores (0/1 correctness, or paired differences in -1..1).

    Raises:
        ValueError: no strata, or an empty stratum.
    """
    if not scores or any(len(values) == 0 for values in scores.values()):
        raise ValueError("every stratum needs at least one score")
    means, variance = [], 0.0
    for values in scores.values():
        n = len(values)
        mean = sum(values) / n
        means.append(mean)
        if n > 1:
            variance += sum((v - mean) ** 2 for v in values) / (n - 1) / n
    strata = len(scores)
    return Estimate(sum(means) / strata, math.sqrt(variance) / strata)


def paired_difference(first: Mapping[str, Sequence[float]], second: Mapping[str, Sequence[float]]) -> Estimate:
    """``first - second`` on the same items (same strata, same order): the stratified mean of the
    per-item differences and its paired standard error.

    Raises:
        ValueError: the two do not hold the same strata and item counts.
    """
    if first.keys() != second.keys() or any(len(first[s]) != len(second[s]) for s in first):
        raise ValueError("a paired difference needs both models scored on the same items")
    return stratified_mean({s: [a - b for a, b in zip(first[s], second[s], strict=True)] for s in first})
