"""``medirag bench embed`` measures what it says: torch eager and onnxruntime on the same weights
and the same batches, the ratio between them, and "not measured" rows where there is no GPU.

No timing is asserted: the figures live in docs/benchmarks.md with the command that made them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from rich.console import Console

from adapters.models.export.speed import Workload, clip_workloads, count_flops, minilm_workload
from adapters.models.export.tiny import write_tiny_biomedclip_source
from adapters.models.manifest import read_manifest
from adapters.models.session import ModelSession, SessionSettings
from deploy.bench_embed import CPU_BATCHES, BenchReport, cpu_rows, gpu_rows, print_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workloads(
    tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, minilm_dir: Path
) -> list[Workload]:
    # Seed 0 writes the weights tiny_dir was exported from.
    tiny_source = write_tiny_biomedclip_source(tmp_path_factory.mktemp("bench") / "source")
    return [*clip_workloads(f"local-dir:{tiny_source}", tiny_dir), minilm_workload(minilm_dir)]


def test_both_engines_compute_the_same_embeddings_from_the_same_feeds(
    workloads: list[Workload],
) -> None:
    for workload in workloads:
        feeds = workload.feeds(3)
        expected = np.asarray(workload.torch_forward(feeds))
        session = ModelSession(
            workload.directory,
            read_manifest(workload.directory),
            workload.graph,
            SessionSettings(providers="cpu", precision="fp32", warmup=False),
        )
        (actual,) = session.run(feeds)
        cosine = (expected * actual).sum(axis=1) / (
            np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1)
        )
        assert expected.shape == (3, session.session.get_outputs()[0].shape[1])
        assert cosine.min() >= 0.9999, workload.name
        assert count_flops(workload) > 0


def test_cpu_rows_pair_torch_and_onnxruntime_at_each_batch(workloads: list[Workload]) -> None:
    image = workloads[0]
    rows = cpu_rows(image, min_seconds=0.0)
    torch_rows = {row.batch: row for row in rows if row.engine == "torch eager"}
    assert sorted(torch_rows) == list(CPU_BATCHES)
    onnx = [row for row in rows if row.engine == "onnxruntime"]
    # fp32 always, int8 because the tiny model's export writes that variant.
    assert {(row.precision, row.batch) for row in onnx} == {
        (precision, batch) for precision in ("fp32", "int8") for batch in CPU_BATCHES
    }
    for row in onnx:
        reference: Any = torch_rows[row.batch].items_per_second
        assert row.items_per_second is not None
        assert row.runs >= 2
        assert row.speedup == pytest.approx(row.items_per_second / reference)


def test_without_a_gpu_the_gpu_rows_say_not_measured(workloads: list[Workload]) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has a CUDA provider")
    rows = gpu_rows(workloads[1], None, 1.0, 0.0, Path("/nonexistent"))
    assert {(row.provider, row.precision) for row in rows} == {
        ("CUDA", "fp32"),
        ("CUDA", "fp16"),
        ("TensorRT", "fp16"),
    }
    assert all(row.items_per_second is None for row in rows)
    assert all(row.note.startswith("not measured") for row in rows)


def test_the_report_prints_every_row(workloads: list[Workload]) -> None:
    text = workloads[1]
    report = BenchReport(mode="quick", machine={"cpu_count": 2, "torch": "t", "torch_threads": 2})
    report.machine |= {"onnxruntime": ort.__version__, "gpu": "none"}
    report.workloads[text.name] = {
        "model_id": text.model_id,
        "item": text.item,
        "flops_per_item": 1e9,
    }
    report.rows += cpu_rows(text, min_seconds=0.0)
    report.rows += gpu_rows(text, None, 1e9, 0.0, Path("/nonexistent"))
    console = Console(record=True, width=200)
    print_report(report, out=console)
    printed = console.export_text()
    assert text.model_id in printed
    assert printed.count("torch eager") == len(CPU_BATCHES)
    assert printed.count("not measured") == 3
    assert report.to_json()["rows"][0]["engine"] == "torch eager"
