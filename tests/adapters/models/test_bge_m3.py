"""The exported tiny BGE-M3 serves FlagEmbedding's dense vectors and lexical weights through
onnxruntime, and the exporter refuses what FlagEmbedding would silently get wrong."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from adapters.models.batching import BatcherClosed, BatchSettings
from adapters.models.export.bge_m3 import (
    COLBERT_HEAD,
    SPARSE_HEAD,
    SPARSE_TOLERANCE,
    _compare_sparse,
    export_bge_m3,
    load_bge_m3,
)
from adapters.models.export.graph import EXTERNAL_DATA_SUFFIX, _move_graph
from adapters.models.export.parity import MIN_COSINE, ParityError, min_cosine
from adapters.models.export.precision import FP16_MIN_COSINE, INT8_MIN_COSINE
from adapters.models.export.tiny_bge_m3 import (
    CORPUS,
    TINY_NAME,
    build_tiny_bge_m3,
    write_tiny_bge_m3_source,
)
from adapters.models.manifest import (
    ManifestError,
    hash_files,
    load_manifest,
    read_manifest,
    save_manifest,
)
from adapters.models.session import SessionSettings
from adapters.models.sparse_text import OnnxBgeM3Embedder, SparseWeights, lexical_weights
from adapters.models.text import OnnxTextEmbedder
from core.ports import TextEmbedder

pytestmark = pytest.mark.slow

# None of these is among the exporter's parity texts.
LONG = "Stable cardiomegaly without pulmonary edema or pleural effusion. " * 60
NEW_TEXTS = [
    "Heart size is normal.",
    "The lungs are clear. The lungs are clear, and the lungs are expanded.",
    "Interval increase in the right pleural effusion since the prior radiograph.",
    "Ünïcode ✓ and unknown characters ∆ in a report",
    "",
    LONG,
]


@pytest.fixture(scope="session")
def bge_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BGE-M3 source directory, seed 0 (the weights ``bge_dir`` has)."""
    return write_tiny_bge_m3_source(tmp_path_factory.mktemp("bge-m3-source") / "source", seed=0)


@pytest.fixture(scope="session")
def bge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BGE-M3, seed 0, built and exported by the project's code."""
    return build_tiny_bge_m3(tmp_path_factory.mktemp("bge-m3") / "tiny-bge-m3", seed=0)


@pytest.fixture(scope="session")
def flag_model(bge_source: Path) -> Any:
    """FlagEmbedding's own ``BGEM3FlagModel`` on the tiny source: the reference."""
    return load_bge_m3(bge_source)


@pytest.fixture(scope="module")
def embedder(bge_dir: Path) -> OnnxBgeM3Embedder:
    return OnnxBgeM3Embedder(bge_dir, providers="cpu")


def encode(embedder: OnnxBgeM3Embedder, texts: list[str]) -> tuple[np.ndarray, list[SparseWeights]]:
    return asyncio.run(embedder.encode(texts))


def test_manifest_describes_a_tiny_random_placeholder(bge_dir: Path) -> None:
    manifest = load_manifest(bge_dir)
    assert manifest.name == TINY_NAME
    assert manifest.kind == "dense-sparse-text-embedder"
    assert (manifest.dimension, manifest.max_length, manifest.image_size) == (64, 512, None)
    assert "RANDOM placeholder" in manifest.description
    assert "mean nothing" in manifest.description
    assert "seed 0" in manifest.source
    assert set(manifest.files) == {
        "model.onnx",
        "model.fp16.onnx",
        "model.int8.onnx",
        "tokenizer.json",
    }
    for precision, bound in (("fp16", FP16_MIN_COSINE), ("int8", INT8_MIN_COSINE)):
        variant = manifest.variants[precision]["model.onnx"]
        assert variant.file == f"model.{precision}.onnx"
        assert variant.parity is not None
        assert variant.parity.min_cosine >= bound
        assert "both outputs row by row" in variant.parity.compared
    assert manifest.parity.min_cosine >= MIN_COSINE
    assert manifest.parity.max_abs_diff is not None
    assert manifest.parity.max_abs_diff <= SPARSE_TOLERANCE
    compared = re.search(r"(\d+) non-zero weights compared", manifest.parity.compared)
    assert compared is not None
    assert int(compared.group(1)) >= 50
    assert "one truncated at 512 tokens" in manifest.parity.compared
    tokenizer = json.loads((bge_dir / "tokenizer.json").read_text())
    assert tokenizer["padding"]["strategy"] == "BatchLongest"
    assert (tokenizer["padding"]["pad_token"], tokenizer["padding"]["pad_id"]) == ("<pad>", 1)
    assert tokenizer["truncation"]["max_length"] == 512


def test_source_tokenizer_is_the_same_for_transformers_and_tokenizers(bge_source: Path) -> None:
    # FlagEmbedding tokenizes with AutoTokenizer, which rebuilds XLM-R's pipeline from the
    # vocabulary; the service reads tokenizer.json with the tokenizers library.
    hf = AutoTokenizer.from_pretrained(str(bge_source))
    raw = Tokenizer.from_file(str(bge_source / "tokenizer.json"))
    assert type(hf).__name__ == "XLMRobertaTokenizer"
    assert (hf.cls_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    texts = [*CORPUS.read_text(encoding="utf-8").splitlines(), *NEW_TEXTS]
    assert [hf(text)["input_ids"] for text in texts] == [raw.encode(text).ids for text in texts]
    ids = raw.encode("Small left pleural effusion.").ids
    assert raw.id_to_token(ids[0]) == "<s>"
    assert raw.id_to_token(ids[-1]) == "</s>"
    assert hf.decode(ids, skip_special_tokens=True) == "Small left pleural effusion."
    assert hf.unk_token_id in raw.encode("∆").ids


def test_implements_the_text_embedder_port(embedder: OnnxBgeM3Embedder) -> None:
    assert isinstance(embedder, TextEmbedder)
    assert embedder.dimension == 64
    assert embedder.card.name == TINY_NAME
    assert embedder.model_id == embedder.manifest.model_id
    assert re.fullmatch(r"tiny-bge-m3@[0-9a-f]{12}", embedder.model_id)


def test_matches_flagembedding_on_texts_not_seen_at_export(
    embedder: OnnxBgeM3Embedder, flag_model: Any
) -> None:
    assert len(flag_model.tokenizer(LONG)["input_ids"]) > 512
    expected = flag_model.encode(
        NEW_TEXTS, max_length=512, return_dense=True, return_sparse=True, return_colbert_vecs=False
    )
    dense, sparse = encode(embedder, NEW_TEXTS)
    assert dense.shape == (len(NEW_TEXTS), 64)
    assert dense.dtype == np.float32
    assert min_cosine(expected["dense_vecs"], dense) >= MIN_COSINE
    compared = 0
    for reference, ours in zip(expected["lexical_weights"], sparse, strict=True):
        wanted = {int(token): float(weight) for token, weight in reference.items()}
        assert set(ours) == set(wanted)
        for token, weight in wanted.items():
            assert ours[token] > 0
            assert abs(ours[token] - weight) <= SPARSE_TOLERANCE
        compared += len(wanted)
    assert compared >= 40
    # The empty text has only special tokens, which FlagEmbedding never weighs.
    assert sparse[NEW_TEXTS.index("")] == {}


def test_dense_and_sparse_calls_agree_with_encode(embedder: OnnxBgeM3Embedder) -> None:
    texts = NEW_TEXTS[:3]
    dense, sparse = encode(embedder, texts)
    np.testing.assert_array_equal(asyncio.run(embedder.embed_texts(texts)), dense)
    assert asyncio.run(embedder.embed_sparse(texts)) == sparse
    np.testing.assert_allclose(np.linalg.norm(dense, axis=1), 1.0, atol=1e-5)


def test_result_does_not_depend_on_the_batch(embedder: OnnxBgeM3Embedder) -> None:
    text = "Interval increase in the right pleural effusion."
    (alone_dense, (alone_sparse,)) = encode(embedder, [text])
    batch_dense, batch_sparse = encode(embedder, [LONG, text, "Rib fracture."])
    np.testing.assert_allclose(batch_dense[1], alone_dense[0], atol=1e-5)
    assert set(batch_sparse[1]) == set(alone_sparse)
    for token, weight in alone_sparse.items():
        assert batch_sparse[1][token] == pytest.approx(weight, abs=1e-5)


def test_long_texts_are_truncated(embedder: OnnxBgeM3Embedder) -> None:
    dense, sparse = encode(embedder, [LONG, LONG + " A completely different ending about ribs."])
    np.testing.assert_allclose(dense[0], dense[1], atol=1e-6)
    assert sparse[0] == sparse[1]


def test_empty_input_gives_empty_results(embedder: OnnxBgeM3Embedder) -> None:
    vectors = asyncio.run(embedder.embed_texts([]))
    assert vectors.shape == (0, 64)
    assert vectors.dtype == np.float32
    assert asyncio.run(embedder.embed_sparse([])) == []
    dense, sparse = encode(embedder, [])
    assert dense.shape == (0, 64)
    assert sparse == []


def test_lexical_weights_keep_each_tokens_largest_positive_weight() -> None:
    ids = np.array([[0, 7, 9, 7, 5, 2, 1], [0, 9, 2, 1, 1, 1, 1]], dtype=np.int64)
    weights = np.array(
        [[0.0, 0.2, 0.0, 0.5, 0.1, 0.0, 0.0], [0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0]],
        dtype=np.float32,
    )
    result = lexical_weights(ids, weights)
    # The float32 weights, unrounded, as FlagEmbedding keeps them.
    assert result == [
        {7: float(np.float32(0.5)), 5: float(np.float32(0.1))},
        {9: float(np.float32(0.3))},
    ]
    assert all(isinstance(token, int) for row in result for token in row)
    with pytest.raises(ValueError, match="differ in shape"):
        lexical_weights(ids, weights[:, :3])


def test_sparse_parity_refuses_other_tokens_or_weights() -> None:
    reference = [{"7": np.float32(0.5), "9": np.float32(0.25)}]
    assert _compare_sparse(reference, [{7: 0.50001, 9: 0.25}]) == (pytest.approx(1e-5), 2)
    with pytest.raises(ParityError, match=r"only FlagEmbedding weighs \[9\]"):
        _compare_sparse(reference, [{7: 0.5}])
    with pytest.raises(ParityError, match=r"only the export weighs \[4\]"):
        _compare_sparse(reference, [{7: 0.5, 9: 0.25, 4: 0.1}])
    with pytest.raises(ParityError, match=re.escape("max |Δweight| 1.00e-02 > 0.0001")):
        _compare_sparse(reference, [{7: 0.5, 9: 0.26}])


@pytest.mark.parametrize("head", [SPARSE_HEAD, COLBERT_HEAD])
def test_export_refuses_a_source_without_a_head(
    bge_source: Path, tmp_path: Path, head: str
) -> None:
    # Without either file FlagEmbedding would give the sparse head random weights, silently.
    source = Path(shutil.copytree(bge_source, tmp_path / "source"))
    (source / head).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{head} is missing")):
        export_bge_m3(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_export_refuses_a_missing_source_and_a_length_beyond_positions(
    bge_source: Path, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        export_bge_m3(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ValueError, match=r"max_length 513 outside 1\.\.512"):
        export_bge_m3(bge_source, tmp_path / "out", max_length=513)
    assert list(tmp_path.iterdir()) == []


def test_same_seed_same_files_other_seed_other_model(bge_dir: Path, tmp_path: Path) -> None:
    first = load_manifest(bge_dir)
    again = load_manifest(build_tiny_bge_m3(tmp_path / "again", seed=0))
    other = load_manifest(build_tiny_bge_m3(tmp_path / "other", seed=1))
    assert again.files == first.files
    assert again.model_id == first.model_id
    assert other.files["model.onnx"] != first.files["model.onnx"]
    assert other.files["tokenizer.json"] == first.files["tokenizer.json"]
    assert other.model_id != first.model_id


@pytest.fixture
def model_copy(bge_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny BGE-M3 directory that a test may damage."""
    return Path(shutil.copytree(bge_dir, tmp_path / "model"))


def test_tampered_graph_is_refused(model_copy: Path) -> None:
    graph = model_copy / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"sha256 mismatch: model\.onnx"):
        OnnxBgeM3Embedder(model_copy)


def test_other_kinds_are_refused_both_ways(model_copy: Path) -> None:
    with pytest.raises(ManifestError, match="not 'text-embedder'"):
        OnnxTextEmbedder(model_copy)
    manifest = load_manifest(model_copy)
    save_manifest(dataclasses.replace(manifest, kind="text-embedder"), model_copy)
    with pytest.raises(ManifestError, match="not 'dense-sparse-text-embedder'"):
        OnnxBgeM3Embedder(model_copy)


def test_graph_that_breaks_the_manifests_promise_is_refused(model_copy: Path) -> None:
    manifest = load_manifest(model_copy)
    save_manifest(dataclasses.replace(manifest, dimension=32), model_copy)
    with pytest.raises(ManifestError, match=r"graph outputs .* expected dense \[batch, 32\]"):
        OnnxBgeM3Embedder(model_copy)


def test_weights_written_as_separate_files_are_gathered_into_one_data_file(tmp_path: Path) -> None:
    # Past 2 GB (full-size BGE-M3) torch writes every weight as its own file beside the graph.
    weight = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(weight, "w")],
    )
    (tmp_path / "scratch").mkdir()
    onnx.save_model(
        helper.make_model(graph),
        str(tmp_path / "scratch" / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir()) == ["model.onnx", "w"]
    (tmp_path / "out").mkdir()
    _move_graph(tmp_path / "scratch" / "model.onnx", tmp_path / "out" / "model.onnx")
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["model.onnx", "model.onnx" + EXTERNAL_DATA_SUFFIX]
    # Readable by the service like the graph, not private as onnx creates it.
    modes = {(tmp_path / "out" / name).stat().st_mode & 0o777 for name in written}
    assert modes == {(tmp_path / "out" / "model.onnx").stat().st_mode & 0o777}
    x = np.ones((1, 64), dtype=np.float32)
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"))
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weight, rtol=1e-6)


def test_serves_a_graph_with_external_weights_pinned_by_the_manifest(
    model_copy: Path, embedder: OnnxBgeM3Embedder
) -> None:
    graph_path = model_copy / "model.onnx"
    onnx.save_model(
        onnx.load(str(graph_path)),
        str(graph_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx" + EXTERNAL_DATA_SUFFIX,
        size_threshold=0,
    )
    data = model_copy / ("model.onnx" + EXTERNAL_DATA_SUFFIX)
    assert data.stat().st_size > graph_path.stat().st_size
    manifest = read_manifest(model_copy)
    save_manifest(dataclasses.replace(manifest, files=hash_files(model_copy)), model_copy)
    assert set(load_manifest(model_copy).files) == {*manifest.files, data.name}
    texts = NEW_TEXTS[:4]
    dense, sparse = encode(OnnxBgeM3Embedder(model_copy, providers="cpu"), texts)
    expected_dense, expected_sparse = encode(embedder, texts)
    np.testing.assert_allclose(dense, expected_dense, atol=1e-6)
    assert [set(row) for row in sparse] == [set(row) for row in expected_sparse]

    weights = bytearray(data.read_bytes())
    weights[len(weights) // 2] ^= 0x01
    data.write_bytes(bytes(weights))
    with pytest.raises(ManifestError, match=r"sha256 mismatch: model\.onnx\.data"):
        OnnxBgeM3Embedder(model_copy)


def sparse_cosine(expected: SparseWeights, actual: SparseWeights) -> float:
    """Cosine of two texts' lexical weights as vectors over their token ids."""
    tokens = sorted(set(expected) | set(actual))
    a = np.array([expected.get(token, 0.0) for token in tokens])
    b = np.array([actual.get(token, 0.0) for token in tokens])
    if not a.any() and not b.any():
        return 1.0
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_concurrent_calls_share_runs_and_get_their_own_results(bge_dir: Path) -> None:
    embedder = OnnxBgeM3Embedder(
        bge_dir, providers="cpu", batching=BatchSettings(max_batch=32, max_wait_ms=2.0)
    )
    # Lengths from 3 to about 100 tokens: each batch is padded to its longest text.
    texts = [f"Finding {n}: " + "pleural effusion and atelectasis, " * (n % 7) for n in range(16)]
    alone = [encode(embedder, [text]) for text in texts]

    async def concurrently() -> tuple[list[Any], int]:
        before = embedder.model_session.runs
        # The three methods join the same batches: one run computes both heads.
        calls = [
            (embedder.encode, embedder.embed_texts, embedder.embed_sparse)[n % 3]([text])
            for n, text in enumerate(texts)
        ]
        results = await asyncio.gather(*calls)
        return results, embedder.model_session.runs - before

    results, runs = asyncio.run(concurrently())
    assert runs <= 2
    for n, ((dense, (sparse,)), result) in enumerate(zip(alone, results, strict=True)):
        if n % 3 == 0:
            got_dense, (got_sparse,) = result
        elif n % 3 == 1:
            got_dense, got_sparse = result, sparse
        else:
            got_dense, (got_sparse,) = dense, result
        assert got_dense.shape == (1, 64)
        np.testing.assert_allclose(got_dense, dense, atol=1e-5)
        assert set(got_sparse) == set(sparse)
        for token, weight in sparse.items():
            assert got_sparse[token] == pytest.approx(weight, abs=1e-5)


def test_runtime_settings_and_closing(bge_dir: Path, embedder: OnnxBgeM3Embedder) -> None:
    (graph,) = embedder.runtime.graphs
    assert (graph.graph, graph.file, graph.precision) == ("model.onnx", "model.onnx", "fp32")
    assert graph.providers == ("CPUExecutionProvider",)
    assert graph.warmup_seconds is not None
    assert embedder.runtime.model_id == embedder.model_id
    with pytest.raises(TypeError, match="strings"):
        asyncio.run(embedder.embed_sparse(["effusion", 3]))  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not both"):
        OnnxBgeM3Embedder(bge_dir, session=SessionSettings(), providers="cpu")
    closing = OnnxBgeM3Embedder(bge_dir, providers="cpu")
    asyncio.run(closing.aclose())
    with pytest.raises(BatcherClosed):
        encode(closing, ["effusion"])


def test_fp16_on_cpu_falls_back_to_fp32_and_says_why(bge_dir: Path) -> None:
    embedder = OnnxBgeM3Embedder(
        bge_dir, session=SessionSettings(providers="cpu", precision="fp16")
    )
    (graph,) = embedder.runtime.graphs
    assert (graph.file, graph.precision) == ("model.onnx", "fp32")
    assert "fp16 gains nothing" in graph.reason


def test_int8_on_request_stays_within_its_bound(bge_dir: Path, embedder: OnnxBgeM3Embedder) -> None:
    int8 = OnnxBgeM3Embedder(bge_dir, session=SessionSettings(providers="cpu", precision="int8"))
    (graph,) = int8.runtime.graphs
    assert (graph.file, graph.precision, graph.reason) == (
        "model.int8.onnx",
        "int8",
        "int8 requested",
    )
    assert int8.model_id == embedder.model_id
    dense, sparse = encode(int8, NEW_TEXTS)
    expected_dense, expected_sparse = encode(embedder, NEW_TEXTS)
    assert min_cosine(expected_dense, dense) >= INT8_MIN_COSINE
    assert min(map(sparse_cosine, expected_sparse, sparse)) >= INT8_MIN_COSINE
    # It is a different graph: int8 weights do change the numbers.
    assert not np.allclose(expected_dense, dense, atol=1e-4)
