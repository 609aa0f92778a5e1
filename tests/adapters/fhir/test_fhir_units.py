"""Unit normalisation for the lab panel: SI results become the panel's units, value and range."""

from __future__ import annotations

import pytest

from adapters.fhir.units import PANEL_UNITS, conversion, to_panel_unit
from core.labs import lab_profile
from core.types import LabResult


def _result(loinc: str, value: float, unit: str, low: float | None = None,
            high: float | None = None) -> LabResult:  # fmt: skip
    return LabResult(loinc, loinc, value, unit, None, "Observation/x", low, high)


@pytest.mark.parametrize(
    ("loinc", "value", "unit", "expected"),
    [
        ("718-7", 132.0, "g/L", 13.2),  # haemoglobin
        ("2339-0", 5.5, "mmol/L", 99.088),  # glucose, 180.16 g/mol
        ("2093-3", 5.0, "mmol/L", 193.35),  # cholesterol
        ("2571-8", 1.7, "mmol/L", 150.569),  # triglycerides
        ("38483-4", 88.42, "µmol/L", 1.0),  # creatinine
        ("6299-2", 5.0, "mmol/L", 14.005),  # urea -> urea nitrogen
        ("49765-1", 2.5, "mmol/L", 10.02),  # calcium
        ("6690-2", 7.2, "10^9/L", 7.2),  # leukocytes
        ("777-3", 250000.0, "/uL", 250.0),  # platelets
        ("789-8", 4.8, "10*12/L", 4.8),  # erythrocytes
        ("4544-3", 0.42, "L/L", 42.0),  # haematocrit
        ("2947-0", 140.0, "meq/L", 140.0),  # sodium
        ("4548-4", 48.0, "mmol/mol", 6.54304),  # HbA1c, IFCC -> NGSP
    ],
)
def test_si_units_are_converted_to_the_panel_unit(
    loinc: str, value: float, unit: str, expected: float
) -> None:
    converted = to_panel_unit(_result(loinc, value, unit))
    assert converted.unit == PANEL_UNITS[loinc]
    assert converted.value == pytest.approx(expected, rel=1e-6)


def test_the_reference_range_is_converted_with_the_value() -> None:
    converted = to_panel_unit(_result("38483-4", 100.0, "umol/L", 62.0, 106.0))
    assert (converted.value, converted.reference_low, converted.reference_high) == (
        pytest.approx(1.13097, rel=1e-5),
        pytest.approx(0.701199, rel=1e-5),
        pytest.approx(1.19882, rel=1e-5),
    )


def test_a_result_already_in_the_panel_unit_is_unchanged() -> None:
    result = _result("718-7", 13.123456789, "g/dL", 12.0, 17.5)
    assert to_panel_unit(result) == result


def test_an_unknown_unit_is_kept_unconverted_and_the_profile_leaves_it_out() -> None:
    odd = _result("2339-0", 1.0, "g", 0.7, 1.0)
    assert conversion("2339-0", "g") is None
    assert to_panel_unit(odd) == odd
    assert lab_profile([odd]).measured_count == 0
    assert lab_profile([to_panel_unit(_result("2339-0", 5.5, "mmol/L"))]).measured_count == 1


def test_a_test_outside_the_panel_is_left_alone() -> None:
    result = _result("1751-7", 42.0, "g/L")
    assert to_panel_unit(result) == result
