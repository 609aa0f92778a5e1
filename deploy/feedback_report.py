"""``medirag feedback report``: the card ledger's evaluation summary, as tables or JSON.

Kept apart from the command itself so that the command stays a few lines in ``deploy/cli.py``.
The report holds counts, codes and source identifiers only (see :mod:`core.feedback`); user
comments never reach it.
"""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from core.feedback import FeedbackReport

__all__ = ["print_report"]


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.0%}"


def print_report(report: FeedbackReport, *, as_json: bool, out: Console) -> None:
    """Print the report: three tables (outcomes, override reasons, sources), or JSON.

    Args:
        report: from :meth:`adapters.store.ledger.PgCardLedger.report`.
        as_json: print only :meth:`FeedbackReport.to_json`, indented.
        out: where to print.
    """
    if as_json:
        out.out(json.dumps(report.to_json(), indent=2), highlight=False)
        return
    if not report.kinds:
        out.print("No cards issued yet: the ledger is empty.")
        return
    outcomes = Table(title="Cards and their latest feedback, by service and kind")
    outcomes.add_column("service")
    outcomes.add_column("kind")
    for column in ("issued", "with feedback", "reports", "accepted", "overridden"):
        outcomes.add_column(column, justify="right")
    for k in report.kinds:
        outcomes.add_row(
            k.service_id,
            k.kind,
            str(k.issued),
            f"{k.with_feedback} ({_percent(k.feedback_rate)})",
            str(k.feedback),
            f"{k.accepted} ({_percent(k.accepted_rate)})",
            f"{k.overridden} ({_percent(k.overridden_rate)})",
        )
    out.print(outcomes)
    reasons = Table(title="Override reasons (latest feedback of overridden cards)")
    for column in ("service", "kind", "system", "code", "display", "cards"):
        reasons.add_column(column, justify="right" if column == "cards" else "left")
    for k in report.kinds:
        for r in k.reasons:
            reasons.add_row(
                k.service_id,
                k.kind,
                r.system or "(no coded reason)",
                r.code or "-",
                r.display or "-",
                str(r.cards),
            )
    if reasons.row_count:
        out.print(reasons)
    sources = Table(title="Sources shown, and how the cards showing them fared")
    sources.add_column("service")
    sources.add_column("source")
    for column in ("cards", "accepted", "overridden", "accepted share"):
        sources.add_column(column, justify="right")
    for s in report.sources:
        sources.add_row(
            s.service_id,
            s.source,
            str(s.issued),
            str(s.accepted),
            str(s.overridden),
            _percent(s.accepted_rate),
        )
    if sources.row_count:
        out.print(sources)
