"""The ``medirag`` command.

* ``medirag serve``: the CDS Hooks service, configured by ``MEDIRAG_*`` variables.
* ``medirag demo``: the whole path end to end on the embedded defaults (see deploy/demo.py).
* ``medirag feedback report``: what clinicians did with the cards issued (see
  deploy/feedback_report.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated

import typer
import uvicorn
from rich.console import Console

from adapters.store.schema import IndexModelMismatch
from core.errors import SourceUnavailable
from core.feedback import FeedbackReport
from deploy.default_models import ExportUnavailable
from deploy.demo import missing_shared_data, print_result, run_demo
from deploy.feedback_report import print_report
from deploy.logs import configure_logging
from deploy.server import server_config
from deploy.settings import Settings
from deploy.wiring import (
    ConfigurationError,
    app_for,
    build_runtime,
    open_components,
    open_ledger,
    trusted_clients,
)

__all__ = ["app"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="MediRAG CDS: similar cases and literature over CDS Hooks. Research software, "
    "not a medical device.",
)
_err = Console(stderr=True)

# What a user can fix: said in one line, exit status 2, no traceback.
_USER_ERRORS = (ConfigurationError, ExportUnavailable, IndexModelMismatch, SourceUnavailable)


def _fail(error: Exception) -> typer.Exit:
    _err.print(f"[red]error:[/red] {error}")
    return typer.Exit(2)


@app.command()
def serve(
    insecure_dev: Annotated[
        bool,
        typer.Option(
            "--insecure-dev",
            help="Accept calls without a JWT (local development only; refused in production).",
        ),
    ] = False,
) -> None:
    """Run the CDS Hooks service."""
    settings = Settings()
    configure_logging(settings.log_format)

    async def run() -> None:
        clients = trusted_clients(settings, insecure_dev=insecure_dev)
        async with open_components(settings) as components:
            runtime = build_runtime(components, settings, clients)
            if clients is None:
                logging.getLogger(__name__).warning("serving WITHOUT authentication")
            await uvicorn.Server(server_config(app_for(runtime, settings), settings)).serve()

    try:
        asyncio.run(run())
    except _USER_ERRORS as error:
        raise _fail(error) from None


@app.command()
def demo(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print only the CDS Hooks response JSON on stdout.")
    ] = False,
    patient: Annotated[
        str | None, typer.Option(help="Synthea Patient.id to ask about (default: chosen).")
    ] = None,
) -> None:
    """Build, index, serve and call the service once, on the embedded defaults."""
    started = time.perf_counter()
    settings = Settings()
    configure_logging("text", level=logging.WARNING)
    missing = missing_shared_data(settings.shared_data)
    if missing:
        _err.print("[red]The demo needs the shared datasets, and these are missing:[/red]")
        for line in missing:
            _err.print(f"  - {line}")
        _err.print(
            "Put the project's shared data folder beside the clone (../shared/data), or point "
            "MEDIRAG_SHARED_DATA at it. It holds public datasets (Synthea, NIH ChestX-ray14, "
            "PubMedQA); its README.md gives their sources."
        )
        raise typer.Exit(2)
    try:
        result = asyncio.run(run_demo(settings, patient=patient, console=_err, started=started))
    except _USER_ERRORS as error:
        raise _fail(error) from None
    print_result(result, as_json=as_json, out=Console(soft_wrap=as_json))
    if result.status != 200:
        raise typer.Exit(1)


feedback = typer.Typer(no_args_is_help=True, help="Clinicians' feedback on the cards issued.")
app.add_typer(feedback, name="feedback")


@feedback.command("report")
def feedback_report(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Summarise the card ledger: outcomes by service and card kind, override reasons, and how
    the cards showing each source fared. Reads MEDIRAG_DSN, else the embedded database in
    MEDIRAG_DATA_DIR."""
    settings = Settings()
    configure_logging("text", level=logging.WARNING)

    async def run() -> FeedbackReport:
        async with open_ledger(settings) as ledger:
            return await ledger.report()

    try:
        report = asyncio.run(run())
    except _USER_ERRORS as error:
        raise _fail(error) from None
    print_report(report, as_json=as_json, out=Console(soft_wrap=as_json))
