"""Execution providers are chosen best first and limited to what onnxruntime offers; model
sessions run the precision, options, warm-up and threads their settings and the machine allow."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from adapters.models import session as session_module
from adapters.models.export.parity import min_cosine
from adapters.models.export.precision import INT8_MIN_COSINE
from adapters.models.manifest import ManifestError, load_manifest
from adapters.models.session import (
    PROVIDER_ORDER,
    ModelSession,
    SessionSettings,
    check_signature,
    choose_precision,
    create_session,
    provider_options,
    resolve_providers,
    session_settings,
    trt_profile,
    warmup_feeds,
)
from adapters.models.tokenization import encode_batch, load_tokenizer

TRT, CUDA, CPU = PROVIDER_ORDER
GPU_BUILD = [CPU, CUDA, TRT, "AzureExecutionProvider"]
TEXTS = [
    "Small left pleural effusion.",
    "Right lower lobe consolidation concerning for pneumonia.",
    "Heart failure",
    "Pulmonary edema has improved compared with the previous study. " * 30,
]


def test_auto_orders_tensorrt_cuda_cpu_among_available() -> None:
    assert resolve_providers("auto", available=GPU_BUILD) == [TRT, CUDA, CPU]
    assert resolve_providers("auto", available=[CPU, CUDA]) == [CUDA, CPU]
    assert resolve_providers("AUTO", available=[CPU]) == [CPU]


def test_explicit_preference_keeps_its_order_and_drops_the_unavailable() -> None:
    assert resolve_providers(["cpu", "cuda"], available=GPU_BUILD) == [CPU, CUDA]
    assert resolve_providers("cuda, tensorrt,cpu", available=[CPU, CUDA]) == [CUDA, CPU]
    assert resolve_providers([CUDA, CPU, "cuda"], available=GPU_BUILD) == [CUDA, CPU]


def test_unknown_or_unavailable_providers_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown execution provider 'cdua'"):
        resolve_providers("cdua,cpu", available=GPU_BUILD)
    with pytest.raises(ValueError, match="none of the execution providers"):
        resolve_providers(["cuda", "tensorrt"], available=[CPU])


def test_session_uses_the_best_local_provider_with_full_optimisation(tiny_dir: Path) -> None:
    session = create_session(tiny_dir / "image.onnx", intra_op_threads=1)
    assert session.get_providers()[0] == resolve_providers("auto")[0]
    options = session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == 1
    (out,) = session.run(None, {"pixel_values": np.zeros((2, 3, 224, 224), np.float32)})
    assert out.shape == (2, 64)
    with pytest.raises(ValueError, match="intra_op_threads"):
        create_session(tiny_dir / "image.onnx", intra_op_threads=0)


@pytest.mark.gpu
def test_gpu_provider_is_preferred_when_present(tiny_dir: Path) -> None:
    if CUDA not in ort.get_available_providers():
        pytest.skip("CUDAExecutionProvider is not available (CPU onnxruntime build or no GPU)")
    session = create_session(tiny_dir / "image.onnx")
    assert session.get_providers()[0] in (TRT, CUDA)


# --- The session manager: settings, precision choice, provider options, warm-up. ---


@dataclass(frozen=True)
class Input:
    """Stand-in for onnxruntime's NodeArg: what warmup_feeds reads."""

    name: str
    type: str
    shape: list[int | str | None]


def test_settings_are_validated() -> None:
    assert SessionSettings() == SessionSettings(
        providers="auto", precision="auto", graph_optimization="all", warmup=True, device_id=0
    )
    with pytest.raises(ValueError, match="precision"):
        SessionSettings(precision="bf16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="graph_optimization"):
        SessionSettings(graph_optimization="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="inter_op_threads"):
        SessionSettings(inter_op_threads=0)
    with pytest.raises(ValueError, match="device_id"):
        SessionSettings(device_id=-1)
    with pytest.raises(ValueError, match="not both"):
        session_settings(SessionSettings(), providers="cpu")
    assert session_settings(providers="cpu", intra_op_threads=2) == SessionSettings(
        providers="cpu", intra_op_threads=2
    )


@pytest.mark.parametrize(
    ("preference", "provider", "variants", "expected", "reason"),
    [
        ("auto", CUDA, {"fp16", "int8"}, "fp16", "fp16 variant on a GPU"),
        ("auto", TRT, {"fp16"}, "fp16", "fp16 variant on a GPU"),
        ("auto", CUDA, {"int8"}, "fp32", "no fp16 variant"),
        ("auto", CPU, {"fp16", "int8"}, "fp32", "fp32 on a CPU"),
        ("fp16", CPU, {"fp16"}, "fp32", "runs on the CPU, where fp16 gains nothing"),
        ("fp16", CUDA, set(), "fp32", "no fp16 variant"),
        ("fp16", TRT, {"fp16"}, "fp16", "fp16 requested"),
        ("int8", CPU, {"int8"}, "int8", "int8 requested"),
        ("int8", CPU, set(), "fp32", "no int8 variant"),
        ("int8", CUDA, {"int8", "fp16"}, "fp32", "made for CPU integer kernels"),
        ("fp32", CUDA, {"fp16", "int8"}, "fp32", "fp32 requested"),
    ],
)
def test_precision_follows_the_provider_and_the_variants(
    preference: str, provider: str, variants: set[str], expected: str, reason: str
) -> None:
    precision, why = choose_precision(preference, provider, variants)  # type: ignore[arg-type]
    assert precision == expected
    assert reason in why


def test_tensorrt_options_enable_fp16_the_engine_cache_and_a_shape_profile(tmp_path: Path) -> None:
    profile = trt_profile(
        {"input_ids": ("batch", "sequence"), "attention_mask": ("batch", "sequence")},
        max_batch=16,
        max_length=256,
    )
    ((name, options), (fallback, cuda), (last, cpu)) = provider_options(
        [TRT, CUDA, CPU], precision="fp16", device_id=1, trt_cache_dir=tmp_path, profile=profile
    )
    assert (name, fallback, last) == (TRT, CUDA, CPU)
    assert options == {
        "device_id": "1",
        "trt_fp16_enable": "True",
        "trt_max_workspace_size": str(2 * 1024**3),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(tmp_path),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(tmp_path),
        "trt_profile_min_shapes": "input_ids:1x1,attention_mask:1x1",
        "trt_profile_opt_shapes": "input_ids:16x128,attention_mask:16x128",
        "trt_profile_max_shapes": "input_ids:16x256,attention_mask:16x256",
    }
    assert cuda == {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC"}
    assert cpu == {}


def test_tensorrt_without_cache_or_profile_and_in_fp32() -> None:
    ((_, options),) = provider_options([TRT], precision="fp32")
    assert options == {
        "device_id": "0",
        "trt_fp16_enable": "False",
        "trt_max_workspace_size": str(2 * 1024**3),
    }


def test_profiles_keep_static_axes_and_refuse_unknown_dynamic_ones() -> None:
    assert trt_profile({"pixel_values": ("batch", 3, 224, 224)}, max_batch=8, max_length=77) == {
        "pixel_values": ((1, 3, 224, 224), (8, 3, 224, 224), (8, 3, 224, 224))
    }
    assert trt_profile({"input_ids": ("batch", "sequence")}, max_batch=4, max_length=77) == {
        "input_ids": ((1, 1), (4, 77), (4, 77))
    }
    with pytest.raises(ValueError, match="unknown dynamic axis 'height'"):
        trt_profile({"pixel_values": ("batch", 3, "height", 224)}, max_batch=8, max_length=77)


def test_warmup_feeds_are_one_short_valid_batch() -> None:
    feeds = warmup_feeds(
        [
            Input("input_ids", "tensor(int64)", ["batch", "sequence"]),
            Input("attention_mask", "tensor(int64)", ["batch", None]),
            Input("token_type_ids", "tensor(int64)", [None, "sequence"]),
            Input("pixel_values", "tensor(float)", ["batch", 3, 224, 224]),
        ]
    )
    assert feeds["input_ids"].shape == (1, 8)
    assert (feeds["input_ids"] == 2).all()
    assert feeds["input_ids"].dtype == np.int64
    assert (feeds["attention_mask"] == 1).all()
    assert feeds["attention_mask"].shape == (1, 8)
    assert (feeds["token_type_ids"] == 0).all()
    assert feeds["pixel_values"].shape == (1, 3, 224, 224)
    assert feeds["pixel_values"].dtype == np.float32
    assert not feeds["pixel_values"].any()
    with pytest.raises(ValueError, match="tensor\\(string\\)"):
        warmup_feeds([Input("text", "tensor(string)", ["batch"])])


def test_model_session_on_cpu_runs_fp32_warmed_up_and_counts_runs(tiny_dir: Path) -> None:
    manifest = load_manifest(tiny_dir)
    session = ModelSession(tiny_dir, manifest, "image.onnx", SessionSettings(providers="cpu"))
    assert (session.file, session.precision) == ("image.onnx", "fp32")
    assert "CPU" in session.precision_reason
    assert session.providers == [CPU]
    assert not session.io_binding
    assert session.warmup_seconds is not None
    assert session.warmup_seconds > 0
    assert session.runs == 0
    options = session.session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    (out,) = session.run({"pixel_values": np.zeros((3, 3, 224, 224), np.float32)})
    assert out.shape == (3, 64)
    assert session.runs == 1
    runtime = session.runtime
    assert runtime.graph == "image.onnx"
    assert runtime.providers == (CPU,)
    assert runtime.to_log()["graph_file"] == "image.onnx"


def test_warmup_can_be_disabled_and_levels_and_threads_are_applied(tiny_dir: Path) -> None:
    settings = SessionSettings(
        providers="cpu",
        warmup=False,
        graph_optimization="basic",
        intra_op_threads=1,
        inter_op_threads=2,
    )
    session = ModelSession(tiny_dir, load_manifest(tiny_dir), "text.onnx", settings)
    assert session.warmup_seconds is None
    options = session.session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 2
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    sequential = SessionSettings(providers="cpu", warmup=False, graph_optimization="disabled")
    plain = ModelSession(tiny_dir, load_manifest(tiny_dir), "text.onnx", sequential)
    options = plain.session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


def test_fp16_on_cpu_runs_the_fp32_graph_and_says_why(
    tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = SessionSettings(providers="cpu", precision="fp16", warmup=False)
    with caplog.at_level(logging.WARNING, logger="adapters.models.session"):
        session = ModelSession(tiny_dir, load_manifest(tiny_dir), "text.onnx", settings)
    assert (session.file, session.precision) == ("text.onnx", "fp32")
    assert "fp16 gains nothing" in session.precision_reason
    (record,) = [r for r in caplog.records if r.getMessage() == "precision request not honoured"]
    assert "fp16 gains nothing" in record.precision_reason  # type: ignore[attr-defined]


def test_int8_on_cpu_runs_its_variant_within_its_bound(minilm_dir: Path) -> None:
    manifest = load_manifest(minilm_dir)
    fp32 = ModelSession(minilm_dir, manifest, "model.onnx", SessionSettings(providers="cpu"))
    int8 = ModelSession(
        minilm_dir, manifest, "model.onnx", SessionSettings(providers="cpu", precision="int8")
    )
    assert (int8.file, int8.precision, int8.precision_reason) == (
        "model.int8.onnx",
        "int8",
        "int8 requested",
    )
    tokenizer = load_tokenizer(minilm_dir / "tokenizer.json", max_length=manifest.max_length)
    ids, mask = encode_batch(tokenizer, TEXTS)
    feeds = {"input_ids": ids, "attention_mask": mask}
    (expected,) = fp32.run(feeds)
    (actual,) = int8.run(feeds)
    assert min_cosine(expected, actual) >= INT8_MIN_COSINE
    # It is a different graph: int8 weights do change the numbers.
    assert not np.allclose(expected, actual, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_a_silent_fallback_from_the_gpu_reopens_the_fp32_graph(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if CUDA in ort.get_available_providers():
        pytest.skip("CUDA is available here: onnxruntime would not fall back")
    # Ask for CUDA as if this build offered it: onnxruntime then falls back to the CPU silently.
    monkeypatch.setattr(session_module, "resolve_providers", lambda _preference: [CUDA, CPU])
    session = ModelSession(tiny_dir, load_manifest(tiny_dir), "image.onnx", SessionSettings())
    assert session.requested == [CUDA, CPU]
    assert session.providers == [CPU]
    assert (session.file, session.precision) == ("image.onnx", "fp32")
    assert "fell back to CPUExecutionProvider" in session.precision_reason
    assert not session.io_binding


def test_the_tensorrt_cache_must_lie_outside_the_model_directory(tiny_dir: Path) -> None:
    inside = SessionSettings(providers="cpu", trt_cache_dir=tiny_dir / "engines")
    with pytest.raises(ValueError, match="inside the model directory"):
        ModelSession(tiny_dir, load_manifest(tiny_dir), "image.onnx", inside)
    assert not (tiny_dir / "engines").exists()


def test_a_graph_the_manifest_does_not_list_or_the_check_refuses(tiny_dir: Path) -> None:
    manifest = load_manifest(tiny_dir)
    with pytest.raises(ManifestError, match=r"does not list the graph model\.onnx"):
        ModelSession(tiny_dir, manifest, "model.onnx", SessionSettings(providers="cpu"))
    with pytest.raises(ManifestError, match="graph inputs are"):
        ModelSession(
            tiny_dir,
            manifest,
            "image.onnx",
            SessionSettings(providers="cpu"),
            check=lambda graph: check_signature(
                graph, tiny_dir, inputs=("input_ids",), dimension=64
            ),
        )


@pytest.mark.gpu
def test_cuda_session_binds_inputs_to_the_device(tiny_dir: Path) -> None:
    if CUDA not in ort.get_available_providers():
        pytest.skip("CUDAExecutionProvider is not available (CPU onnxruntime build or no GPU)")
    manifest = load_manifest(tiny_dir)
    cpu = ModelSession(tiny_dir, manifest, "image.onnx", SessionSettings(providers="cpu"))
    gpu = ModelSession(
        tiny_dir, manifest, "image.onnx", SessionSettings(providers="cuda,cpu", precision="fp32")
    )
    assert gpu.providers[0] == CUDA
    assert gpu.io_binding
    assert gpu.warmup_seconds is not None
    pixels = np.random.default_rng(0).standard_normal((5, 3, 224, 224)).astype(np.float32)
    (expected,) = cpu.run({"pixel_values": pixels})
    (actual,) = gpu.run({"pixel_values": pixels})
    assert actual.dtype == np.float32
    assert actual.shape == (5, 64)
    assert min_cosine(expected, actual) >= 0.99999
    assert gpu.runs == 1


@pytest.mark.gpu
def test_tensorrt_session_caches_engines_outside_the_model(tiny_dir: Path, tmp_path: Path) -> None:
    if TRT not in ort.get_available_providers():
        pytest.skip("TensorrtExecutionProvider is not available")
    manifest = load_manifest(tiny_dir)
    settings = SessionSettings(providers="tensorrt,cuda,cpu", trt_cache_dir=tmp_path / "trt")
    session = ModelSession(
        tiny_dir,
        manifest,
        "text.onnx",
        settings,
        shapes={"input_ids": ("batch", "sequence")},
        max_batch=4,
    )
    if session.providers[0] != TRT:
        pytest.skip(f"TensorRT did not initialise here (got {session.providers})")
    assert session.io_binding
    (out,) = session.run({"input_ids": np.full((4, 20), 5, np.int64)})
    assert out.shape == (4, 64)
    cached = [path for path in (tmp_path / "trt").rglob("*") if path.is_file()]
    assert cached, "no TensorRT engine was cached"
    load_manifest(tiny_dir)  # nothing was written into the model directory


def test_the_io_binding_path_runs_with_host_memory(tiny_dir: Path) -> None:
    # The GPU path cannot run here; its binding calls can, with the CPU's memory as the device.
    manifest = load_manifest(tiny_dir)
    plain = ModelSession(tiny_dir, manifest, "text.onnx", SessionSettings(providers="cpu"))
    bound = ModelSession(tiny_dir, manifest, "text.onnx", SessionSettings(providers="cpu"))
    bound.io_binding = True
    bound._binding_device = "cpu"
    ids = np.asfortranarray(np.full((3, 11), 7, np.int64))  # not C-contiguous on purpose
    (expected,) = plain.run({"input_ids": ids})
    (actual,) = bound.run({"input_ids": ids})
    np.testing.assert_array_equal(actual, expected)
    assert bound.runs == 1
