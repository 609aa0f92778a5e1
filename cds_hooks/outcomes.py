"""Error bodies: FHIR OperationOutcome resources, never stack traces.

The diagnostics say what was wrong with the request in terms of its structure (which field,
which rule); they never echo values from the request, which may hold patient data.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse

__all__ = ["IssueCode", "operation_outcome"]

IssueCode = Literal[
    "invalid",
    "not-found",
    "not-supported",
    "processing",
    "exception",
    "too-costly",
    "conflict",
    "timeout",
]
"""The FHIR IssueType codes the service answers with."""


def operation_outcome(status: int, code: IssueCode, diagnostics: str) -> JSONResponse:
    """A JSON response holding a one-issue OperationOutcome.

    Examples:
        >>> operation_outcome(404, "not-found", "no such service").status_code
        404
    """
    body: dict[str, Any] = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }
    return JSONResponse(body, status_code=status, media_type="application/fhir+json")
