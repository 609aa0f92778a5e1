"""Lab profiles: a patient's laboratory results as a vector comparable across patients.

The profile covers a fixed panel of common tests (complete blood count, lipid panel, basic
metabolic panel, HbA1c). Each test contributes its latest value, scaled by its reference range
so that the lower bound maps to -1 and the upper bound to +1: a haemoglobin of 10 g/dL and a
platelet count of 100 x10^3/uL are then both "how far outside normal" on one scale. Values are
clipped to ``[-CLIP, CLIP]`` so one extreme result cannot dominate the distance.

A test the patient has no result for is 0 in the vector (the middle of the reference range) and
``False`` in ``measured``: the lab search only compares patients with at least a minimum number of
measured tests, and says so, rather than treating "not measured" as "normal" silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from core.types import LabProfile, LabResult

__all__ = ["CLIP", "LAB_PANEL", "LabTest", "lab_profile"]

CLIP = 5.0
"""Scaled values are clipped to ``[-CLIP, CLIP]``."""


@dataclass(frozen=True, slots=True)
class LabTest:
    """One test of the panel with its adult reference range in its UCUM unit."""

    loinc: str
    name: str
    unit: str
    low: float
    high: float


# Adult reference intervals from common clinical laboratory references (they vary by laboratory;
# a result's own referenceRange, when present, takes precedence). Units are the UCUM codes that
# US laboratories (and Synthea) report these tests in.
LAB_PANEL: tuple[LabTest, ...] = (
    LabTest("6690-2", "Leukocytes", "10*3/uL", 4.5, 11.0),
    LabTest("789-8", "Erythrocytes", "10*6/uL", 4.2, 5.9),
    LabTest("718-7", "Hemoglobin", "g/dL", 12.0, 17.5),
    LabTest("4544-3", "Hematocrit", "%", 36.0, 50.0),
    LabTest("787-2", "MCV", "fL", 80.0, 100.0),
    LabTest("785-6", "MCH", "pg", 27.0, 33.0),
    LabTest("786-4", "MCHC", "g/dL", 32.0, 36.0),
    LabTest("21000-5", "RDW", "fL", 39.0, 46.0),
    LabTest("777-3", "Platelets", "10*3/uL", 150.0, 400.0),
    LabTest("2093-3", "Total cholesterol", "mg/dL", 125.0, 200.0),
    LabTest("2571-8", "Triglycerides", "mg/dL", 40.0, 150.0),
    LabTest("18262-6", "LDL cholesterol", "mg/dL", 50.0, 130.0),
    LabTest("2085-9", "HDL cholesterol", "mg/dL", 40.0, 60.0),
    LabTest("33914-3", "eGFR", "mL/min/{1.73_m2}", 60.0, 120.0),
    LabTest("2339-0", "Glucose", "mg/dL", 70.0, 100.0),
    LabTest("6299-2", "Urea nitrogen", "mg/dL", 7.0, 20.0),
    LabTest("38483-4", "Creatinine", "mg/dL", 0.6, 1.3),
    LabTest("2947-0", "Sodium", "mmol/L", 135.0, 145.0),
    LabTest("6298-4", "Potassium", "mmol/L", 3.5, 5.1),
    LabTest("2069-3", "Chloride", "mmol/L", 98.0, 107.0),
    LabTest("20565-8", "Carbon dioxide", "mmol/L", 22.0, 29.0),
    LabTest("49765-1", "Calcium", "mg/dL", 8.5, 10.5),
    LabTest("4548-4", "Hemoglobin A1c", "%", 4.0, 5.6),
)

_EARLIEST = datetime.min.replace(tzinfo=UTC)


def _when(result: LabResult) -> datetime:
    if result.effective is None:
        return _EARLIEST
    if result.effective.tzinfo is None:
        return result.effective.replace(tzinfo=UTC)
    return result.effective


_LOW_CODES = frozenset({"L", "LL", "LU", "<"})
_HIGH_CODES = frozenset({"H", "HH", "HU", ">"})


def _flag(result: LabResult, low: float, high: float) -> str | None:
    """``"low"``, ``"high"`` or ``None``: the source's interpretation if given, else the range."""
    code = result.interpretation
    if code is not None:
        return "low" if code in _LOW_CODES else "high" if code in _HIGH_CODES else None
    return "low" if result.value < low else "high" if result.value > high else None


def lab_profile(results: Iterable[LabResult], panel: tuple[LabTest, ...] = LAB_PANEL) -> LabProfile:
    """Build the lab profile of one patient.

    For each test of ``panel`` the most recent result in the panel's unit is used. A result in
    another unit is ignored (unit conversion belongs to the adapter that reads the source); a
    result's own reference range replaces the panel's when both bounds are given.

    Args:
        results: the patient's laboratory results, in any order.
        panel: the tests that make up the vector.

    Returns:
        The profile; ``abnormal`` lists measured tests outside their range.

    Examples:
        >>> from core.types import LabResult
        >>> hb = LabResult("718-7", "Hemoglobin", 9.0, "g/dL", None, "Observation/1")
        >>> p = lab_profile([hb])
        >>> p.measured_count, p.abnormal
        (1, (('Hemoglobin', 'low'),))
    """
    latest: dict[str, LabResult] = {}
    units = {test.loinc: test.unit for test in panel}
    for result in results:
        if units.get(result.loinc) != result.unit:
            continue
        current = latest.get(result.loinc)
        if current is None or _when(result) >= _when(current):
            latest[result.loinc] = result

    vector = np.zeros(len(panel), dtype=np.float32)
    measured: list[bool] = []
    abnormal: list[tuple[str, str]] = []
    for i, test in enumerate(panel):
        found = latest.get(test.loinc)
        measured.append(found is not None)
        if found is None:
            continue
        result = found
        low, high = test.low, test.high
        if result.reference_low is not None and result.reference_high is not None:
            low, high = result.reference_low, result.reference_high
        mid, half = (low + high) / 2.0, (high - low) / 2.0
        vector[i] = float(np.clip((result.value - mid) / half, -CLIP, CLIP))
        flag = _flag(result, low, high)
        if flag is not None:
            abnormal.append((test.name, flag))
    return LabProfile(vector=vector, measured=tuple(measured), abnormal=tuple(abnormal))
