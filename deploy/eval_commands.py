"""``medirag eval``: retrieval quality on public benchmarks, written as JSON, markdown and PNG.

Why it exists: the service's retrieval choices (hybrid search, reranking, fusion weights) must be
justified by measurements on data anyone can fetch, run the same way each time. Each command
here measures one kind of retrieval and writes its report with :mod:`deploy.eval_report`:

* ``medirag eval literature``: every literature search leg on PubMedQA or a BEIR dataset (see
  :mod:`deploy.eval_literature`).
* ``medirag eval cases``: every similar-case leg on NIH ChestX-ray14 images, patient-disjoint
  (see :mod:`deploy.eval_cases`).

The lead registers :data:`eval_app` on the ``medirag`` command (``app.add_typer(eval_app,
name="eval")``). Progress goes to stderr; stdout holds the markdown table, or with ``--json``
nothing but the JSON report. A problem the user can fix ends the command with status 2 and one
line on stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from adapters.models.manifest import ManifestError
from core.errors import SourceUnavailable
from deploy.eval_cases import CaseEvalError, evaluate_cases
from deploy.eval_literature import DatasetError, run_literature_eval
from deploy.eval_report import PlotUnavailable
from deploy.logs import configure_logging
from deploy.settings import Settings
from deploy.wiring import ConfigurationError

__all__ = ["eval_app"]

eval_app = typer.Typer(
    no_args_is_help=True,
    help="Measure retrieval on public benchmarks; reports go to MEDIRAG_DATA_DIR/eval.",
)
_err = Console(stderr=True)


@eval_app.callback()
def _evaluations() -> None:
    """Measure retrieval on public benchmarks."""


# What a user can fix: said in one line, exit status 2, no traceback.
_USER_ERRORS = (
    CaseEvalError,
    ConfigurationError,
    DatasetError,
    ManifestError,
    PlotUnavailable,
    SourceUnavailable,
)


# The options both evaluations take.
_JsonOption = Annotated[bool, typer.Option("--json", help="Print only the JSON report on stdout.")]
_OutOption = Annotated[
    Path | None,
    typer.Option(help="Where to write the report (default: MEDIRAG_DATA_DIR/eval)."),
]


def _fail(error: Exception) -> typer.Exit:
    _err.print("[red]error:[/red]", escape(str(error)), highlight=False, soft_wrap=True)
    return typer.Exit(2)


@eval_app.command("literature")
def literature(
    dataset: Annotated[
        str,
        typer.Option(
            help="pubmedqa:FILE (a PubMedQA JSON file) or beir:DIR (a BEIR dataset folder, "
            "its test qrels)."
        ),
    ],
    as_json: _JsonOption = False,
    out: _OutOption = None,
    text_model: Annotated[
        Path | None,
        typer.Option(help="Dense model folder (default: the service's MEDIRAG_TEXT_MODEL)."),
    ] = None,
    sparse_model: Annotated[
        Path | None,
        typer.Option(
            help="BGE-M3 folder for the sparse leg (default: the text model when it is "
            "BGE-M3; otherwise the sparse legs are not run)."
        ),
    ] = None,
    reranker: Annotated[
        Path | None,
        typer.Option(
            help="Cross-encoder folder (default: MEDIRAG_RERANKER; without one, "
            "hybrid+rerank is not run)."
        ),
    ] = None,
    rerank_top_n: Annotated[
        int | None,
        typer.Option(min=1, help="Fused passages the reranker reorders (default 20)."),
    ] = None,
    rrf_k: Annotated[
        int | None, typer.Option(min=1, help="Reciprocal rank fusion constant (default 60).")
    ] = None,
) -> None:
    """BM25, dense, sparse, hybrid and reranked literature search, each scored by nDCG@10,
    Recall@100, MAP@100 and MRR@10 at the article level. Passages are indexed once in a scratch
    database (MEDIRAG_DSN's server, else an embedded one under MEDIRAG_DATA_DIR/eval), reused
    by later runs with the same dataset and models."""
    settings = Settings()
    configure_logging("text", level=logging.WARNING)
    try:
        result = asyncio.run(
            run_literature_eval(
                dataset,
                settings=settings,
                out_dir=out,
                text_model=text_model,
                sparse_model=sparse_model,
                reranker=reranker,
                rerank_top_n=rerank_top_n,
                rrf_k=rrf_k,
                console=_err,
            )
        )
    except _USER_ERRORS as error:
        raise _fail(error) from None
    except OSError as error:
        # The dataset's files are checked as they are read; what is left is the report's folder
        # or the scratch database's, and the error names the path.
        raise _fail(OSError(f"cannot write: {error}")) from None
    report = result.report()
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    typer.echo(report.to_markdown(), nl=False)
    if result.files is not None:
        _err.print(
            f"report written to {result.files.json}, {result.files.markdown.name}, "
            f"{result.files.png.name}",
            highlight=False,
        )


@eval_app.command("cases")
def cases(
    images: Annotated[Path, typer.Option(help="Folder of NIH ChestX-ray14 PNGs.")],
    labels: Annotated[Path, typer.Option(help="Their labels.csv (NIH format).")],
    bundles: Annotated[
        Path | None,
        typer.Option(
            help="Folder of Synthea bundles: pairs each NIH patient with a Synthea patient's "
            "labs (SYNTHETIC) for the labs leg; without it the labs leg is not run."
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Evaluate only the first N images of labels.csv.")
    ] = None,
    as_json: _JsonOption = False,
    out: _OutOption = None,
    image_model: Annotated[
        Path | None,
        typer.Option(help="Image/text model folder (default: the service's MEDIRAG_IMAGE_MODEL)."),
    ] = None,
) -> None:
    """Similar-case legs (image-only, fused, labs) scored by P@1, P@5, P@10 and mAP@10 against
    label prevalence, patient-disjoint, each query searched by its image alone. Cases are indexed
    once in a scratch database (MEDIRAG_DSN's server, else an embedded one under
    MEDIRAG_DATA_DIR/eval), reused by later runs."""
    settings = Settings()
    configure_logging("text", level=logging.WARNING)
    try:
        evaluation = asyncio.run(
            evaluate_cases(
                settings,
                images=images,
                labels=labels,
                bundles=bundles,
                limit=limit,
                image_model=image_model,
                console=_err,
            )
        )
    except _USER_ERRORS as error:
        raise _fail(error) from None
    try:
        files = evaluation.write(out or settings.data_dir / "eval")
    except PlotUnavailable as error:
        raise _fail(error) from None
    except OSError as error:
        raise _fail(OSError(f"cannot write the report: {error}")) from None
    if as_json:
        typer.echo(json.dumps(evaluation.to_json(), indent=2))
    else:
        typer.echo(evaluation.to_markdown(), nl=False)
    _err.print(
        f"report written to {files.json}, {files.markdown.name}, {files.png.name}",
        highlight=False,
    )
