"""Table tests of the phi arithmetic, memberlist-style: inputs and expected outputs in rows."""

import math

import pytest

from redge.agent.detector_settings import ENTERPRISE, IOBT, DetectorSettings
from redge.agent.phi import phi, suspicion_elapsed_ms, threshold_deviations


def normal_cdf(x: float, mean: float, std: float) -> float:
    return 0.5 * (1.0 + math.erf((x - mean) / (std * math.sqrt(2.0))))


# (elapsed_ms, mean_ms, std_ms): 1 - 10^-phi must match the normal CDF, as in
# Akka's PhiAccrualFailureDetectorSpec (logistic approximation within 0.001).
CDF_ROWS = [
    (0.0, 0.0, 10.0),
    (6.1, 0.0, 10.0),
    (15.0, 0.0, 10.0),
    (20.0, 0.0, 10.0),
    (25.0, 0.0, 10.0),
    (35.0, 0.0, 10.0),
    (40.0, 0.0, 10.0),
    (-25.0, 0.0, 10.0),
    (120.0, 100.0, 20.0),
    (70.0, 100.0, 20.0),
]


@pytest.mark.parametrize(("elapsed_ms", "mean_ms", "std_ms"), CDF_ROWS)
def test_phi_matches_normal_cdf(elapsed_ms, mean_ms, std_ms):
    approximated = 1.0 - 10.0 ** -phi(elapsed_ms, mean_ms, std_ms)
    assert approximated == pytest.approx(normal_cdf(elapsed_ms, mean_ms, std_ms), abs=1e-3)


# (elapsed_ms, mean_ms, std_ms, expected phi), expected values from Akka's
# two-branch formula -log10(e / (1 + e)), e = exp(-y (1.5976 + 0.070566 y^2)).
PHI_ROWS = [
    (1000.0, 1000.0, 100.0, math.log10(2.0)),  # at the mean: P(later) = 1/2
    (1100.0, 1000.0, 100.0, 0.7995),
    (1200.0, 1000.0, 100.0, 1.6428),
    (1300.0, 1000.0, 100.0, 2.9095),
    (1500.0, 1000.0, 100.0, 7.2999),
    (1522.6, 1000.0, 100.0, 8.0),  # ~5.226 standard deviations: the default threshold
    (500.0, 1000.0, 100.0, 0.0),
]


@pytest.mark.parametrize(("elapsed_ms", "mean_ms", "std_ms", "expected"), PHI_ROWS)
def test_phi_table(elapsed_ms, mean_ms, std_ms, expected):
    assert phi(elapsed_ms, mean_ms, std_ms) == pytest.approx(expected, abs=2e-3)


def test_phi_of_a_very_long_silence_is_large_and_finite():
    value = phi(10_000_000.0, 20.0, 1.0)
    assert math.isfinite(value) and value > 1e9


# (threshold, deviations): how far past the mean each threshold lies.
DEVIATION_ROWS = [(1.0, 1.2822), (3.0, 3.0589), (8.0, 5.2260), (12.0, 6.2921)]


@pytest.mark.parametrize(("threshold", "deviations"), DEVIATION_ROWS)
def test_threshold_deviations_inverts_phi(threshold, deviations):
    y = threshold_deviations(threshold)
    assert y == pytest.approx(deviations, abs=1e-3)
    assert phi(y, 0.0, 1.0) == pytest.approx(threshold, abs=1e-9)


# (settings, nominal silence before suspicion on a steady, loss-free link)
PROFILE_ROWS = [(ENTERPRISE, 96.13), (IOBT, 404.52)]


@pytest.mark.parametrize(("settings", "nominal_ms"), PROFILE_ROWS, ids=lambda v: getattr(v, "name", v))
def test_profile_nominal_suspicion(settings, nominal_ms):
    assert settings.nominal_suspicion_ms == pytest.approx(nominal_ms, abs=0.01)
    assert settings.nominal_suspicion_ms == pytest.approx(
        suspicion_elapsed_ms(
            settings.phi_threshold,
            settings.heartbeat_interval_ms + settings.acceptable_heartbeat_pause_ms,
            settings.min_std_deviation_ms,
        )
    )


def test_profiles_by_name():
    """One registry (agent/profile.py): a profile's detector part is these settings."""
    from redge.agent.profile import get_profile

    assert get_profile("enterprise").detector is ENTERPRISE
    assert get_profile("iobt").detector is IOBT
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("lan")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("heartbeat_interval_ms", 0.0),
        ("phi_threshold", -1.0),
        ("window_size", 1),
        ("min_std_deviation_ms", 0.0),
        ("acceptable_heartbeat_pause_ms", -5.0),
        ("recovery_heartbeat_count", 0),
        ("stall_memory_ms", -1.0),
        ("stall_allowance_factor", 11.0),
        ("acceptable_heartbeat_pause_ms_max", 10.0),
    ],
)
def test_settings_reject_nonsense(field, value):
    fields = {f: getattr(ENTERPRISE, f) for f in DetectorSettings.__dataclass_fields__}
    fields[field] = value
    with pytest.raises(ValueError):
        DetectorSettings(**fields)
