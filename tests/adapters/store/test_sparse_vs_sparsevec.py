"""The store's sparse search (a postings table, which pgvector 0.6 can run) ranks as pgvector's own
``sparsevec`` inner product does, on the PostgreSQL 15 + pgvector 0.8 server: the benchmark of
:mod:`tests.peers.sparse_bench`, run small."""

from __future__ import annotations

import pytest

from tests.peers.sparse_bench import compare_sparse


@pytest.fixture(scope="module")
def deployment() -> str:
    """Only the server has ``sparsevec`` (pgvector >= 0.7)."""
    return "server"


def test_postings_rank_as_an_exact_sparsevec_scan(database: str) -> None:
    result = compare_sparse(
        database, passages=400, terms=30, queries=40, query_terms=6, k=10, ef_searches=(100,)
    )
    assert result.mean_found > 5  # the queries share terms with passages: rankings to compare
    assert result.identical_rankings == result.queries
    assert result.max_score_difference < 1e-5
    p50, p95, recall = result.hnsw[100]
    assert 0 < p50 <= p95
    assert 0.0 <= recall <= 1.0
