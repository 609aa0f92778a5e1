"""Precision variants: written beside the fp32 graphs at export, measured against torch, refused
below their bounds, pinned by the manifest, and chosen by the session manager."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from adapters.models.clip import OnnxClipEmbedder
from adapters.models.export import precision as precision_module
from adapters.models.export.parity import ParityError, min_cosine
from adapters.models.export.precision import (
    FP16_MIN_COSINE,
    INT8_MIN_COSINE,
    by_precision,
    output_agreement,
    variant_name,
    write_precision_variants,
)
from adapters.models.manifest import (
    MANIFEST_NAME,
    ManifestError,
    hash_files,
    load_manifest,
    read_manifest,
)
from adapters.models.session import ModelSession, SessionSettings
from adapters.models.tokenization import encode_batch, load_tokenizer

TINY_GRAPHS = ("image.onnx", "text.onnx")
TEXTS = [
    "Small left pleural effusion.",
    "No acute cardiopulmonary abnormality.",
    "Right lower lobe consolidation concerning for pneumonia, with a small effusion.",
    "Heart failure",
    "Cardiomegaly. " * 100,
]


@pytest.fixture
def model_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model directory that a test may alter."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


def small_graph(path: Path, *, external: bool = False, seed: int = 0) -> Path:
    """A two-MatMul graph: a 2-D weight, then a 3-D one (batched), which onnxruntime cannot run
    per-channel quantised (microsoft/onnxruntime#25489)."""
    rng = np.random.default_rng(seed)
    first = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32) / 3, "w1")
    second = numpy_helper.from_array(rng.standard_normal((4, 16, 16)).astype(np.float32) / 4, "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="batched"),
        ],
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 3, 16])],
        [first, second],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=0,
    )
    return path


def small_feeds(seed: int = 1) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((n, 4, 3, 8)).astype(np.float32)} for n in (3, 1)]


def test_variant_files_are_named_after_their_graph() -> None:
    assert variant_name("text.onnx", "int8") == "text.int8.onnx"
    assert variant_name("model.onnx", "fp16") == "model.fp16.onnx"


def test_outputs_are_compared_by_rows_or_as_one_vector() -> None:
    rows = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert output_agreement([rows], [rows * 3]) == (pytest.approx(1.0), pytest.approx(4.0))
    tilted = np.array([[1.0, 0.0], [1.0, 1.0]])
    assert output_agreement([rows], [tilted])[0] == pytest.approx(2**-0.5)
    # One value per row (a reranker's logits): the batch is one vector.
    logits = np.array([[2.0], [-1.0], [0.5]])
    assert output_agreement([logits], [logits + 0.01])[0] > 0.9999
    assert output_agreement([logits], [-logits])[0] == pytest.approx(-1.0)
    # Rows of zeros agree with zeros only.
    zeros = np.zeros((2, 3))
    assert output_agreement([zeros], [zeros])[0] == 1.0
    assert output_agreement([zeros], [np.ones((2, 3))])[0] == 0.0
    with pytest.raises(ValueError, match="cannot be compared"):
        output_agreement([rows], [rows[:1]])


def test_the_exported_tiny_model_carries_measured_variants(tiny_dir: Path) -> None:
    manifest = load_manifest(tiny_dir)
    assert set(manifest.variants) == {"fp16", "int8"}
    for precision, bound in (("fp16", FP16_MIN_COSINE), ("int8", INT8_MIN_COSINE)):
        assert set(manifest.variants[precision]) == set(TINY_GRAPHS)
        for graph, variant in manifest.variants[precision].items():
            assert variant.file == variant_name(graph, precision)
            assert variant.file in manifest.files
            assert variant.parity is not None, variant.not_measured
            assert variant.parity.min_cosine >= bound
            assert variant.parity.compared.startswith(f"torch eager vs the {precision} graph")
    assert manifest.variant_files == {
        variant_name(graph, precision) for graph in TINY_GRAPHS for precision in ("fp16", "int8")
    }


def test_the_exported_minilm_carries_measured_variants(minilm_dir: Path) -> None:
    manifest = load_manifest(minilm_dir)
    fp16 = manifest.variants["fp16"]["model.onnx"]
    int8 = manifest.variants["int8"]["model.onnx"]
    assert (fp16.file, int8.file) == ("model.fp16.onnx", "model.int8.onnx")
    assert fp16.parity is not None
    assert int8.parity is not None
    assert fp16.parity.min_cosine >= FP16_MIN_COSINE
    assert INT8_MIN_COSINE <= int8.parity.min_cosine < fp16.parity.min_cosine
    assert "per-channel 7-bit int8 weights" in int8.parity.compared


def test_the_model_id_is_the_fp32_identity(model_copy: Path) -> None:
    with_variants = load_manifest(model_copy)
    raw = json.loads((model_copy / MANIFEST_NAME).read_text())
    for name in with_variants.variant_files:
        (model_copy / name).unlink()
        del raw["files"][name]
    del raw["variants"]
    (model_copy / MANIFEST_NAME).write_text(json.dumps(raw))
    without = load_manifest(model_copy)
    assert without.variants == {}
    assert "variants" not in without.to_json()
    assert without.model_id == with_variants.model_id


def test_a_manifest_with_variants_round_trips(model_copy: Path) -> None:
    manifest = load_manifest(model_copy)
    assert read_manifest(model_copy) == manifest
    written = json.loads((model_copy / MANIFEST_NAME).read_text())
    assert written == manifest.to_json()
    assert written["variants"]["int8"]["text.onnx"]["file"] == "text.int8.onnx"


def test_a_tampered_variant_file_is_refused(model_copy: Path) -> None:
    variant = model_copy / "text.int8.onnx"
    data = bytearray(variant.read_bytes())
    data[len(data) // 2] ^= 0x01
    variant.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"sha256 mismatch: text\.int8\.onnx"):
        load_manifest(model_copy)
    with pytest.raises(ManifestError, match="sha256 mismatch"):
        OnnxClipEmbedder(model_copy, providers="cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["variants"].update(bf16={}), "unknown variant precision 'bf16'"),
        (lambda m: m["files"].pop("text.int8.onnx"), "text.int8.onnx not in files"),
        (
            lambda m: m["variants"]["int8"].update(
                {"extra.onnx": m["variants"]["int8"]["text.onnx"]}
            ),
            "a graph in files",
        ),
        # A variant's file is left out of the model's identity: no other file may pose as one.
        (
            lambda m: m["variants"]["fp16"]["text.onnx"].update(file="image.onnx"),
            "the variant must be text.fp16.onnx",
        ),
        (
            lambda m: m["variants"]["fp16"]["text.onnx"].update(external_data=["tokenizer.json"]),
            "the variant must be text.fp16.onnx",
        ),
        (
            lambda m: m["variants"]["fp16"]["text.onnx"].update(parity=None),
            "either a parity or the reason",
        ),
        (
            lambda m: m["variants"]["fp16"]["text.onnx"].update(parity={"min_cosine": 1}),
            "needs 'compared'",
        ),
    ],
)
def test_invalid_variant_entries_are_refused(model_copy: Path, change: Any, message: str) -> None:
    path = model_copy / MANIFEST_NAME
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=message):
        read_manifest(model_copy)


def test_variants_are_written_measured_and_listed(tmp_path: Path) -> None:
    graph = small_graph(tmp_path / "model" / "small.onnx")
    written = write_precision_variants(graph, small_feeds(), inputs="two random batches")
    assert set(written) == {"fp16", "int8"}
    assert sorted(hash_files(graph.parent)) == ["small.fp16.onnx", "small.int8.onnx", "small.onnx"]
    fp16, int8 = written["fp16"], written["int8"]
    assert fp16.parity is not None
    assert int8.parity is not None
    assert fp16.parity.min_cosine >= FP16_MIN_COSINE
    assert int8.parity.min_cosine >= INT8_MIN_COSINE
    assert fp16.parity.compared.startswith(
        "the fp32 graph on onnxruntime CPU vs the fp16 graph on onnxruntime CPU, two random"
    )
    # The known per-channel issue: the 3-D weight's MatMul stays in fp32, and the variant runs.
    assert "1 MatMul(s) with weights not 2-D kept in fp32" in int8.parity.compared
    quantised = onnx.load(str(graph.parent / "small.int8.onnx"))
    assert "batched" in {node.name for node in quantised.graph.node}
    assert by_precision({"small.onnx": written}) == {
        "fp16": {"small.onnx": fp16},
        "int8": {"small.onnx": int8},
    }
    with pytest.raises(ValueError, match="already exists"):
        write_precision_variants(graph, small_feeds(), precisions=("fp16",))


def test_variants_of_a_graph_with_external_data_keep_external_data(tmp_path: Path) -> None:
    graph = small_graph(tmp_path / "model" / "big.onnx", external=True)
    written = write_precision_variants(graph, small_feeds())
    assert written["fp16"].external_data == ("big.fp16.onnx.data",)
    assert written["int8"].external_data == ("big.int8.onnx.data",)
    assert sorted(path.name for path in graph.parent.iterdir()) == [
        "big.fp16.onnx",
        "big.fp16.onnx.data",
        "big.int8.onnx",
        "big.int8.onnx.data",
        "big.onnx",
        "big.onnx.data",
    ]
    session = ort.InferenceSession(
        str(graph.parent / "big.fp16.onnx"), providers=["CPUExecutionProvider"]
    )
    (out,) = session.run(None, small_feeds()[0])
    assert out.dtype == np.float32  # the service still feeds and receives float32


def test_a_variant_below_its_bound_is_refused_and_removed(tmp_path: Path) -> None:
    graph = small_graph(tmp_path / "model" / "small.onnx")
    other = ort.InferenceSession(
        str(small_graph(tmp_path / "other" / "small.onnx", seed=7)),
        providers=["CPUExecutionProvider"],
    )
    with pytest.raises(ParityError, match=r"small\.int8\.onnx: min cosine .* < 0\.98"):
        write_precision_variants(
            graph,
            small_feeds(),
            reference=lambda feeds: other.run(None, dict(feeds)),
            precisions=("int8",),
        )
    assert sorted(path.name for path in graph.parent.iterdir()) == ["small.onnx"]
    with pytest.raises(ValueError, match="unknown precision"):
        write_precision_variants(graph, small_feeds(), precisions=("int4",))


def test_a_variant_the_cpu_cannot_run_is_recorded_as_not_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = small_graph(tmp_path / "model" / "small.onnx")
    reference = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    real = precision_module.create_session

    def no_fp16_kernels(path: Path, **options: Any) -> ort.InferenceSession:
        if Path(path).name.endswith(".fp16.onnx"):
            raise precision_module.ort_errors.NotImplemented("Could not find an implementation")
        return real(path, **options)

    monkeypatch.setattr(precision_module, "create_session", no_fp16_kernels)
    written = write_precision_variants(
        graph, small_feeds(), reference=lambda feeds: reference.run(None, dict(feeds))
    )
    fp16 = written["fp16"]
    assert fp16.parity is None
    assert fp16.not_measured is not None
    assert "not measured: onnxruntime CPU cannot run it" in fp16.not_measured
    assert (graph.parent / "small.fp16.onnx").is_file()
    assert written["int8"].parity is not None


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["tiny-image", "tiny-text", "minilm"])
def test_fp16_on_the_gpu_stays_within_its_bound(
    which: str, tiny_dir: Path, minilm_dir: Path
) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("CUDAExecutionProvider is not available (CPU onnxruntime build or no GPU)")
    directory = minilm_dir if which == "minilm" else tiny_dir
    graph = {"tiny-image": "image.onnx", "tiny-text": "text.onnx", "minilm": "model.onnx"}[which]
    manifest = load_manifest(directory)
    if which == "tiny-image":
        pixels = np.random.default_rng(0).standard_normal((6, 3, 224, 224))
        feeds: dict[str, Any] = {"pixel_values": pixels.astype(np.float32)}
    else:
        tokenizer = load_tokenizer(directory / "tokenizer.json", max_length=manifest.max_length)
        ids, mask = encode_batch(tokenizer, TEXTS)
        feeds = (
            {"input_ids": ids, "attention_mask": mask} if which == "minilm" else {"input_ids": ids}
        )
    cpu = ModelSession(directory, manifest, graph, SessionSettings(providers="cpu"))
    gpu = ModelSession(
        directory, manifest, graph, SessionSettings(providers="cuda,cpu", precision="fp16")
    )
    assert gpu.providers[0] == "CUDAExecutionProvider"
    assert (gpu.precision, gpu.file) == ("fp16", variant_name(graph, "fp16"))
    assert gpu.io_binding
    (expected,) = cpu.run(feeds)
    (actual,) = gpu.run(feeds)
    assert actual.dtype == np.float32
    assert min_cosine(expected, actual) >= FP16_MIN_COSINE
