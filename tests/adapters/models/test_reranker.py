"""The exported cross-encoder scores as torch does, and FlashRank loads the same directory offline
and gives the same scores."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from adapters.models.batching import BatcherClosed, BatchSettings
from adapters.models.export.precision import FP16_MIN_COSINE, INT8_MIN_COSINE, output_agreement
from adapters.models.export.reranker import (
    DEFAULT_FLASHRANK_NAME,
    MAX_LOGIT_DIFF,
    export_reranker,
)
from adapters.models.export.tiny_reranker import build_tiny_reranker, write_tiny_reranker_source
from adapters.models.manifest import (
    MANIFEST_NAME,
    ManifestError,
    load_manifest,
    read_manifest,
    save_manifest,
)
from adapters.models.rerank import (
    FLASHRANK_GRAPHS,
    INPUT_NAMES,
    OnnxReranker,
    encode_pair_batch,
    encode_pairs,
    rank_by_score,
    relevance_scores,
)
from adapters.models.session import ModelSession, SessionSettings
from adapters.models.tokenization import TOKENIZER_NAME, load_tokenizer

GRAPH = FLASHRANK_GRAPHS[DEFAULT_FLASHRANK_NAME]
FP16_GRAPH = GRAPH.replace(".onnx", ".fp16.onnx")
INT8_GRAPH = GRAPH.replace(".onnx", ".int8.onnx")
QUERY = "Which drug treats community-acquired pneumonia?"
# None of these is among the exporter's parity passages.
PASSAGES = [
    "Amoxicillin is first-line treatment for community-acquired pneumonia in adults.",
    "Chest radiograph: no acute cardiopulmonary abnormality.",
    "Lobar consolidation of the right lower lobe.",
    "Serum potassium 5.9 mmol/L.",
    "",
    "Pneumonia",
]
LONG = "Bilateral pleural effusions, larger on the right, with basilar atelectasis. " * 60


@pytest.fixture(scope="session")
def reranker_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny reranker's Hugging Face folder, seed 0 (the weights ``reranker_dir`` has)."""
    return write_tiny_reranker_source(tmp_path_factory.mktemp("reranker-source") / "source")


@pytest.fixture(scope="session")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny reranker, seed 0, in a folder named as FlashRank expects it."""
    models = tmp_path_factory.mktemp("reranker-models")
    return build_tiny_reranker(models / DEFAULT_FLASHRANK_NAME, seed=0)


@pytest.fixture(scope="session")
def reranker(reranker_dir: Path) -> OnnxReranker:
    return OnnxReranker(reranker_dir, providers="cpu")


def score(reranker: OnnxReranker, query: str, passages: list[str]) -> np.ndarray:
    return asyncio.run(reranker.score(query, passages))


def _torch_scores(source: Path, query: str, passages: list[str]) -> np.ndarray:
    """What sentence-transformers' CrossEncoder computes, with FlashRank's sigmoid: the Hugging
    Face tokenizer (pairs, longest_first truncation at 512, padding) and the torch model."""
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    model: Any = AutoModelForSequenceClassification.from_pretrained(str(source))
    model.eval()
    batch = tokenizer(
        [query] * len(passages),
        passages,
        padding=True,
        truncation=True,
        max_length=512,
        return_token_type_ids=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**batch).logits
    return torch.sigmoid(logits).flatten().numpy()


def test_manifest_describes_a_random_placeholder_in_flashranks_layout(reranker_dir: Path) -> None:
    manifest = load_manifest(reranker_dir)
    assert manifest.name == "tiny-reranker"
    assert manifest.kind == "reranker"
    assert (manifest.dimension, manifest.max_length, manifest.image_size) == (1, 512, None)
    assert "RANDOM" in manifest.description
    assert "scores mean nothing" in manifest.description
    assert "seed 0" in manifest.source
    assert set(manifest.files) == {
        GRAPH,
        FP16_GRAPH,
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "config.json",
    }
    assert manifest.parity.max_abs_diff is not None
    assert manifest.parity.max_abs_diff <= MAX_LOGIT_DIFF
    assert "ranking identical" in manifest.parity.compared
    assert "flashrank 0.2.10 loads the directory offline" in manifest.parity.compared
    # fp16 only by default: int8 reorders passages (see RERANKER_PRECISIONS).
    assert set(manifest.variants) == {"fp16"}
    fp16 = manifest.variants["fp16"][GRAPH]
    assert fp16.file == FP16_GRAPH
    assert fp16.parity is not None
    assert fp16.parity.min_cosine >= FP16_MIN_COSINE
    assert "ranks 3 of 3 batches as torch does" in fp16.parity.compared
    tokenizer_config = json.loads((reranker_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 512
    assert json.loads((reranker_dir / "config.json").read_text())["pad_token_id"] == 0


def test_graph_names_are_flashranks_own() -> None:
    from flashrank.Config import model_file_map

    assert {name: model_file_map[name] for name in FLASHRANK_GRAPHS} == FLASHRANK_GRAPHS


def test_scores_match_torch_on_pairs_not_seen_at_export(
    reranker: OnnxReranker, reranker_source: Path
) -> None:
    passages = [*PASSAGES, LONG]
    expected = _torch_scores(reranker_source, QUERY, passages)
    actual = score(reranker, QUERY, passages)
    assert actual.dtype == np.float32
    assert actual.shape == (len(passages),)
    # The sigmoid's slope is at most 1/4: logits within MAX_LOGIT_DIFF give scores within a quarter.
    np.testing.assert_allclose(actual, expected, rtol=0, atol=MAX_LOGIT_DIFF / 4)
    assert [i for i, _ in rank_by_score(actual)] == [i for i, _ in rank_by_score(expected)]
    # The placeholder is random, but not constant: the passages get different scores.
    assert len(set(actual.tolist())) == len(passages)


def test_flashrank_loads_the_directory_offline_and_scores_the_same(
    reranker: OnnxReranker, reranker_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flashrank import Ranker, RerankRequest

    class NoNetwork(Exception):
        pass

    def refuse(*args: object, **kwargs: object) -> None:
        raise NoNetwork(f"network use attempted: {args[1:3]}")

    monkeypatch.setattr(requests.sessions.Session, "request", refuse)
    # The guard catches FlashRank's download: a model it does not find makes it try one.
    with pytest.raises(NoNetwork):
        Ranker(model_name="ms-marco-TinyBERT-L-2-v2", cache_dir=str(tmp_path))

    ranker = Ranker(model_name=reranker_dir.name, cache_dir=str(reranker_dir.parent))
    passages = [*PASSAGES, LONG]
    ranked = ranker.rerank(
        RerankRequest(query=QUERY, passages=[{"id": i, "text": p} for i, p in enumerate(passages)])
    )
    ours = asyncio.run(reranker.rerank(QUERY, passages))
    assert [result["id"] for result in ranked] == [index for index, _ in ours]
    np.testing.assert_allclose(
        [float(result["score"]) for result in ranked],
        [value for _, value in ours],
        rtol=0,
        atol=1e-6,
    )
    load_manifest(reranker_dir)  # FlashRank wrote nothing into the directory


def test_tampered_graph_is_refused(reranker_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(reranker_dir, tmp_path / "model"))
    graph = copy / GRAPH
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"sha256 mismatch: flashrank-MiniLM-L-12-v2_Q\.onnx"):
        OnnxReranker(copy)


def test_refuses_a_directory_of_another_kind(reranker_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(reranker_dir, tmp_path / "model"))
    save_manifest(dataclasses.replace(load_manifest(copy), kind="text-embedder"), copy)
    with pytest.raises(ManifestError, match="not 'reranker'"):
        OnnxReranker(copy)


def test_long_passage_is_truncated_and_the_query_kept(
    reranker: OnnxReranker, reranker_dir: Path
) -> None:
    tokenizer = load_tokenizer(reranker_dir / TOKENIZER_NAME, max_length=512)
    ending = " Completely different ending about a wrist fracture."
    input_ids, attention_mask, token_type_ids = encode_pairs(
        tokenizer, QUERY, [LONG, LONG + ending]
    )
    assert input_ids.shape == (2, 512)
    assert attention_mask.all()
    np.testing.assert_array_equal(input_ids[0], input_ids[1])
    query_ids = tokenizer.encode(QUERY).ids  # [CLS] query [SEP], untruncated
    assert input_ids[0, : len(query_ids)].tolist() == query_ids
    assert not token_type_ids[0, : len(query_ids)].any()
    assert token_type_ids[0, len(query_ids) :].all()
    scores = score(reranker, QUERY, [LONG, LONG + ending])
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores[0], scores[1], rtol=0, atol=1e-6)


def test_score_does_not_depend_on_the_batch(reranker: OnnxReranker) -> None:
    alone = score(reranker, QUERY, [PASSAGES[0]])
    batched = score(reranker, QUERY, [PASSAGES[0], LONG, PASSAGES[3]])
    np.testing.assert_allclose(alone[0], batched[0], rtol=0, atol=1e-6)


def test_rerank_orders_best_first_and_keeps_top_n(reranker: OnnxReranker) -> None:
    scores = score(reranker, QUERY, PASSAGES)
    ranked = asyncio.run(reranker.rerank(QUERY, PASSAGES))
    assert sorted(index for index, _ in ranked) == list(range(len(PASSAGES)))
    assert [value for _, value in ranked] == sorted(scores.tolist(), reverse=True)
    assert all(scores[index] == value for index, value in ranked)
    assert asyncio.run(reranker.rerank(QUERY, PASSAGES, top_n=2)) == ranked[:2]
    with pytest.raises(ValueError, match="top_n"):
        asyncio.run(reranker.rerank(QUERY, PASSAGES, top_n=-1))


def test_equal_scores_keep_their_input_order() -> None:
    assert rank_by_score(np.array([0.5, 1.0, 0.5, 1.0], dtype=np.float32)) == [
        (1, 1.0),
        (3, 1.0),
        (0, 0.5),
        (2, 0.5),
    ]
    assert rank_by_score([0.2, 0.9], top_n=0) == []


def test_scores_are_flashranks_sigmoid() -> None:
    logits = np.array([[-200.0], [-2.0], [0.0], [3.5], [40.0]], dtype=np.float32)
    scores = relevance_scores(logits)
    assert scores.dtype == np.float32
    # FlashRank's own expression, on the same float32 logits (exp(200) overflows to inf: score 0).
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(scores, 1 / (1 + np.exp(-logits.flatten())))
    assert scores[0] == 0.0
    assert scores[-1] == 1.0


def test_no_passages_give_no_scores(reranker: OnnxReranker) -> None:
    empty = score(reranker, QUERY, [])
    assert empty.shape == (0,)
    assert empty.dtype == np.float32
    assert asyncio.run(reranker.rerank(QUERY, [])) == []


def test_same_seed_same_files_other_seed_other_model(reranker_dir: Path, tmp_path: Path) -> None:
    first = load_manifest(reranker_dir)
    again = load_manifest(build_tiny_reranker(tmp_path / "again", seed=0))
    other = load_manifest(build_tiny_reranker(tmp_path / "other", seed=1))
    assert again.files == first.files
    assert again.model_id == first.model_id
    assert other.files[GRAPH] != first.files[GRAPH]
    assert other.files[FP16_GRAPH] != first.files[FP16_GRAPH]
    graphs = {GRAPH, FP16_GRAPH}
    assert {name: digest for name, digest in other.files.items() if name not in graphs} == {
        name: digest for name, digest in first.files.items() if name not in graphs
    }
    assert other.model_id != first.model_id


def test_export_refuses_a_folder_named_for_another_flashrank_model(
    reranker_source: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="named for FlashRank's ms-marco-TinyBERT-L-2-v2"):
        export_reranker(reranker_source, tmp_path / "ms-marco-TinyBERT-L-2-v2")
    assert list(tmp_path.iterdir()) == []


def test_parity_max_abs_diff_round_trips_and_old_manifests_stay_valid(
    reranker_dir: Path, tmp_path: Path
) -> None:
    copy = Path(shutil.copytree(reranker_dir, tmp_path / "model"))
    path = copy / MANIFEST_NAME
    raw = json.loads(path.read_text())
    manifest = read_manifest(copy)
    assert manifest.parity.max_abs_diff == raw["parity"]["max_abs_diff"]
    assert manifest.to_json() == raw
    old = {**raw, "parity": {k: v for k, v in raw["parity"].items() if k != "max_abs_diff"}}
    path.write_text(json.dumps(old))
    assert read_manifest(copy).parity.max_abs_diff is None
    assert read_manifest(copy).to_json() == old
    path.write_text(json.dumps({**raw, "parity": {**raw["parity"], "max_abs_diff": "small"}}))
    with pytest.raises(ManifestError, match="max_abs_diff"):
        read_manifest(copy)


def test_concurrent_calls_for_different_queries_share_runs(reranker_dir: Path) -> None:
    reranker = OnnxReranker(
        reranker_dir, providers="cpu", batching=BatchSettings(max_batch=32, max_wait_ms=2.0)
    )
    queries = [f"{QUERY} Case {n}: " + "fever and cough, " * (n % 5) for n in range(16)]
    calls = [(query, [PASSAGES[n % 6], PASSAGES[(n + 2) % 6]]) for n, query in enumerate(queries)]
    alone = [score(reranker, query, passages) for query, passages in calls]

    async def concurrently() -> tuple[list[np.ndarray], int]:
        before = reranker.model_session.runs
        results = await asyncio.gather(*(reranker.score(q, passages) for q, passages in calls))
        return results, reranker.model_session.runs - before

    results, runs = asyncio.run(concurrently())
    assert runs <= 2
    for expected, actual in zip(alone, results, strict=True):
        assert actual.dtype == np.float32
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)
    # Different queries give different scores: each caller got its own.
    assert len({round(float(values[0]), 6) for values in results}) > 8


def test_pairs_of_different_queries_tokenize_as_each_alone(reranker_dir: Path) -> None:
    tokenizer = load_tokenizer(reranker_dir / TOKENIZER_NAME, max_length=512)
    pairs = [(QUERY, PASSAGES[0]), ("Effusion?", LONG), ("Rib", PASSAGES[5])]
    batch = encode_pair_batch(tokenizer, pairs)
    for row, (query, passage) in enumerate(pairs):
        ids, mask, segments = encode_pairs(tokenizer, query, [passage])
        length = ids.shape[1]
        for array, own in zip(batch, (ids, mask, segments), strict=True):
            np.testing.assert_array_equal(array[row, :length], own[0])
            assert not array[row, length:].any()  # padding: pad id 0, mask 0, segment 0


def test_runtime_settings_and_closing(reranker_dir: Path, reranker: OnnxReranker) -> None:
    (graph,) = reranker.runtime.graphs
    assert (graph.graph, graph.file, graph.precision) == (GRAPH, GRAPH, "fp32")
    assert graph.providers == ("CPUExecutionProvider",)
    assert graph.warmup_seconds is not None
    assert reranker.runtime.model_id == reranker.model_id
    with pytest.raises(TypeError, match="strings"):
        score(reranker, QUERY, ["fluid", None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not both"):
        OnnxReranker(reranker_dir, session=SessionSettings(), intra_op_threads=1)
    closing = OnnxReranker(reranker_dir, providers="cpu")
    asyncio.run(closing.aclose())
    with pytest.raises(BatcherClosed):
        score(closing, QUERY, PASSAGES)


@pytest.mark.parametrize(
    ("precision", "reason"),
    [("fp16", "fp16 gains nothing"), ("int8", "the model has no int8 variant")],
)
def test_fp16_and_int8_on_cpu_fall_back_to_fp32_and_say_why(
    reranker_dir: Path, precision: str, reason: str
) -> None:
    settings = SessionSettings(providers="cpu", precision=precision)  # type: ignore[arg-type]
    (graph,) = OnnxReranker(reranker_dir, session=settings).runtime.graphs
    assert (graph.file, graph.precision) == (GRAPH, "fp32")
    assert reason in graph.reason


def test_int8_on_request_runs_on_cpu_within_its_recorded_parity(
    reranker_source: Path, reranker: OnnxReranker, tmp_path: Path
) -> None:
    directory = export_reranker(
        reranker_source,
        tmp_path / DEFAULT_FLASHRANK_NAME,
        name="tiny-reranker",
        precisions=("int8",),
    )
    manifest = load_manifest(directory)
    assert set(manifest.variants) == {"int8"}
    variant = manifest.variants["int8"][GRAPH]
    assert variant.file == INT8_GRAPH
    assert variant.parity is not None
    assert variant.parity.min_cosine >= INT8_MIN_COSINE
    assert variant.parity.max_abs_diff is not None
    # What keeps int8 out of the defaults, recorded: it reorders a parity batch.
    ranked = re.search(r"ranks (\d) of 3 batches as torch does", variant.parity.compared)
    assert ranked is not None
    assert int(ranked.group(1)) < 3
    int8 = OnnxReranker(directory, session=SessionSettings(providers="cpu", precision="int8"))
    (graph,) = int8.runtime.graphs
    assert (graph.file, graph.precision) == (INT8_GRAPH, "int8")
    # Same fp32 graph, same identity, whichever variants were written beside it.
    assert int8.model_id == reranker.model_id
    # Logits on pairs not seen at export, against the fp32 graph.
    tokenizer = load_tokenizer(directory / TOKENIZER_NAME, max_length=512)
    feeds = dict(zip(INPUT_NAMES, encode_pairs(tokenizer, QUERY, [*PASSAGES, LONG]), strict=True))
    fp32 = ModelSession(directory, manifest, GRAPH, SessionSettings(providers="cpu"))
    (expected,) = fp32.run(feeds)
    (actual,) = int8.model_session.run(feeds)
    cosine, difference = output_agreement([expected], [actual])
    assert cosine >= INT8_MIN_COSINE
    assert 1e-3 < difference < 4 * variant.parity.max_abs_diff
    np.testing.assert_allclose(
        score(int8, QUERY, [*PASSAGES, LONG]), relevance_scores(actual), rtol=0, atol=1e-6
    )
