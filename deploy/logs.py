"""Structured logging: one JSON object per line, with the fields passed in ``extra``.

Log calls across the project pass facts as ``extra`` fields (status, timings, reasons), never
tokens or patient identifiers; this formatter keeps them as fields rather than text.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Literal

__all__ = ["configure_logging"]

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        return json.dumps(entry, default=str)


def configure_logging(fmt: Literal["json", "text"] = "json", level: int = logging.INFO) -> None:
    """Send logs to stderr as JSON lines (or plain text), replacing earlier handlers."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's access log would print each request's path and client address as text; the
    # service logs each request itself. pgserver narrates every pg_ctl call at INFO.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("pgserver").setLevel(max(level, logging.WARNING))
