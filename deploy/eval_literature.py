"""``medirag eval literature``: how well each literature search leg finds the relevant articles.

Why it exists: hybrid search and reranking cost model runs and index space; they are only worth
it if they find more of the relevant literature than BM25 or dense search alone. This module
runs every leg over a public benchmark, in one run, on the same passages, and reports BEIR's
metrics (:func:`core.metrics.mean_metrics`) for each:

* ``bm25``: :class:`core.bm25.BM25` over the same passage texts, in memory;
* ``dense``: the text model's vectors in the index (cosine, HNSW);
* ``sparse``: the sparse model's weights in the index (exact inner product);
* ``hybrid``: dense and sparse fused by reciprocal rank fusion
  (:func:`core.retrieval.fuse_passages`);
* ``hybrid+rerank``: the hybrid's first ``rerank_top_n`` passages reordered by the cross-encoder
  (:func:`core.retrieval.rerank_passages`), the rest after them;
* ``dense+bm25 (RRF)``: dense and BM25 fused the same way. It is an extra row, not a service
  leg: where the sparse model is a random placeholder (no real BGE-M3 can be fetched on some
  machines), it shows what fusion does with a real lexical leg.

Every leg ranks passages; the ranking is turned into one of articles (``Passage.pmid``, the unit
the qrels judge) by keeping each article at its best passage's rank, ``depth`` articles deep.

Datasets: ``pubmedqa:FILE`` (each expert question's one relevant article is the abstract it was
written for) or ``beir:DIR`` (a BEIR folder, its ``test`` qrels). The passages are indexed in a
scratch database of their own, never the service's index: one database per (dataset, text
model, sparse model), so that a second run reuses the embeddings and embeds nothing
(:func:`core.ingestion.ingest_passages` skips indexed ids, so an interrupted run resumes). It
lives on the embedded PostgreSQL in ``<data_dir>/eval/pg``, or on the ``MEDIRAG_DSN`` server
when that is set.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import Progress

from adapters.corpora.beir import read_beir_corpus, read_beir_qrels, read_beir_queries
from adapters.corpora.pubmedqa import read_pubmedqa, read_pubmedqa_questions
from adapters.models.manifest import ManifestError, read_manifest
from adapters.models.rerank import OnnxReranker
from adapters.models.sparse_text import OnnxBgeM3Embedder
from adapters.models.text import OnnxTextEmbedder
from adapters.store.pgvector_store import MAX_EF_SEARCH, PgVectorStore
from core.bm25 import BM25
from core.ingestion import IngestReport, ingest_passages
from core.metrics import mean_metrics
from core.retrieval import fuse_passages, rerank_passages
from core.types import Passage, SparseWeights, Vector
from deploy.eval_database import scratch_database
from deploy.eval_report import (
    EvalReport,
    ModelInfo,
    ReportFiles,
    require_plotting,
    write_report,
)
from deploy.settings import Settings
from deploy.wiring import ConfigurationError, session_settings

__all__ = [
    "LEGS",
    "DatasetError",
    "LiteratureDataset",
    "LiteratureEval",
    "eval_database_name",
    "load_dataset",
    "run_literature_eval",
    "to_documents",
]

LEGS = ("bm25", "dense", "sparse", "hybrid", "hybrid+rerank", "dense+bm25 (RRF)")
"""The report's rows, in order."""

_DEPTH = 100
_QUERY_BATCH = 64
# Searches in flight at once: the store's pool has 4 connections.
_CONCURRENCY = 4
# Placeholders for the case index's columns, which a literature evaluation never fills.
_NO_IMAGE_MODEL = "none (literature evaluation)"
_NO_IMAGE_DIM = 1

T = TypeVar("T")
R = TypeVar("R")

TextModel = OnnxTextEmbedder | OnnxBgeM3Embedder


class DatasetError(Exception):
    """The dataset spec or its files are unusable; the message says which and why."""


@dataclass(frozen=True, slots=True)
class LiteratureDataset:
    """A retrieval benchmark as the evaluation needs it.

    Args:
        name: a short name for files and titles (``pubmedqa-test_set``, ``beir-scifact``).
        passages: the corpus, as indexed passages (several per article for PubMedQA).
        queries: query id to text, only the judged queries, in the dataset's order.
        qrels: query id to ``{article id: grade}``.
    """

    name: str
    passages: tuple[Passage, ...]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]

    @property
    def documents(self) -> int:
        """How many articles the passages come from."""
        return len({passage.pmid for passage in self.passages})

    def fingerprint(self) -> str:
        """A hash of everything indexed about the passages (ids, metadata, texts)."""
        digest = hashlib.sha256()
        for p in self.passages:
            for value in (p.passage_id, p.pmid, p.section, p.year, p.title, p.doi, p.text):
                digest.update(b"\x00" if value is None else value.encode() + b"\x01")
            digest.update(b"\x02")
        return digest.hexdigest()


def load_dataset(spec: str) -> LiteratureDataset:
    """Read a benchmark named ``pubmedqa:FILE`` or ``beir:DIR``.

    Args:
        spec: ``pubmedqa:`` and a PubMedQA JSON file (each question is judged against the
            abstract it was written for, grade 1), or ``beir:`` and a BEIR folder (its corpus,
            queries and ``qrels/test.tsv``; only the judged queries are asked).

    Returns:
        The dataset.

    Raises:
        DatasetError: an unknown kind, a missing path, a malformed file, or no query.

    Example:
        >>> load_dataset("trec:runs")
        Traceback (most recent call last):
        ...
        deploy.eval_literature.DatasetError: dataset 'trec:runs': expected pubmedqa:FILE or beir:DIR
    """
    kind, _, location = spec.partition(":")
    if kind not in ("pubmedqa", "beir") or not location:
        raise DatasetError(f"dataset {spec!r}: expected pubmedqa:FILE or beir:DIR")
    path = Path(location).expanduser()
    try:
        if kind == "pubmedqa":
            if not path.is_file():
                raise DatasetError(f"dataset {spec!r}: no such file {path}")
            passages = tuple(read_pubmedqa(path))
            questions = read_pubmedqa_questions(path)
            queries = dict(questions)
            qrels = {pmid: {pmid: 1} for pmid, _ in questions}
            name = f"pubmedqa-{path.stem}"
        else:
            if not path.is_dir():
                raise DatasetError(f"dataset {spec!r}: no such folder {path}")
            passages = read_beir_corpus(path).passages
            asked = read_beir_queries(path)
            qrels = read_beir_qrels(path, "test", queries=asked)
            queries = {query: asked[query] for query in qrels}
            name = f"beir-{path.resolve().name}"
    except (OSError, ValueError) as error:
        raise DatasetError(f"dataset {spec!r}: {error}") from error
    if not passages:
        raise DatasetError(f"dataset {spec!r}: the corpus has no passage")
    if not queries:
        raise DatasetError(f"dataset {spec!r}: no judged query")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return LiteratureDataset(name=safe, passages=passages, queries=queries, qrels=qrels)


def eval_database_name(
    dataset: LiteratureDataset, text_model: str, sparse_model: str | None
) -> str:
    """The scratch database of a dataset indexed with given models (so that a run with other
    models, or on an edited corpus, never reuses vectors that do not belong to it).

    Example:
        >>> ds = LiteratureDataset("x", (Passage("1:0", "1", "text"),), {"1": "q"}, {"1": {"1": 1}})
        >>> eval_database_name(ds, "minilm@1", None).startswith("medirag_eval_")
        True
    """
    key = "\x00".join((dataset.fingerprint(), text_model, sparse_model or ""))
    return f"medirag_eval_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def to_documents(ranked: Sequence[tuple[Passage, float]], depth: int) -> list[str]:
    """Article ids in the order of their best passage, at most ``depth``.

    Example:
        >>> a0, a1, b0 = (Passage(i, i[0], "text") for i in ("a:0", "a:1", "b:0"))
        >>> to_documents([(a1, 0.9), (b0, 0.8), (a0, 0.7)], depth=10)
        ['a', 'b']
    """
    documents: dict[str, None] = {}
    for passage, _ in ranked:
        documents.setdefault(passage.pmid, None)
        if len(documents) == depth:
            break
    return list(documents)


@dataclass(slots=True)
class LiteratureEval:
    """What one evaluation run measured, and on what.

    Args:
        dataset: the dataset's name.
        passages: passages indexed.
        documents: articles they come from.
        queries: queries asked.
        depth: articles ranked per query and leg.
        candidates: passages each index leg fetched per query.
        metrics: per leg that ran, ``{metric: mean value}``.
        not_run: per leg that did not run, why.
        models: the models used.
        database: the scratch database's name.
        ingest: what indexing did (``indexed`` is 0 on a run that reused the database).
        timings: seconds per phase.
        rerank_top_n: passages the reranker reordered per query.
        rrf_k: the fusion constant.
        files: where the report was written.
    """

    dataset: str
    passages: int
    documents: int
    queries: int
    depth: int
    candidates: int
    metrics: dict[str, dict[str, float]]
    not_run: dict[str, str]
    models: tuple[ModelInfo, ...]
    database: str
    ingest: IngestReport
    timings: dict[str, float]
    rerank_top_n: int
    rrf_k: int
    files: ReportFiles | None = field(default=None)

    def report(self) -> EvalReport:
        """The run as a report (``literature-<dataset>``)."""
        first = next(iter(self.metrics.values()), {})
        return EvalReport(
            name=f"literature-{self.dataset}",
            title=f"Literature retrieval on {self.dataset}: {self.queries} queries, "
            f"{self.documents} articles ({self.passages} passages)",
            metrics=tuple(first),
            rows={leg: self.metrics[leg] for leg in LEGS if leg in self.metrics},
            not_run={leg: self.not_run[leg] for leg in LEGS if leg in self.not_run},
            models=self.models,
            notes=(
                "Each leg ranks passages; an article ranks at its best passage, "
                f"{self.depth} articles deep. Means are over every judged query (BEIR).",
                "dense uses HNSW (approximate); sparse is an exact inner product; bm25 is "
                "Okapi BM25 (k1=0.9, b=0.4, Lucene idf, no stemming) over the same texts.",
                f"hybrid is RRF (k={self.rrf_k}) of dense and sparse; hybrid+rerank reorders "
                f"its first {self.rerank_top_n} passages with the cross-encoder.",
                "dense+bm25 (RRF) is not a service leg: it fuses the dense leg with BM25 "
                "to show what fusion does with a real lexical leg.",
                "A model whose description says it is a random placeholder ranks at chance: "
                "its rows show that the pipeline runs, not what the real model would score.",
            ),
            details={
                "dataset": self.dataset,
                "queries": self.queries,
                "articles": self.documents,
                "passages": self.passages,
                "depth": self.depth,
                "candidates_per_leg": self.candidates,
                "database": self.database,
                "indexed_now": self.ingest.indexed,
                "already_indexed": self.ingest.already_indexed,
                "timings_s": {name: round(value, 3) for name, value in self.timings.items()},
            },
        )


def _load_text_model(directory: Path, settings: Settings) -> TextModel:
    """The dense model of a folder: BGE-M3 (dense and sparse heads) or a text embedder."""
    session, batching = session_settings(settings)
    if read_manifest(directory).kind == "dense-sparse-text-embedder":
        return OnnxBgeM3Embedder(directory, session=session, batching=batching)
    return OnnxTextEmbedder(directory, session=session, batching=batching)


@dataclass(slots=True)
class _Models:
    text: TextModel
    sparse: OnnxBgeM3Embedder | None
    reranker: OnnxReranker | None

    def info(self) -> tuple[ModelInfo, ...]:
        roles: list[tuple[str, Any]] = [
            ("dense", self.text),
            ("sparse", self.sparse),
            ("reranker", self.reranker),
        ]
        return tuple(ModelInfo.of(role, model) for role, model in roles if model is not None)


@asynccontextmanager
async def _open_models(
    settings: Settings,
    text_model: Path | None,
    sparse_model: Path | None,
    reranker: Path | None,
) -> AsyncIterator[_Models]:
    """The evaluated models, closed on exit; unnamed ones follow the service's configuration
    (its text model, that model's sparse head when it is BGE-M3, ``MEDIRAG_RERANKER``)."""
    session, batching = session_settings(settings)
    text_dir = text_model or settings.models_path / settings.text_model
    reranker_dir = reranker or (
        settings.models_path / settings.reranker if settings.reranker else None
    )
    async with AsyncExitStack() as stack:
        try:
            text = _load_text_model(text_dir, settings)
            stack.push_async_callback(text.aclose)
            sparse: OnnxBgeM3Embedder | None = None
            if sparse_model is not None:
                sparse = OnnxBgeM3Embedder(sparse_model, session=session, batching=batching)
                stack.push_async_callback(sparse.aclose)
            elif isinstance(text, OnnxBgeM3Embedder):
                sparse = text
            cross: OnnxReranker | None = None
            if reranker_dir is not None:
                cross = OnnxReranker(reranker_dir, session=session, batching=batching)
                stack.push_async_callback(cross.aclose)
        except ManifestError as error:
            hint = (
                f". `medirag demo` builds the default models into {settings.models_path}; "
                "--text-model names another"
                if text_model is None
                else ""
            )
            raise ConfigurationError(f"{error}{hint}") from error
        yield _Models(text=text, sparse=sparse, reranker=cross)


async def _bounded(
    items: Sequence[T], work: Callable[[T], Awaitable[R]], advance: Callable[[int], None]
) -> list[R]:
    """``work`` on each item, a few at a time, results in the items' order."""
    gate = asyncio.Semaphore(_CONCURRENCY)

    async def one(item: T) -> R:
        async with gate:
            result = await work(item)
        advance(1)
        return result

    return list(await asyncio.gather(*(one(item) for item in items)))


async def _embed_queries(
    texts: Sequence[str],
    text: TextModel,
    sparse: OnnxBgeM3Embedder | None,
    advance: Callable[[int], None],
) -> tuple[list[Vector], list[SparseWeights]]:
    """The queries' dense vectors and, with a sparse model, their sparse weights, in batches
    (one model call per batch, not one per query; one run for both when BGE-M3 is both)."""
    vectors: list[Vector] = []
    weights: list[SparseWeights] = []
    for start in range(0, len(texts), _QUERY_BATCH):
        batch = texts[start : start + _QUERY_BATCH]
        if sparse is not None and sparse is text:
            dense, lexical = await sparse.encode(batch)
        else:
            dense = await text.embed_texts(batch)
            lexical = [] if sparse is None else await sparse.embed_sparse(batch)
        vectors.extend(dense)
        weights.extend(lexical)
        advance(len(batch))
    return vectors, weights


async def run_literature_eval(
    dataset: str | LiteratureDataset,
    *,
    settings: Settings,
    out_dir: Path | None = None,
    text_model: Path | None = None,
    sparse_model: Path | None = None,
    reranker: Path | None = None,
    rerank_top_n: int | None = None,
    rrf_k: int | None = None,
    depth: int = _DEPTH,
    console: Console | None = None,
) -> LiteratureEval:
    """Index a benchmark's passages in a scratch database, run every leg for every query, and
    write the report.

    Args:
        dataset: ``pubmedqa:FILE`` or ``beir:DIR`` (see :func:`load_dataset`), or a loaded one.
        settings: the deployment's settings: the models folder and configured models, ONNX
            Runtime settings, ``MEDIRAG_DSN`` or the data directory for the scratch database,
            and the defaults of ``rerank_top_n`` and ``rrf_k``.
        out_dir: where the report goes (``<data_dir>/eval`` when ``None``).
        text_model: the dense model's folder (the service's text model when ``None``).
        sparse_model: a BGE-M3 folder for the sparse leg (the text model itself when it is
            BGE-M3; otherwise the sparse legs are reported as not run).
        reranker: a cross-encoder folder (``MEDIRAG_RERANKER`` when ``None``; without one,
            ``hybrid+rerank`` is reported as not run).
        rerank_top_n: fused passages the reranker reorders per query.
        rrf_k: the reciprocal rank fusion constant.
        depth: articles ranked per query and leg (the largest cut-off of the metrics).
        console: where progress bars go (none when ``None``).

    Returns:
        The measurements, with the files written.

    Raises:
        DatasetError: the dataset is unusable.
        ConfigurationError: a model folder is missing, damaged or of the wrong kind.
        SourceUnavailable: the database cannot be reached.
        PlotUnavailable: matplotlib is missing (nothing is computed then).
        OSError: ``out_dir`` cannot be created or written.
        ValueError: ``depth``, ``rerank_top_n`` or ``rrf_k`` below 1.

    Example:
        >>> result = await run_literature_eval(  # doctest: +SKIP
        ...     "pubmedqa:test_set.json", settings=Settings()
        ... )
        >>> result.metrics["dense"]["nDCG@10"]  # doctest: +SKIP
        0.83...
    """
    top_n = settings.rerank_top_n if rerank_top_n is None else rerank_top_n
    fusion_k = settings.rrf_k if rrf_k is None else rrf_k
    for name, value in (("depth", depth), ("rerank_top_n", top_n), ("rrf_k", fusion_k)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    require_plotting()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    data = load_dataset(dataset) if isinstance(dataset, str) else dataset
    timings["load dataset"] = time.perf_counter() - started
    # Before the long work, so that an unwritable folder fails at once.
    reports = out_dir or settings.data_dir / "eval"
    reports.mkdir(parents=True, exist_ok=True)
    by_id = {passage.passage_id: passage for passage in data.passages}
    per_article: dict[str, int] = {}
    for passage in data.passages:
        per_article[passage.pmid] = per_article.get(passage.pmid, 0) + 1
    candidates = min(len(by_id), MAX_EF_SEARCH, depth * max(per_article.values()))
    query_ids = list(data.queries)
    texts = [data.queries[query] for query in query_ids]
    rankings: dict[str, list[list[tuple[Passage, float]]]] = {}
    not_run: dict[str, str] = {}

    async with AsyncExitStack() as stack:
        models = await stack.enter_async_context(
            _open_models(settings, text_model, sparse_model, reranker)
        )
        sparse_id = None if models.sparse is None else models.sparse.model_id
        database = eval_database_name(data, models.text.model_id, sparse_id)
        store = await PgVectorStore.open(
            await stack.enter_async_context(scratch_database(settings, database)),
            image_model=_NO_IMAGE_MODEL,
            image_dim=_NO_IMAGE_DIM,
            text_model=models.text.model_id,
            text_dim=models.text.dimension,
            sparse_model=sparse_id,
        )
        stack.push_async_callback(store.close)
        progress = stack.enter_context(
            Progress(console=console, transient=True, disable=console is None)
        )

        def bar(description: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(description, total=total)
            return lambda n: progress.advance(task, n)

        mark = time.perf_counter()
        ingest = await ingest_passages(
            data.passages,
            text_model=models.text,
            sparse_model=models.sparse,
            index=store,
            batch_size=32,
            on_progress=bar("indexing passages", len(data.passages)),
        )
        timings["index passages"] = time.perf_counter() - mark

        mark = time.perf_counter()
        bm25 = BM25({passage.passage_id: passage.text for passage in data.passages})
        rankings["bm25"] = [
            [(by_id[pid], score) for pid, score in bm25.search(text, candidates)] for text in texts
        ]
        timings["bm25"] = time.perf_counter() - mark

        mark = time.perf_counter()
        vectors, weights = await _embed_queries(
            texts, models.text, models.sparse, bar("embedding queries", len(texts))
        )
        rankings["dense"] = await _bounded(
            vectors,
            lambda vector: _listed(store.nearest_passages(vector, k=candidates)),
            bar("dense search", len(texts)),
        )
        timings["dense"] = time.perf_counter() - mark
        rankings["dense+bm25 (RRF)"] = [
            fuse_passages([dense, lexical], rrf_k=fusion_k)
            for dense, lexical in zip(rankings["dense"], rankings["bm25"], strict=True)
        ]

        if models.sparse is None:
            for leg in ("sparse", "hybrid", "hybrid+rerank"):
                not_run[leg] = "not run: no sparse model given"
        else:
            mark = time.perf_counter()
            rankings["sparse"] = await _bounded(
                weights,
                lambda query: _listed(store.nearest_passages_sparse(query, k=candidates)),
                bar("sparse search", len(texts)),
            )
            timings["sparse"] = time.perf_counter() - mark
            rankings["hybrid"] = [
                fuse_passages([dense, lexical], rrf_k=fusion_k)
                for dense, lexical in zip(rankings["dense"], rankings["sparse"], strict=True)
            ]
            cross = models.reranker
            if cross is None:
                not_run["hybrid+rerank"] = "not run: no reranker given"
            else:
                mark = time.perf_counter()
                rankings["hybrid+rerank"] = await _bounded(
                    list(zip(texts, rankings["hybrid"], strict=True)),
                    lambda pair: rerank_passages(pair[0], pair[1], reranker=cross, top_n=top_n),
                    bar("reranking", len(texts)),
                )
                timings["rerank"] = time.perf_counter() - mark
        model_info = models.info()

    metrics = {
        leg: mean_metrics(
            {
                query: to_documents(ranked, depth)
                for query, ranked in zip(query_ids, rankings[leg], strict=True)
            },
            data.qrels,
        )
        for leg in LEGS
        if leg in rankings
    }
    timings["total"] = time.perf_counter() - started
    result = LiteratureEval(
        dataset=data.name,
        passages=len(data.passages),
        documents=data.documents,
        queries=len(query_ids),
        depth=depth,
        candidates=candidates,
        metrics=metrics,
        not_run=not_run,
        models=model_info,
        database=database,
        ingest=ingest,
        timings=timings,
        rerank_top_n=top_n,
        rrf_k=fusion_k,
    )
    result.files = write_report(result.report(), reports)
    return result


async def _listed(
    search: Awaitable[Sequence[tuple[Passage, float]]],
) -> list[tuple[Passage, float]]:
    return list(await search)
