"""Unit normalisation for the laboratory panel: results in SI or other units, in the panel's unit.

:data:`core.labs.LAB_PANEL` compares each test in one unit (the US conventional UCUM units
Synthea writes), and ignores a result in any other. Laboratories outside the US report many of
the same tests in SI units; this module converts them, value and reference range alike, so that
a glucose of 5.5 mmol/L counts as the 99 mg/dL it is.

Choices a reader should know:

* Only conversions that are exact or fixed by molar mass are made (the factors below, with their
  basis); a result in a unit not listed for its test is kept as it came, unconverted. It stays in
  the record (it is shown and attributed), and the lab profile leaves it out, as it says it does.
* Units are matched on their UCUM code, and on the unit text when the quantity is not UCUM,
  after folding case, ``µ``/``μ`` to ``u``, ``^`` to ``*`` and dropping spaces
  (``"10^9/L"`` is ``10*9/L``, ``"µmol/L"`` is ``umol/L``).
* HbA1c in IFCC units (mmol/mol) is converted with the IFCC-NGSP master equation, an affine
  map; everything else is a factor.

Factors (molar masses from the IUPAC atomic weights; equivalences from the UCUM definitions):

==========================  ======================  ==========================================
test (LOINC)                from                    factor and basis
==========================  ======================  ==========================================
haemoglobin 718-7, MCHC     g/L                     x 0.1 (1 dL = 0.1 L)
haemoglobin 718-7           mmol/L (Fe, monomer)    x 1.6114 (16.114 g/mol per Hb monomer /10)
glucose 2339-0              mmol/L                  x 18.016 (C6H12O6, 180.16 g/mol)
cholesterol 2093-3, LDL,    mmol/L                  x 38.67 (cholesterol, 386.65 g/mol)
HDL
triglycerides 2571-8        mmol/L                  x 88.57 (as triolein, 885.7 g/mol)
creatinine 38483-4          umol/L                  / 88.42 (C4H7N3O, 113.12 g/mol)
urea nitrogen 6299-2        mmol/L (urea)           x 2.801 (2 N per urea, 2 x 14.007 g/mol)
calcium 49765-1             mmol/L                  x 4.008 (Ca, 40.078 g/mol)
leukocytes, platelets       10*9/L, 10*3/mm3, /uL   x 1, x 1, / 1000
erythrocytes 789-8          10*12/L, 10*6/mm3, /uL  x 1, x 1, / 10^6
haematocrit 4544-3          L/L, 1 (a fraction)     x 100
sodium, potassium, ...      meq/L                   x 1 (monovalent ions)
HbA1c 4548-4                mmol/mol (IFCC)         % = 0.09148 x IFCC + 2.152 (NGSP master eq.)
==========================  ======================  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from core.labs import LAB_PANEL
from core.types import LabResult

__all__ = ["PANEL_UNITS", "Conversion", "conversion", "normalise_unit", "to_panel_unit"]

PANEL_UNITS: dict[str, str] = {test.loinc: test.unit for test in LAB_PANEL}
"""The unit each panel test is compared in, by LOINC code."""


@dataclass(frozen=True, slots=True)
class Conversion:
    """``panel value = factor x value + offset``."""

    factor: float
    offset: float = 0.0

    def apply(self, value: float) -> float:
        """The value in the panel's unit (the identity leaves it exactly as it was; a real
        conversion is rounded to 6 significant digits, more than any laboratory reports)."""
        if self.factor == 1.0 and self.offset == 0.0:
            return value
        return float(f"{self.factor * value + self.offset:.6g}")


_SAME = Conversion(1.0)
_CBC_COUNT = {"10*9/l": _SAME, "10*3/mm3": _SAME, "/ul": Conversion(1e-3), "k/ul": _SAME}
_LIPID = {"mmol/l": Conversion(38.67)}
_MONOVALENT = {"meq/l": _SAME}

_FROM: dict[str, dict[str, Conversion]] = {
    "6690-2": _CBC_COUNT,
    "777-3": _CBC_COUNT,
    "789-8": {"10*12/l": _SAME, "10*6/mm3": _SAME, "/ul": Conversion(1e-6), "m/ul": _SAME},
    "718-7": {"g/l": Conversion(0.1), "mmol/l": Conversion(1.6114)},
    "786-4": {"g/l": Conversion(0.1)},
    "4544-3": {"l/l": Conversion(100.0), "1": Conversion(100.0)},
    "787-2": {"um3": _SAME},
    "2093-3": _LIPID,
    "18262-6": _LIPID,
    "2085-9": _LIPID,
    "2571-8": {"mmol/l": Conversion(88.57)},
    "2339-0": {"mmol/l": Conversion(18.016)},
    "38483-4": {"umol/l": Conversion(1 / 88.42)},
    "6299-2": {"mmol/l": Conversion(2.801)},
    "49765-1": {"mmol/l": Conversion(4.008)},
    "2947-0": _MONOVALENT,
    "6298-4": _MONOVALENT,
    "2069-3": _MONOVALENT,
    "20565-8": _MONOVALENT,
    "4548-4": {"mmol/mol": Conversion(0.09148, 2.152)},
}


def normalise_unit(unit: str) -> str:
    """The comparison key of a unit: case folded, ``µ`` as ``u``, ``^`` as ``*``, no spaces.

    Examples:
        >>> normalise_unit("µmol/L"), normalise_unit("10^9 / L")
        ('umol/l', '10*9/l')
    """
    return unit.replace("µ", "u").replace("μ", "u").replace("^", "*").replace(" ", "").lower()


def conversion(loinc: str, unit: str) -> Conversion | None:
    """How a value of test ``loinc`` in ``unit`` becomes the panel's unit.

    Returns:
        The identity for the panel's own unit, the conversion for a listed unit, ``None`` for
        any other unit or a test outside the panel.

    Examples:
        >>> conversion("2339-0", "mmol/L")
        Conversion(factor=18.016, offset=0.0)
        >>> conversion("2339-0", "mg/dL")
        Conversion(factor=1.0, offset=0.0)
        >>> conversion("2339-0", "g") is None
        True
    """
    target = PANEL_UNITS.get(loinc)
    if target is None:
        return None
    key = normalise_unit(unit)
    if key == normalise_unit(target):
        return _SAME
    return _FROM.get(loinc, {}).get(key)


def to_panel_unit(result: LabResult, *, bound_units: tuple[str, str] | None = None) -> LabResult:
    """The result in its panel test's unit, reference range included.

    Args:
        result: a result as the source recorded it.
        bound_units: the units of its reference range's low and high bounds, when they may
            differ from the value's; ``None`` when they are in the value's unit. A bound that
            cannot be brought to the result's final unit is dropped.

    Returns:
        The result in the panel's unit (a converted number rounded to 6 significant digits,
        more than any laboratory reports), or in its own unit when its test is not in the panel
        or its unit is not one this module converts.

    Examples:
        >>> glucose = LabResult("2339-0", "Glucose", 5.5, "mmol/L", None, "Observation/g",
        ...                     reference_low=3.9, reference_high=5.6)
        >>> converted = to_panel_unit(glucose)
        >>> converted.value, converted.unit, converted.reference_low
        (99.088, 'mg/dL', 70.2624)
    """
    low_unit, high_unit = bound_units or (result.unit, result.unit)
    value_conversion = conversion(result.loinc, result.unit)
    if value_conversion is None:
        own = normalise_unit(result.unit)
        return replace(
            result,
            reference_low=result.reference_low if normalise_unit(low_unit) == own else None,
            reference_high=result.reference_high if normalise_unit(high_unit) == own else None,
        )

    def bound(value: float | None, unit: str) -> float | None:
        found = conversion(result.loinc, unit)
        return None if value is None or found is None else found.apply(value)

    return replace(
        result,
        value=value_conversion.apply(result.value),
        unit=PANEL_UNITS[result.loinc],
        reference_low=bound(result.reference_low, low_unit),
        reference_high=bound(result.reference_high, high_unit),
    )
