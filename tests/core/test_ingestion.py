"""Literature ingestion with sparse weights: one run of a model that gives both, the index gets
what the models gave, and dense-only ingestion writes no sparse weights."""

import numpy as np
import pytest

from core.ingestion import ingest_cases, ingest_passages
from core.types import Passage
from tests.core.doubles import (
    DenseSparseDouble,
    FixedImaging,
    FixedRecords,
    MeanImageModel,
    MemoryCases,
    MemoryLiterature,
    SparseDouble,
    TextDouble,
    word_weights,
)

pytestmark = pytest.mark.anyio

PASSAGES = [
    Passage("1:0", "1", "pleural effusion drainage"),
    Passage("2:0", "2", "tuberculous pleural effusion in adults"),
    Passage("3:0", "3", "rib fracture"),
]


async def test_separate_sparse_model_weights_reach_the_index():
    text_model, sparse_model, index = TextDouble(), SparseDouble(), MemoryLiterature()
    report = await ingest_passages(
        PASSAGES, text_model=text_model, index=index, sparse_model=sparse_model, batch_size=2
    )
    assert (report.indexed, report.already_indexed, report.skipped) == (3, 0, [])
    # Shortest first, as for dense vectors alone.
    assert sparse_model.calls == [["rib fracture", "pleural effusion drainage"], [PASSAGES[1].text]]
    for passage in PASSAGES:
        stored, vector = index.passages[passage.passage_id]
        assert stored == passage
        np.testing.assert_allclose(vector, text_model.vectors([passage.text])[0], rtol=1e-6)
        assert index.sparse[passage.passage_id] == word_weights([passage.text])[0]
    assert all(with_sparse for _, with_sparse in index.upserts)


async def test_one_model_for_both_runs_once_per_batch():
    model, index = DenseSparseDouble(), MemoryLiterature()
    await ingest_passages(PASSAGES, text_model=model, index=index, sparse_model=model, batch_size=2)
    assert model.runs == ["encode", "encode"]
    assert index.sparse == {p.passage_id: word_weights([p.text])[0] for p in PASSAGES}


async def test_dense_only_ingestion_writes_no_sparse_weights():
    model, index = DenseSparseDouble(), MemoryLiterature()
    await ingest_passages(PASSAGES, text_model=model, index=index)
    assert model.runs == ["dense"]
    assert index.sparse == {}
    assert index.upserts == [(["3:0", "1:0", "2:0"], False)]


async def test_sparse_ingestion_resumes():
    sparse_model, index = SparseDouble(), MemoryLiterature()
    await ingest_passages(
        PASSAGES[:2], text_model=TextDouble(), index=index, sparse_model=sparse_model
    )
    seen = []
    again = await ingest_passages(
        PASSAGES,
        text_model=TextDouble(),
        index=index,
        sparse_model=sparse_model,
        on_progress=seen.append,
    )
    assert (again.indexed, again.already_indexed) == (1, 2)
    assert sparse_model.calls[-1] == ["rib fracture"]
    assert seen == [2, 1]
    assert set(index.sparse) == {p.passage_id for p in PASSAGES}


async def test_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        await ingest_passages(
            PASSAGES, text_model=TextDouble(), index=MemoryLiterature(), batch_size=0
        )
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        await ingest_cases(
            [],
            records=FixedRecords(),
            imaging=FixedImaging(),
            image_model=MeanImageModel(),
            index=MemoryCases(),
            batch_size=0,
        )
