from datetime import UTC, datetime

import numpy as np
import pytest

from core.labs import CLIP, LAB_PANEL, lab_profile
from core.types import LabResult


def lab(loinc, value, unit, day=1, **kw):
    test = next(t for t in LAB_PANEL if t.loinc == loinc)
    return LabResult(
        loinc,
        test.name,
        value,
        unit,
        datetime(2020, 1, day, tzinfo=UTC),
        f"Observation/{day}",
        **kw,
    )


def index(loinc):
    return [t.loinc for t in LAB_PANEL].index(loinc)


def test_scaling_maps_reference_range_to_unit_interval():
    hb = next(t for t in LAB_PANEL if t.loinc == "718-7")
    low, high, mid = hb.low, hb.high, (hb.low + hb.high) / 2
    for value, expected in ((low, -1.0), (high, 1.0), (mid, 0.0)):
        profile = lab_profile([lab("718-7", value, "g/dL")])
        assert profile.vector[index("718-7")] == pytest.approx(expected)


def test_latest_value_wins_and_missing_is_explicit():
    profile = lab_profile([lab("718-7", 9.0, "g/dL", day=1), lab("718-7", 14.0, "g/dL", day=5)])
    assert profile.measured_count == 1
    assert profile.measured[index("718-7")]
    assert not profile.measured[index("777-3")]
    assert profile.vector[index("777-3")] == 0.0
    assert profile.abnormal == ()  # 14 g/dL is normal; the older 9 g/dL is superseded
    assert profile.vector.shape == (len(LAB_PANEL),)
    assert profile.vector.dtype == np.float32


def test_unit_mismatch_is_not_used():
    profile = lab_profile([lab("718-7", 140.0, "g/L")])
    assert profile.measured_count == 0


def test_abnormal_flags_and_clipping():
    profile = lab_profile([lab("777-3", 5000.0, "10*3/uL"), lab("718-7", 8.0, "g/dL")])
    assert profile.vector[index("777-3")] == CLIP
    assert set(profile.abnormal) == {("Platelets", "high"), ("Hemoglobin", "low")}


def test_source_reference_range_and_interpretation_take_precedence():
    own_range = lab("718-7", 11.0, "g/dL", reference_low=10.0, reference_high=12.0)
    profile = lab_profile([own_range])
    assert profile.vector[index("718-7")] == pytest.approx(0.0)
    assert profile.abnormal == ()
    flagged = lab("718-7", 14.0, "g/dL", interpretation="H")
    assert lab_profile([flagged]).abnormal == (("Hemoglobin", "high"),)


def test_unknown_tests_are_ignored():
    other = LabResult("9999-9", "Other", 1.0, "mg/dL", None, "Observation/x")
    assert lab_profile([other]).measured_count == 0
