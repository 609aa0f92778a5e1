"""Execution providers are chosen best first and limited to what onnxruntime offers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from adapters.models.session import PROVIDER_ORDER, create_session, resolve_providers

TRT, CUDA, CPU = PROVIDER_ORDER
GPU_BUILD = [CPU, CUDA, TRT, "AzureExecutionProvider"]


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
