"""What a draft chest imaging order adds to a brief: the reason it gives, and how to say so.

An ``order-select`` or ``order-sign`` call tells the service one thing about the patient that
``patient-view`` does not: why the clinician is ordering a chest X-ray or CT ("cough and fever",
"suspected pneumonia"). The advisor uses that reason twice, as a case-search leg matched against
the findings recorded in past cases and as the literature search text; this module picks the
reasons out of the orders and words, for the clinician, what the search was built from.

Several orders in one call (order-sign signs a whole basket; order-select may select more than
one) make one brief: each distinct reason is searched, and the literature query names them all.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.types import ImagingOrder, LabProfile

__all__ = ["no_reason_note", "order_reasons", "orders_label", "reason_basis"]

_MODALITY = {"XR": "chest X-ray", "CT": "chest CT"}


def order_reasons(orders: Sequence[ImagingOrder]) -> tuple[str, ...]:
    """The distinct reasons the orders give, in the orders' order.

    Blank reasons are left out; reasons that differ only in case or spacing count once.

    Examples:
        >>> xr = ImagingOrder("ServiceRequest/1", "XR", "Cough and fever")
        >>> ct = ImagingOrder("ServiceRequest/2", "CT", "cough  and FEVER")
        >>> order_reasons([xr, ct, ImagingOrder(None, "XR")])
        ('Cough and fever',)
    """
    reasons: dict[str, str] = {}
    for order in orders:
        text = " ".join((order.reason or "").split())
        if text:
            reasons.setdefault(text.casefold(), text)
    return tuple(reasons.values())


def orders_label(orders: Sequence[ImagingOrder]) -> str:
    """The orders in words, for the clinician.

    Examples:
        >>> orders_label([ImagingOrder(None, "XR")])
        'the chest X-ray order'
        >>> orders_label([ImagingOrder(None, "CT"), ImagingOrder(None, "XR")])
        'the chest CT and chest X-ray orders'
    """
    kinds = list(dict.fromkeys(_MODALITY[order.modality] for order in orders))
    plural = "s" if len(orders) > 1 else ""
    return f"the {' and '.join(kinds)} order{plural}"


def reason_basis(orders: Sequence[ImagingOrder], labs: LabProfile | None) -> str:
    """What an order's literature query was built from (:attr:`core.types.Brief.literature_basis`).

    Args:
        orders: the orders whose reasons the query names.
        labs: the patient's lab profile; its abnormal results are part of the query.

    Examples:
        >>> reason_basis([ImagingOrder(None, "XR", "Cough")], None)
        'the reason given for the chest X-ray order'
    """
    basis = f"the reason given for {orders_label(orders)}"
    if labs is not None and labs.abnormal:
        basis += " and this patient's abnormal laboratory results"
    return basis


def no_reason_note(orders: Sequence[ImagingOrder]) -> str:
    """The omission shown when no order gives a reason: cases are then found by image and labs
    alone, and literature from their findings, as for ``patient-view``.

    Examples:
        >>> no_reason_note([ImagingOrder(None, "CT")])
        'no reason given for the chest CT order: cases and literature found without one'
    """
    return f"no reason given for {orders_label(orders)}: cases and literature found without one"
