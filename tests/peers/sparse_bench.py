"""The sparse leg's postings table against pgvector's ``sparsevec``: same results, what speed.

The store keeps sparse weights in a postings table (``passage_terms``), the one form the embedded
pgvector 0.6.2 can search. pgvector 0.7 and later also have ``sparsevec``; this measures, on the
Debian PostgreSQL 15 + pgvector 0.8.0 server of :mod:`tests.peers.postgres`, the store's postings
query against an exact ``sparsevec`` scan (which must rank the same) and against HNSW on
``sparsevec`` (approximate: its recall against the exact top k). Passages carry Zipf-distributed
token ids of BGE-M3's vocabulary, as lexical weights do. The test
``tests/adapters/store/test_sparse_vs_sparsevec.py`` runs it small, as a check of the store's
sparse search against pgvector's own inner product.

Run it for the benchmark (``docs/benchmarks.md``), from the repository root after ``make peers``::

    .venv/bin/python -m tests.peers.sparse_bench [--passages 20000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import psycopg

from adapters.store.pgvector_store import PgVectorStore
from core.types import Passage, SparseWeights
from tests.peers.postgres import running_postgres

__all__ = ["SparseComparison", "compare_sparse", "main"]

VOCABULARY = 250_002
"""BGE-M3's vocabulary size (XLM-RoBERTa's)."""

_EXACT = (
    "SELECT passage_id, -(sv <#> %(q)s::sparsevec) FROM passages"
    " ORDER BY sv <#> %(q)s::sparsevec, passage_id LIMIT %(k)s"
)
_APPROXIMATE = "SELECT passage_id FROM passages ORDER BY sv <#> %(q)s::sparsevec LIMIT %(k)s"


@dataclass(frozen=True, slots=True)
class SparseComparison:
    """What :func:`compare_sparse` measured; latencies are client-side per query, in ms."""

    passages: int
    terms_per_passage: int
    queries: int
    k: int
    load_s: float
    postings_p50_ms: float
    postings_p95_ms: float
    exact_p50_ms: float
    exact_p95_ms: float
    identical_rankings: int
    mean_found: float
    """Passages the postings query returned per query, on average (at most ``k``)."""
    max_score_difference: float
    hnsw: dict[int, tuple[float, float, float]]
    """ef_search -> (p50 ms, p95 ms, recall@k against the exact scan)."""


def _weights(rng: np.random.Generator, ranks_to_ids: np.ndarray, terms: int) -> SparseWeights:
    ids: set[int] = set()
    while len(ids) < terms:
        ranks = rng.zipf(1.1, size=2 * terms)
        ids.update(int(ranks_to_ids[r - 1]) for r in ranks if r <= VOCABULARY)
    chosen = sorted(ids)[:terms]
    return dict(zip(chosen, rng.uniform(0.01, 0.4, terms).tolist(), strict=True))


def _sparsevec(weights: SparseWeights) -> str:
    # pgvector's text form: 1-based indices.
    pairs = ",".join(f"{term + 1}:{value}" for term, value in sorted(weights.items()))
    return f"{{{pairs}}}/{VOCABULARY}"


def _timed(
    conn: psycopg.Connection[Any], statement: str, params: Sequence[dict[str, Any]]
) -> tuple[list[list[Any]], list[float]]:
    results, times = [], []
    for values in params:
        start = time.perf_counter()
        results.append(list(conn.execute(statement, values).fetchall()))
        times.append((time.perf_counter() - start) * 1000)
    return results, times


async def _load(dsn: str, sparse: Sequence[SparseWeights], batch: int) -> float:
    dense = np.random.default_rng(1).normal(size=(len(sparse), 8)).astype(np.float32)
    async with await PgVectorStore.open(
        dsn, image_model="i", image_dim=4, text_model="t", text_dim=8, sparse_model="s"
    ) as store:
        start = time.perf_counter()
        for low in range(0, len(sparse), batch):
            high = min(len(sparse), low + batch)
            passages = [Passage(f"{i}:0", str(i), "x") for i in range(low, high)]
            await store.upsert_passages(passages, dense[low:high], sparse[low:high])
        await store.analyze()
        return time.perf_counter() - start


def _postings_rankings(
    dsn: str, queries: Sequence[SparseWeights], k: int
) -> tuple[list[list[tuple[str, float]]], list[float]]:
    """The store's own sparse search, timed per query."""

    async def run() -> tuple[list[list[tuple[str, float]]], list[float]]:
        async with await PgVectorStore.open(
            dsn, image_model="i", image_dim=4, text_model="t", text_dim=8, sparse_model="s"
        ) as store:
            for query in queries[:5]:
                await store.nearest_passages_sparse(query, k=k)
            rankings, times = [], []
            for query in queries:
                start = time.perf_counter()
                found = await store.nearest_passages_sparse(query, k=k)
                times.append((time.perf_counter() - start) * 1000)
                rankings.append([(p.passage_id, score) for p, score in found])
            return rankings, times

    return asyncio.run(run())


def compare_sparse(
    dsn: str,
    *,
    passages: int,
    terms: int = 100,
    queries: int = 200,
    query_terms: int = 8,
    k: int = 30,
    ef_searches: Sequence[int] = (40, 200),
    seed: int = 0,
) -> SparseComparison:
    """Load ``passages`` through the store, then search them by postings and by ``sparsevec``.

    Args:
        dsn: an empty database on a server with pgvector >= 0.7 (it gets the store's tables and
            a ``sparsevec`` column on ``passages``).
        passages: how many passages.
        terms: non-zero weights per passage.
        queries: how many queries, each of ``query_terms`` non-zero weights.
        query_terms: non-zero weights per query.
        k: results per query.
        ef_searches: the HNSW candidate list sizes to measure.
        seed: seed of the generated weights.

    Returns:
        The measurements.
    """
    rng = np.random.default_rng(seed)
    ranks_to_ids = rng.permutation(VOCABULARY)
    sparse = [_weights(rng, ranks_to_ids, terms) for _ in range(passages)]
    asked = [_weights(rng, ranks_to_ids, query_terms) for _ in range(queries)]
    load_s = asyncio.run(_load(dsn, sparse, batch=1000))
    postings, postings_ms = _postings_rankings(dsn, asked, k)
    hnsw: dict[int, tuple[float, float, float]] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE passages ADD COLUMN sv sparsevec({VOCABULARY})")
        conn.execute(
            "UPDATE passages p SET sv = s.v FROM ("
            " SELECT passage_id, ('{' || string_agg((term + 1) || ':' || weight, ','"
            f" ORDER BY term) || '}}/{VOCABULARY}')::sparsevec AS v"
            " FROM passage_terms GROUP BY passage_id) s WHERE s.passage_id = p.passage_id"
        )
        conn.execute("VACUUM ANALYZE passages")
        params = [{"q": _sparsevec(query), "k": k} for query in asked]
        conn.execute("SET enable_indexscan = off")
        _timed(conn, _EXACT, params[:5])
        exact, exact_ms = _timed(conn, _EXACT, params)
        identical, differences = 0, [0.0]
        for found, truth in zip(postings, exact, strict=True):
            # The exact scan also ranks passages that share no term with the query (score 0).
            positive = [(pid, float(score)) for pid, score in truth if score > 0]
            identical += [pid for pid, _ in found] == [pid for pid, _ in positive]
            differences += [abs(a[1] - b[1]) for a, b in zip(found, positive, strict=False)]
        conn.execute("SET enable_indexscan = on")
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("CREATE INDEX passages_sv_hnsw ON passages USING hnsw (sv sparsevec_ip_ops)")
        for ef_search in ef_searches:
            conn.execute("SELECT set_config('hnsw.ef_search', %s, false)", (str(ef_search),))
            _timed(conn, _APPROXIMATE, params[:5])
            approximate, approximate_ms = _timed(conn, _APPROXIMATE, params)
            recall = float(
                np.mean(
                    [
                        len({pid for pid, _ in truth} & {row[0] for row in found}) / len(truth)
                        for found, truth in zip(approximate, postings, strict=True)
                        if truth
                    ]
                )
            )
            p50, p95 = np.percentile(approximate_ms, [50, 95])
            hnsw[ef_search] = (float(p50), float(p95), recall)
    postings_p50, postings_p95 = np.percentile(postings_ms, [50, 95])
    exact_p50, exact_p95 = np.percentile(exact_ms, [50, 95])
    return SparseComparison(
        passages=passages,
        terms_per_passage=terms,
        queries=queries,
        k=k,
        load_s=load_s,
        postings_p50_ms=float(postings_p50),
        postings_p95_ms=float(postings_p95),
        exact_p50_ms=float(exact_p50),
        exact_p95_ms=float(exact_p95),
        identical_rankings=identical,
        mean_found=float(np.mean([len(found) for found in postings])),
        max_score_difference=max(differences),
        hnsw=hnsw,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.peers.sparse_bench [--passages N] [--json]``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--passages", type=int, default=20_000, help="passages to load")
    parser.add_argument("--json", action="store_true", help="print only the figures as JSON")
    args = parser.parse_args(argv)
    with running_postgres() as server:
        result = compare_sparse(server.dsn, passages=args.passages)
    if args.json:
        print(json.dumps(asdict(result), indent=1))
        return 0
    print(
        f"{result.passages} passages x {result.terms_per_passage} terms, {result.queries} "
        f"queries, k={result.k}; loaded in {result.load_s:.1f} s\n"
        f"postings (store): p50 {result.postings_p50_ms:.1f} ms, "
        f"p95 {result.postings_p95_ms:.1f} ms\n"
        f"sparsevec exact:  p50 {result.exact_p50_ms:.1f} ms, p95 {result.exact_p95_ms:.1f} ms; "
        f"identical rankings {result.identical_rankings}/{result.queries}, "
        f"max score difference {result.max_score_difference:.1e}"
    )
    for ef_search, (p50, p95, recall) in result.hnsw.items():
        print(
            f"sparsevec HNSW ef_search {ef_search}: p50 {p50:.1f} ms, p95 {p95:.1f} ms, "
            f"recall@{result.k} {recall:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
