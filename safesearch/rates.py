"""How far a rate measured on n items can be trusted: one-sided Wilson score bounds.

Every score a study optimises or constrains is a rate over judged items (safety, over-refusal,
accuracy), and a trial scores few of them (40 benign requests in the toy study). A rate of 0.05 on 40
items is compatible with a true rate of 0.12, which is why a bound met on the search split can break on
holdout. These bounds say by how much, and are what a constraint's ``confidence`` and early stopping
test against.

Wilson's interval rather than the normal approximation: it stays inside [0, 1] and is not degenerate at
a rate of 0 or 1, which is exactly where a refusal rate lives.
"""

from __future__ import annotations

import math
from statistics import NormalDist


def _z(confidence: float) -> float:
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    return NormalDist().inv_cdf(confidence)


def _wilson(rate: float, n: float, z: float, sign: float) -> float:
    if n <= 0 or math.isnan(rate):
        return math.nan
    if (sign > 0 and rate >= 1.0) or (sign < 0 and rate <= 0.0):
        return min(1.0, max(0.0, rate))  # exactly, where the formula leaves a rounding error
    z2 = z * z
    centre = rate + z2 / (2 * n)
    spread = z * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n))
    return min(1.0, max(0.0, (centre + sign * spread) / (1 + z2 / n)))


def upper_bound(rate: float, n: float, confidence: float) -> float:
    """The one-sided Wilson upper bound: the true rate is below it with probability ``confidence``
    (``nan`` when nothing was judged)."""
    return _wilson(rate, n, _z(confidence), +1.0)


def lower_bound(rate: float, n: float, confidence: float) -> float:
    """The one-sided Wilson lower bound (see :func:`upper_bound`)."""
    return _wilson(rate, n, _z(confidence), -1.0)
