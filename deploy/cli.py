"""The ``medirag`` command.

* ``medirag serve``: the CDS Hooks service, configured by ``MEDIRAG_*`` variables.
* ``medirag demo``: the whole path end to end on the embedded defaults (see deploy/demo.py).
* ``medirag feedback report``: what clinicians did with the cards issued (see
  deploy/feedback_report.py).
* ``medirag models export|build-tiny|verify``: fill and check the model folders (see
  deploy/model_commands.py).
* ``medirag bench embed``: ONNX Runtime against torch eager on the same weights (see
  deploy/bench_embed.py).
* ``medirag bench retrieval``: HNSW against exact search, latency and recall, on generated
  vectors (see deploy/bench_retrieval.py).
* ``medirag ingest cases|literature``: fill the index (see deploy/ingest_commands.py).
* ``medirag eval literature|cases``: retrieval quality on benchmarks (see
  deploy/eval_commands.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
import uvicorn
from rich.console import Console

from adapters.models.manifest import Manifest
from adapters.store.schema import IndexModelMismatch
from core.errors import SourceUnavailable
from core.feedback import FeedbackReport
from deploy.bench_embed import print_report as print_bench_report
from deploy.bench_embed import run_bench
from deploy.bench_retrieval import bench_retrieval_command
from deploy.default_models import ExportUnavailable
from deploy.demo import missing_shared_data, print_result, run_demo
from deploy.eval_commands import eval_app
from deploy.feedback_report import print_report
from deploy.ingest_commands import ingest_app
from deploy.logs import configure_logging
from deploy.model_commands import (
    BIOMEDCLIP_HUB,
    ExportFailed,
    ExportKind,
    Size,
    build_tiny_models,
    export_model,
    verify_models,
)
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
_USER_ERRORS = (
    ConfigurationError,
    ExportFailed,
    ExportUnavailable,
    IndexModelMismatch,
    SourceUnavailable,
)


def _fail(error: Exception) -> typer.Exit:
    _err.print(f"[red]error:[/red] {error}")
    return typer.Exit(2)


def _survive_reraised_stop_signals() -> None:
    """Let the components close after uvicorn stops on SIGTERM or SIGINT.

    uvicorn shuts down gracefully on those signals, then raises the signal again with the
    handler it found when it started. With the default handlers that killed the process before
    the index, the embedded PostgreSQL and the models were closed, leaving the embedded server
    running. The handlers installed here take that one re-raised signal and restore the
    defaults, so a second signal during the close still stops the process at once.
    """

    def take_once(signum: int, frame: FrameType | None) -> None:
        signal.signal(
            signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        )

    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, take_once)


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
            _survive_reraised_stop_signals()
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


models = typer.Typer(no_args_is_help=True, help="Export, build and verify the model folders.")
app.add_typer(models, name="models")


@models.command("export")
def models_export(
    kind: Annotated[ExportKind, typer.Argument(help="Which model to export.")],
    out: Annotated[Path, typer.Option(help="The model folder to create (new or empty).")],
    source: Annotated[
        str | None,
        typer.Option(
            help=f"biomedclip: hf-hub:ORG/NAME or local-dir:PATH (default {BIOMEDCLIP_HUB}); "
            "bge-m3 and reranker: a local model folder; minilm: none (the PyPI package)."
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Short name shown on the cards.")] = None,
    description: Annotated[
        str | None, typer.Option(help="The line clinicians are shown about the model.")
    ] = None,
) -> None:
    """Export a model to ONNX with its tokenizer and manifest, after checking parity with the
    original. For the reranker, name the folder after its FlashRank model name."""
    configure_logging("text", level=logging.INFO)
    try:
        manifest = export_model(kind, out, source=source, name=name, description=description)
    except _USER_ERRORS as error:
        raise _fail(error) from None
    _print_manifest(out, manifest)


@models.command("build-tiny")
def models_build_tiny(
    out: Annotated[
        Path | None, typer.Option(help="Models folder (default: MEDIRAG_MODELS_DIR).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    size: Annotated[
        Size,
        typer.Option(help="tiny: tests and demos; real: original sizes, for speed only."),
    ] = "tiny",
) -> None:
    """Build seeded random models of the three architectures (BiomedCLIP, BGE-M3, cross-encoder
    reranker) and export them through the same code as the real ones. Their outputs mean
    nothing; they exist for tests, demos and speed measurements."""
    configure_logging("text", level=logging.WARNING)
    target = out or Settings().models_path
    try:
        build_tiny_models(target, seed=seed, size=size, say=_err.print)
    except _USER_ERRORS as error:
        raise _fail(error) from None


@models.command("verify")
def models_verify(
    folders: Annotated[list[Path], typer.Argument(help="Model folders to check.")],
) -> None:
    """Check model folders against their manifests, as the service does before loading them."""
    refused = 0
    for folder, result in verify_models(folders):
        if isinstance(result, Manifest):
            _print_manifest(folder, result)
        else:
            refused += 1
            _err.print(f"[red]refused:[/red] {result}")
    if refused:
        raise typer.Exit(1)


def _print_manifest(folder: Path, manifest: Manifest) -> None:
    Console().print(
        f"{folder}: {manifest.model_id} ({manifest.kind}, {manifest.dimension}-d, "
        f"{manifest.precision}); parity {manifest.parity.min_cosine:.6f}: "
        f"{manifest.parity.compared}"
    )


app.add_typer(ingest_app, name="ingest")
app.add_typer(eval_app, name="eval")

bench = typer.Typer(no_args_is_help=True, help="Measure speed.")
app.add_typer(bench, name="bench")
bench.command("retrieval")(bench_retrieval_command)


@bench.command("embed")
def bench_embed(
    quick: Annotated[
        bool, typer.Option("--quick", help="Tiny models and short runs (a few minutes).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    work_dir: Annotated[
        Path | None, typer.Option(help="Where to build the models (default: a temporary folder).")
    ] = None,
) -> None:
    """Items per second of ONNX Runtime and torch eager on the same weights, batches of 1, 8
    and 32, image and text, in one run (and the CUDA and TensorRT providers, fp16, batches up
    to 256, on an NVIDIA GPU). Needs the export extra."""
    configure_logging("text", level=logging.WARNING)
    try:
        report = run_bench(quick=quick, say=_err.print, work_dir=work_dir)
    except ImportError as error:
        raise _fail(ExportFailed(f"the benchmark needs the export extra: {error}")) from None
    if as_json:
        Console(soft_wrap=True).print_json(json.dumps(report.to_json()))
    else:
        print_bench_report(report, out=Console())
