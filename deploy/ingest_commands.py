"""``medirag ingest cases|literature``: fill the index from a hospital's records or a corpus.

The demo indexes its own fixture cases and PubMedQA; a deployment indexes its own past cases
(from a folder of FHIR bundles, a FHIR server or a Bulk Data export, with images from a DICOM
folder or a DICOMweb archive) and the literature it chooses (PubMedQA, a BEIR corpus, PubMed XML
files). Both commands open the deployment the ``MEDIRAG_*`` settings describe (models, and
``MEDIRAG_DSN`` or the embedded database in ``MEDIRAG_DATA_DIR``), so that the index is built
with the models the service will query it with.

Ingestion is idempotent: what is already indexed is not embedded again (nor, for a case, its
image fetched), so an interrupted run continues where it stopped and a second run adds nothing.
Progress goes to stderr (on a terminal); the summary (indexed, already indexed, skipped with the
reasons grouped) goes to stdout, as JSON with ``--json``. The exit status is 0 when the run
completed, even if some items were skipped (their reasons are in the summary), and 2 with a
one-line error for what the user can fix: a missing folder, a malformed file, an unreachable
source, wrong arguments.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from adapters.corpora.beir import BeirFormatError, read_beir_corpus
from adapters.corpora.pubmed_xml import PubMedXmlFormatError, read_pubmed_xml
from adapters.corpora.pubmedqa import PubMedQAFormatError, read_pubmedqa
from adapters.fhir.bulk import NdjsonRecords
from adapters.fhir.bundle_folder import BundleFolderRecords
from adapters.fhir.cases import (
    CaseDiscovery,
    cases_from_bundle_folder,
    cases_from_ndjson,
    cases_from_server,
)
from adapters.fhir.client import FhirClient
from adapters.fhir.smart_backend import SmartBackendAuth, load_private_key
from adapters.store.schema import IndexModelMismatch
from core.errors import SourceUnavailable
from core.ingestion import IngestReport, ingest_cases, ingest_passages
from core.ports import ClinicalRecords
from core.types import Passage
from deploy.logs import configure_logging
from deploy.settings import Settings
from deploy.wiring import ConfigurationError, open_components, open_index

__all__ = ["IngestArgumentError", "IngestSummary", "ingest_app"]

ingest_app = typer.Typer(
    no_args_is_help=True,
    help="Index past cases and literature with the deployment's models (MEDIRAG_* settings). "
    "Idempotent: a second run adds nothing, an interrupted one continues.",
)

EXAMPLES_SHOWN = 3
"""How many item ids the summary names for each reason items were skipped for."""


class IngestArgumentError(ValueError):
    """The command's arguments cannot work together or name something that is not there."""


# What a user can fix: said in one line, exit status 2, no traceback.
_USER_ERRORS = (
    BeirFormatError,
    ConfigurationError,
    IndexModelMismatch,
    IngestArgumentError,
    PubMedQAFormatError,
    PubMedXmlFormatError,
    SourceUnavailable,
)

# A case skipped while gathering names its study first; the reason alone is what cases share.
_STUDY_PREFIX = re.compile(r"^study \S+: ")


@dataclass(slots=True)
class IngestSummary:
    """What one ``ingest`` run did.

    Args:
        what: ``"cases"`` or ``"passages"``: what ``indexed`` and ``already_indexed`` count.
        indexed: items added to the index by this run.
        already_indexed: items the index already held (not read again, not embedded).
        skipped: ``(item id, reason)`` for each item left out: FHIR reports that are not
            cases and cases whose image or labs could not be used; corpus documents or
            articles that gave no passage.

    Example:
        >>> summary = IngestSummary("cases", indexed=2, skipped=[
        ...     ("c1", "study 1.2.3: no such study for this patient"),
        ...     ("c2", "study 1.2.4: no such study for this patient")])
        >>> summary.to_json()["skipped_reasons"]
        [{'reason': 'no such study for this patient', 'count': 2, 'examples': ['c1', 'c2']}]
    """

    what: Literal["cases", "passages"]
    indexed: int = 0
    already_indexed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, report: IngestReport) -> None:
        """Count an ingestion report's results in."""
        self.indexed += report.indexed
        self.already_indexed += report.already_indexed
        self.skipped.extend(report.skipped)

    def reasons(self) -> list[tuple[str, int, list[str]]]:
        """``(reason, count, first item ids)`` per distinct reason, most frequent first."""
        groups: dict[str, list[str]] = {}
        for item, reason in self.skipped:
            groups.setdefault(_STUDY_PREFIX.sub("", reason), []).append(item)
        ranked = sorted(groups.items(), key=lambda group: -len(group[1]))
        return [(reason, len(items), items[:EXAMPLES_SHOWN]) for reason, items in ranked]

    def to_json(self) -> dict[str, Any]:
        """The summary as JSON: the counts, and the skipped items grouped by reason."""
        return {
            "what": self.what,
            "indexed": self.indexed,
            "already_indexed": self.already_indexed,
            "skipped": len(self.skipped),
            "skipped_reasons": [
                {"reason": reason, "count": count, "examples": examples}
                for reason, count, examples in self.reasons()
            ],
        }


def _print_summary(summary: IngestSummary, *, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary.to_json(), indent=2))
        return
    out = Console(highlight=False, soft_wrap=True)
    out.print(
        f"{summary.what}: {summary.indexed} indexed, {summary.already_indexed} already indexed, "
        f"{len(summary.skipped)} skipped",
        markup=False,
    )
    for reason, count, examples in summary.reasons():
        more = f" and {count - len(examples)} more" if count > len(examples) else ""
        out.print(f"  {count} skipped: {reason} (e.g. {', '.join(examples)}{more})", markup=False)


def _fail(error: Exception) -> typer.Exit:
    # Soft wrap: the message stays one line whatever the terminal's width.
    Console(stderr=True, soft_wrap=True).print(
        f"[red]error:[/red] {escape(str(error))}", highlight=False
    )
    return typer.Exit(2)


def _one_of(**options: object) -> str:
    """The name of the one option given.

    Raises:
        IngestArgumentError: none or several were given.
    """
    flags = {name: f"--{name.replace('_', '-')}" for name in options}
    given = [name for name, value in options.items() if value]
    if len(given) != 1:
        got = f" (got {', '.join(flags[name] for name in given)})" if given else ""
        raise IngestArgumentError(f"give exactly one of {', '.join(flags.values())}{got}")
    return given[0]


def _folder(option: str, path: Path) -> Path:
    if not path.is_dir():
        raise IngestArgumentError(f"{option}: {path} is not a folder")
    return path


def _file(option: str, path: Path) -> Path:
    if not path.is_file():
        raise IngestArgumentError(f"{option}: {path} is not a file")
    return path


def _url(option: str, value: str) -> str:
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as error:
        raise IngestArgumentError(f"{option}: {value!r} is not a URL ({error})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise IngestArgumentError(f"{option}: {value!r} is not an http or https URL")
    return value


def _run(work: Callable[[], Coroutine[Any, Any, IngestSummary]], *, as_json: bool) -> None:
    """Run the command's work and print its summary; a user error exits 2 in one line."""
    try:
        summary = asyncio.run(work())
    except _USER_ERRORS as error:
        raise _fail(error) from None
    _print_summary(summary, as_json=as_json)


def _progress() -> Progress:
    """Progress bars on stderr, shown only on a terminal (a log or a pipe gets the summary and
    errors alone)."""
    console = Console(stderr=True)
    return Progress(console=console, transient=True, disable=not console.is_terminal)


@contextmanager
def _spinner(progress: Progress, description: str) -> Iterator[None]:
    """A progress line without a total while something of unknown length runs."""
    task = progress.add_task(description, total=None)
    try:
        yield
    finally:
        progress.remove_task(task)


# ---- ingest cases ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SmartOptions:
    """SMART Backend Services credentials for a FHIR server (see ``ingest cases --help``)."""

    client_id: str
    key: Any
    key_id: str
    algorithm: Literal["RS384", "ES384"]
    scope: str


def _smart_options(
    client_id: str | None,
    key_file: Path | None,
    key_id: str | None,
    algorithm: Literal["RS384", "ES384"],
    scope: str,
) -> _SmartOptions | None:
    if client_id is None:
        if key_file is not None or key_id is not None:
            raise IngestArgumentError("--smart-key and --smart-key-id need --smart-client-id")
        return None
    if key_file is None:
        raise IngestArgumentError("--smart-client-id needs --smart-key (a PEM or JWK file)")
    _file("--smart-key", key_file)
    try:
        key, jwk_kid = load_private_key(key_file)
    except (ValueError, OSError) as error:
        raise IngestArgumentError(f"--smart-key: {error}") from None
    kid = key_id or jwk_kid
    if not kid:
        raise IngestArgumentError("--smart-key-id is needed: the key file names no kid")
    return _SmartOptions(client_id, key, kid, algorithm, scope)


@dataclass(frozen=True, slots=True)
class _FhirSource:
    """Where the cases are found: ``kind`` is the option given, ``location`` its value."""

    kind: Literal["bundles", "fhir_url", "ndjson"]
    location: str
    smart: _SmartOptions | None
    request_timeout_s: float


async def _discover(
    source: _FhirSource, stack: AsyncExitStack
) -> tuple[CaseDiscovery, ClinicalRecords]:
    """The cases of the FHIR source, and the records their labs are read from."""
    if source.kind == "bundles":
        bundles = BundleFolderRecords(source.location)
        return await asyncio.to_thread(cases_from_bundle_folder, source.location), bundles
    if source.kind == "ndjson":
        export = NdjsonRecords(source.location)
        return await asyncio.to_thread(cases_from_ndjson, export), export
    timeout, smart = source.request_timeout_s, source.smart
    http = await stack.enter_async_context(httpx.AsyncClient(timeout=timeout))
    auth = (
        None
        if smart is None
        else SmartBackendAuth(
            source.location,
            client_id=smart.client_id,
            private_key=smart.key,
            key_id=smart.key_id,
            algorithm=smart.algorithm,
            scope=smart.scope,
            http=http,
            timeout=timeout,
        )
    )
    client = FhirClient(source.location, http=http, timeout=timeout, token_source=auth)
    return await cases_from_server(client), client


async def _ingest_cases(settings: Settings, source: _FhirSource, batch_size: int) -> IngestSummary:
    summary = IngestSummary("cases")
    async with AsyncExitStack() as stack:
        progress = stack.enter_context(_progress())
        # The source is asked first: a wrong URL or folder fails before the models load.
        with _spinner(progress, "finding cases"):
            discovery, records = await _discover(source, stack)
        summary.skipped.extend(discovery.skipped)
        with _spinner(progress, "opening the models, the index and the imaging archive"):
            components = await stack.enter_async_context(open_components(settings))
        task = progress.add_task("indexing cases", total=len(discovery.cases))
        summary.add(
            await ingest_cases(
                discovery.cases,
                records=records,
                imaging=components.imaging,
                image_model=components.image_model,
                index=components.store,
                weights=components.fusion,
                batch_size=batch_size,
                on_progress=lambda n: progress.advance(task, n),
            )
        )
    return summary


@ingest_app.command("cases")
def cases(
    bundles: Annotated[
        Path | None, typer.Option(help="A folder of FHIR bundles (Synthea's, an EHR's export).")
    ] = None,
    fhir_url: Annotated[
        str | None,
        typer.Option(help="A FHIR R4 server's base URL (unauthenticated, or SMART: see below)."),
    ] = None,
    ndjson: Annotated[
        Path | None, typer.Option(help="A folder of Bulk Data export files (*.ndjson).")
    ] = None,
    dicom: Annotated[Path | None, typer.Option(help="A folder of DICOM files.")] = None,
    dicomweb: Annotated[
        str | None,
        typer.Option(
            help="A DICOMweb base URL (basic auth from MEDIRAG_DICOMWEB_USERNAME/_PASSWORD)."
        ),
    ] = None,
    smart_client_id: Annotated[
        str | None,
        typer.Option(help="--fhir-url with SMART Backend Services: the registered client id."),
    ] = None,
    smart_key: Annotated[
        Path | None, typer.Option(help="The client's private key (PEM, or a JWK with its kid).")
    ] = None,
    smart_key_id: Annotated[
        str | None, typer.Option(help="The kid of the key's registered public JWK.")
    ] = None,
    smart_algorithm: Annotated[
        Literal["RS384", "ES384"], typer.Option(help="The client assertion's algorithm.")
    ] = "RS384",
    smart_scope: Annotated[str, typer.Option(help="The scopes asked for.")] = "system/*.read",
    timeout: Annotated[
        float,
        typer.Option(
            min=0.1,
            help="Seconds allowed for each FHIR or DICOMweb request (ingestion waits for slow "
            "answers that a hook call would not).",
        ),
    ] = 30.0,
    batch_size: Annotated[int, typer.Option(min=1, help="Cases embedded together.")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Index past cases: every final radiology report on a DICOM study in the FHIR source, with
    its image and labs. Give one FHIR source and one image source."""
    configure_logging("text", level=logging.WARNING)
    try:
        kind = _one_of(bundles=bundles, fhir_url=fhir_url, ndjson=ndjson)
        images = _one_of(dicom=dicom, dicomweb=dicomweb)
        if smart_client_id is not None and kind != "fhir_url":
            raise IngestArgumentError("--smart-client-id is for --fhir-url")
        smart = _smart_options(
            smart_client_id, smart_key, smart_key_id, smart_algorithm, smart_scope
        )
        if kind == "bundles":
            assert bundles is not None
            source = _FhirSource("bundles", str(_folder("--bundles", bundles)), None, timeout)
        elif kind == "ndjson":
            assert ndjson is not None
            source = _FhirSource("ndjson", str(_folder("--ndjson", ndjson)), None, timeout)
        else:
            assert fhir_url is not None
            source = _FhirSource("fhir_url", _url("--fhir-url", fhir_url), smart, timeout)
        if images == "dicom":
            assert dicom is not None
            imaging: dict[str, Any] = {"dicom_dir": _folder("--dicom", dicom), "dicomweb_url": None}
        else:
            assert dicomweb is not None
            imaging = {"dicomweb_url": _url("--dicomweb", dicomweb), "dicomweb_timeout_s": timeout}
    except IngestArgumentError as error:
        raise _fail(error) from None
    settings = Settings().model_copy(update=imaging)
    _run(lambda: _ingest_cases(settings, source, batch_size), as_json=as_json)


# ---- ingest literature -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Part:
    """One file or folder of a corpus: passages read from it, and documents that gave none."""

    name: str
    read: Callable[[], tuple[Sequence[Passage], Sequence[tuple[str, str]]]]


def _pubmedqa_part(path: Path) -> _Part:
    return _Part(path.name, lambda: (read_pubmedqa(path), ()))


def _beir_part(folder: Path) -> _Part:
    def read() -> tuple[Sequence[Passage], Sequence[tuple[str, str]]]:
        corpus = read_beir_corpus(folder)
        return corpus.passages, corpus.skipped

    return _Part(folder.name, read)


def _pubmed_xml_part(path: Path) -> _Part:
    def read() -> tuple[Sequence[Passage], Sequence[tuple[str, str]]]:
        corpus = read_pubmed_xml(path)
        return corpus.passages, corpus.skipped

    return _Part(path.name, read)


def _pubmed_xml_files(paths: Sequence[Path]) -> list[Path]:
    """The XML files named, a folder standing for its ``*.xml`` and ``*.xml.gz`` files."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted([*path.glob("*.xml"), *path.glob("*.xml.gz")])
            if not found:
                raise IngestArgumentError(f"--pubmed-xml: {path} holds no *.xml or *.xml.gz file")
            files.extend(found)
        else:
            files.append(_file("--pubmed-xml", path))
    return files


def _read(part: _Part) -> tuple[Sequence[Passage], Sequence[tuple[str, str]]]:
    try:
        return part.read()
    except (OSError, UnicodeDecodeError) as error:
        raise IngestArgumentError(f"{part.name}: {error}") from None


async def _ingest_literature(
    settings: Settings, parts: Sequence[_Part], *, batch_size: int
) -> IngestSummary:
    summary = IngestSummary("passages")
    async with AsyncExitStack() as stack:
        progress = stack.enter_context(_progress())
        # The first part is read before the models load, so that a malformed file fails fast;
        # the others one at a time, so that memory holds one file's passages.
        with _spinner(progress, f"reading {parts[0].name}"):
            first = await asyncio.to_thread(_read, parts[0])
        with _spinner(progress, "opening the models and the index"):
            models, store, _ = await stack.enter_async_context(open_index(settings))
        for i, part in enumerate(parts):
            if i == 0:
                passages, skipped = first
            else:
                with _spinner(progress, f"reading {part.name}"):
                    passages, skipped = await asyncio.to_thread(_read, part)
            summary.skipped.extend(skipped)
            task = progress.add_task(f"indexing {part.name}", total=len(passages))
            summary.add(
                await ingest_passages(
                    passages,
                    text_model=models.text_model,
                    sparse_model=models.sparse_model,
                    index=store,
                    batch_size=batch_size,
                    on_progress=partial(progress.advance, task),
                )
            )
            progress.remove_task(task)
    return summary


@ingest_app.command("literature")
def literature(
    pubmedqa: Annotated[
        Path | None, typer.Option(help="A PubMedQA JSON file (ori_pqal.json, test_set.json).")
    ] = None,
    beir: Annotated[
        Path | None,
        typer.Option(help="A BEIR dataset folder (its corpus.jsonl is indexed)."),
    ] = None,
    pubmed_xml: Annotated[
        list[Path] | None,
        typer.Option(
            help="A PubMed XML file (efetch answer, baseline or update file; .xml or .xml.gz), "
            "or a folder of them. Repeatable."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Passages embedded together.")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Index literature passages with the text model (and its sparse weights when the text model
    is BGE-M3). Give one corpus."""
    configure_logging("text", level=logging.WARNING)
    try:
        corpus = _one_of(pubmedqa=pubmedqa, beir=beir, pubmed_xml=pubmed_xml)
        if corpus == "pubmedqa":
            assert pubmedqa is not None
            parts = [_pubmedqa_part(_file("--pubmedqa", pubmedqa))]
        elif corpus == "beir":
            assert beir is not None
            parts = [_beir_part(_folder("--beir", beir))]
        else:
            assert pubmed_xml is not None
            parts = [_pubmed_xml_part(path) for path in _pubmed_xml_files(pubmed_xml)]
    except IngestArgumentError as error:
        raise _fail(error) from None
    settings = Settings()
    _run(lambda: _ingest_literature(settings, parts, batch_size=batch_size), as_json=as_json)
