"""Phi accrual arithmetic (Hayashibara et al., as in Akka): how unlikely a silence is, given
the recent distribution of heartbeat inter-arrival times. Pure."""

from __future__ import annotations

import functools
import math

# ---------------------------------------------------------------------------
# phi arithmetic

# Logistic approximation of the normal CDF used by Akka's PhiAccrualFailureDetector
# (error below 0.0002 against the exact CDF); it is cheap and invertible.
_LOGISTIC_LINEAR = 1.5976
_LOGISTIC_CUBIC = 0.070566
_LN_10 = math.log(10.0)


def _logistic_exponent(y: float) -> float:
    return y * (_LOGISTIC_LINEAR + _LOGISTIC_CUBIC * y * y)


def phi(elapsed_ms: float, mean_ms: float, std_deviation_ms: float) -> float:
    """-log10 of the probability that a heartbeat comes later than `elapsed_ms`.

    With P(later) = 1 / (1 + e^z) (Akka's logistic approximation), phi is
    log10(1 + e^z), computed as a stable softplus so a long silence gives a
    large finite phi instead of an overflow or log(0).
    """
    assert std_deviation_ms > 0.0, "std deviation must be positive"
    y = (elapsed_ms - mean_ms) / std_deviation_ms
    z = _logistic_exponent(y)
    if z > 0.0:
        softplus = z + math.log1p(math.exp(-z))
    else:
        softplus = math.log1p(math.exp(z))
    return softplus / _LN_10


@functools.lru_cache(maxsize=64)
def threshold_deviations(phi_threshold: float) -> float:
    """How many standard deviations past the mean phi reaches `phi_threshold`.

    Inverts phi: log10(1 + e^z) = threshold, then z(y) = y (a + b y^2) by
    bisection (z is strictly increasing in y). Lets the shell sleep until the
    exact instant a silent node would be suspected instead of polling.
    """
    assert phi_threshold > 0.0
    z_target = math.log(math.expm1(phi_threshold * _LN_10))
    low, high = -100.0, 100.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if _logistic_exponent(middle) < z_target:
            low = middle
        else:
            high = middle
    return high


def suspicion_elapsed_ms(phi_threshold: float, mean_ms: float, std_deviation_ms: float) -> float:
    """Silence after which phi(elapsed, mean, std) reaches the threshold."""
    return mean_ms + threshold_deviations(phi_threshold) * std_deviation_ms
