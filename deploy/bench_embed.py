"""``medirag bench embed``: ONNX Runtime against torch eager, on the same weights, in one run.

Why it exists: the service serves exported ONNX graphs because that is meant to be faster and
lighter than torch; this command measures it. It builds the models it measures (the tiny seeded
models with ``--quick``, the original architectures with random weights otherwise, and the real
all-MiniLM-L6-v2 in both), exports them with the production exporters, and times torch eager and
ONNX Runtime on the same prepared batches of 1, 8 and 32 items. With an NVIDIA GPU and
onnxruntime-gpu it adds the CUDA and TensorRT providers in fp32 and fp16 at batches up to 256, and
the fraction of the GPU's peak FLOP rate reached. Rows that could not be run say so.

Needs the ``export`` extra (torch, open_clip, FlagEmbedding); ``make test`` installs it.
"""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from adapters.models.session import Precision

__all__ = [
    "PEAK_FLOPS",
    "BenchReport",
    "BenchRow",
    "cpu_rows",
    "flop_fraction",
    "gpu_rows",
    "print_report",
    "run_bench",
]

CPU_BATCHES = (1, 8, 32)
GPU_BATCHES = (1, 8, 32, 64, 128, 256)

PEAK_FLOPS = {
    # NVIDIA H200 SXM datasheet, dense tensor-core rates (the sparse figures are twice these).
    "H200": {"fp16": 989.4e12, "fp32": 494.7e12},
}
"""Peak FLOP/s by GPU and precision. fp32 is the TF32 tensor-core rate, which onnxruntime's CUDA
provider uses for fp32 matrix products by default."""


@dataclass(frozen=True, slots=True)
class BenchRow:
    """One engine on one workload at one batch size.

    Args:
        workload: what was measured.
        engine: ``"torch eager"`` or ``"onnxruntime"``.
        provider: the execution provider (``"CPU"``, ``"CUDA"``, ``"TensorRT"``).
        precision: ``"fp32"`` or ``"fp16"``.
        batch: items per run.
        items_per_second: throughput, or ``None`` when not measured.
        ms_per_batch: latency of one run, or ``None``.
        runs: timed runs.
        speedup: onnxruntime's items/s divided by torch eager's at the same batch on the same
            device (``None`` for torch rows and where torch was not measured).
        flop_fraction: share of the GPU's peak FLOP rate reached (GPU rows only).
        note: why a row is not measured, or what is special about it.
    """

    workload: str
    engine: str
    provider: str
    precision: str
    batch: int
    items_per_second: float | None
    ms_per_batch: float | None
    runs: int = 0
    speedup: float | None = None
    flop_fraction: float | None = None
    note: str = ""


@dataclass(slots=True)
class BenchReport:
    """Everything one run measured, and on what.

    Args:
        mode: ``"quick"`` or ``"full"``.
        machine: CPU count, platform, library versions, GPU.
        workloads: per workload: model id, item, FLOPs per item.
        rows: the measurements.
    """

    mode: str
    machine: dict[str, Any]
    workloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: list[BenchRow] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "mode": self.mode,
            "machine": self.machine,
            "workloads": self.workloads,
            "rows": [asdict(row) for row in self.rows],
        }


def flop_fraction(flops_per_item: float, items_per_second: float, peak: float) -> float:
    """The share of ``peak`` FLOP/s that ``items_per_second`` items of ``flops_per_item``
    reach.

    Example:
        >>> round(flop_fraction(35e9, 10_000, 989.4e12), 4)  # ViT-B/16 at 10k images/s
        0.3537
    """
    return flops_per_item * items_per_second / peak


def run_bench(
    *, quick: bool, say: Callable[[str], None] = lambda _: None, work_dir: Path | None = None
) -> BenchReport:
    """Build the models, then time torch eager and ONNX Runtime on each workload.

    Args:
        quick: tiny seeded models, short passages and short timings (a couple of minutes on two
            cores), instead of the original architectures with random weights (tens of
            minutes, and gigabytes of disk in ``work_dir``).
        say: receives progress lines.
        work_dir: where the models are built; a temporary folder when ``None``.

    Returns:
        The report.
    """
    from adapters.models.export.speed import count_flops

    with tempfile.TemporaryDirectory(prefix="medirag-bench-", dir=work_dir) as scratch:
        workloads = _build_workloads(Path(scratch), quick=quick, say=say)
        gpu = _gpu_name()
        report = BenchReport(mode="quick" if quick else "full", machine=_machine(gpu))
        min_seconds = 0.3 if quick else 2.0
        for workload in workloads:
            flops = count_flops(workload)
            report.workloads[workload.name] = {
                "model_id": workload.model_id,
                "item": workload.item,
                "flops_per_item": flops,
            }
            say(f"timing {workload.name}")
            report.rows += cpu_rows(workload, min_seconds)
            report.rows += gpu_rows(workload, gpu, flops, min_seconds, Path(scratch) / "trt")
    return report


def _build_workloads(scratch: Path, *, quick: bool, say: Callable[[str], None]) -> list[Any]:
    from adapters.models.export.bge_m3 import export_bge_m3
    from adapters.models.export.minilm import export_minilm
    from adapters.models.export.open_clip_onnx import export_open_clip
    from adapters.models.export.reranker import export_reranker
    from adapters.models.export.speed import (
        bge_m3_workload,
        clip_workloads,
        minilm_workload,
        reranker_workload,
    )
    from adapters.models.export.tiny import write_tiny_biomedclip_source
    from adapters.models.export.tiny_bge_m3 import write_tiny_bge_m3_source
    from adapters.models.export.tiny_reranker import write_tiny_reranker_source

    size: Literal["tiny", "real"] = "tiny" if quick else "real"
    label = "tiny" if quick else "random"
    words = 48 if quick else 200
    say(f"building the {size} BiomedCLIP-architecture model")
    clip_source = write_tiny_biomedclip_source(scratch / "biomedclip-source", size=size)
    clip_dir = export_open_clip(
        f"local-dir:{clip_source}", scratch / "biomedclip", name=f"{label}-biomedclip"
    )
    say("exporting all-MiniLM-L6-v2")
    minilm_dir = export_minilm(scratch / "minilm")
    say(f"building the {size} BGE-M3-architecture model")
    bge_source = write_tiny_bge_m3_source(scratch / "bge-m3-source", size=size)
    bge_dir = export_bge_m3(bge_source, scratch / "bge-m3", name=f"{label}-bge-m3")
    say(f"building the {size} cross-encoder reranker")
    reranker_source = write_tiny_reranker_source(scratch / "reranker-source", size=size)
    reranker_dir = export_reranker(reranker_source, scratch / "reranker", name=f"{label}-reranker")
    return [
        *clip_workloads(f"local-dir:{clip_source}", clip_dir),
        minilm_workload(minilm_dir, passage_words=words),
        bge_m3_workload(bge_source, bge_dir, passage_words=words),
        reranker_workload(reranker_source, reranker_dir, passage_words=words),
    ]


def _session(workload: Any, settings: Any, max_batch: int) -> Any:
    from adapters.models.manifest import read_manifest
    from adapters.models.session import ModelSession

    feeds = workload.feeds(1)
    shapes = {
        name: ("batch", *(("sequence",) if array.dtype.kind == "i" else array.shape[1:]))
        for name, array in feeds.items()
    }
    return ModelSession(
        workload.directory,
        read_manifest(workload.directory),
        workload.graph,
        settings,
        shapes=shapes,
        max_batch=max_batch,
    )


def cpu_rows(workload: Any, min_seconds: float) -> list[BenchRow]:
    """torch eager and onnxruntime (fp32, and int8 where the model has that variant) on the CPU,
    at each of :data:`CPU_BATCHES`, with onnxruntime's speed-up over torch."""
    from adapters.models.export.speed import time_runs
    from adapters.models.session import SessionSettings

    rows: list[BenchRow] = []
    sessions = {
        precision: _session(workload, SessionSettings(providers="cpu", precision=precision), 32)
        for precision in ("fp32", "int8")
        if precision == "fp32" or _has_variant(workload, precision)
    }
    for batch in CPU_BATCHES:
        feeds = workload.feeds(batch)
        eager = time_runs(partial(workload.torch_forward, feeds), batch, min_seconds=min_seconds)
        rows.append(_row(workload.name, "torch eager", "CPU", "fp32", eager))
        for precision, session in sessions.items():
            timing = time_runs(partial(session.run, feeds), batch, min_seconds=min_seconds)
            speedup = timing.items_per_second / eager.items_per_second
            rows.append(
                _row(workload.name, "onnxruntime", "CPU", precision, timing, speedup=speedup)
            )
    return rows


_GPU_CONFIGURATIONS: tuple[tuple[str, Precision], ...] = (
    ("CUDA", "fp32"),
    ("CUDA", "fp16"),
    ("TensorRT", "fp16"),
)


def gpu_rows(
    workload: Any, gpu: str | None, flops: float, min_seconds: float, trt_cache: Path
) -> list[BenchRow]:
    """onnxruntime's CUDA provider in fp32 and fp16 and TensorRT in fp16 at each of
    :data:`GPU_BATCHES`, with the fraction of the GPU's peak FLOP rate; rows saying "not
    measured" (and why) where there is no GPU or no CUDA provider."""
    from adapters.models.export.speed import time_runs
    from adapters.models.session import SessionSettings

    def unmeasured(provider: str, precision: str, why: str) -> BenchRow:
        return BenchRow(workload.name, "onnxruntime", provider, precision, 0, None, None, note=why)

    if gpu is None or "CUDAExecutionProvider" not in ort.get_available_providers():
        why = (
            "not measured: no NVIDIA GPU here"
            if gpu is None
            else "not measured: this onnxruntime build has no CUDA provider"
        )
        return [unmeasured(p, precision, why) for p, precision in _GPU_CONFIGURATIONS]
    peak = next((rates for name, rates in PEAK_FLOPS.items() if name in gpu), None)
    rows = [
        unmeasured("CUDA", "fp32", "torch eager on GPU not measured: torch here is a CPU build")
    ]
    for provider, precision in _GPU_CONFIGURATIONS:
        settings = SessionSettings(
            providers=provider.lower(), precision=precision, trt_cache_dir=trt_cache
        )
        try:
            session = _session(workload, settings, max(GPU_BATCHES))
        except (ValueError, RuntimeError) as error:
            rows.append(unmeasured(provider, precision, f"not measured: {error}"[:300]))
            continue
        ran = f"ran {session.precision} on {session.providers[0]}"
        for batch in GPU_BATCHES:
            timing = time_runs(
                partial(session.run, workload.feeds(batch)), batch, min_seconds=min_seconds
            )
            fraction = None
            if peak is not None:
                fraction = flop_fraction(flops, timing.items_per_second, peak[session.precision])
            rows.append(
                _row(
                    workload.name,
                    "onnxruntime",
                    provider,
                    precision,
                    timing,
                    flop_fraction=fraction,
                    note="" if session.precision == precision else ran,
                )
            )
    return rows


def _has_variant(workload: Any, precision: str) -> bool:
    from adapters.models.manifest import read_manifest

    variants = read_manifest(workload.directory).variants
    return workload.graph in variants.get(precision, {})


def _row(
    workload: str, engine: str, provider: str, precision: str, timing: Any, **extra: Any
) -> BenchRow:
    return BenchRow(
        workload=workload,
        engine=engine,
        provider=provider,
        precision=precision,
        batch=timing.batch,
        items_per_second=timing.items_per_second,
        ms_per_batch=timing.ms_per_batch,
        runs=timing.runs,
        **extra,
    )


def _gpu_name() -> str | None:
    """The first NVIDIA GPU's name, from the driver; ``None`` without one."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(  # noqa: S603
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.splitlines() if line.strip()]
    return names[0] if names else None


def _machine(gpu: str | None) -> dict[str, Any]:
    import importlib.metadata

    from adapters.models.export.speed import torch_threads

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "torch": importlib.metadata.version("torch"),
        "torch_threads": torch_threads(),
        "gpu": gpu or "none",
    }


def print_report(report: BenchReport, *, out: Console) -> None:
    """The report as one table per workload."""
    machine = report.machine
    out.print(
        f"{report.mode} run; {machine['cpu_count']} CPU cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), onnxruntime {machine['onnxruntime']}, "
        f"GPU: {machine['gpu']}"
    )
    for name, info in report.workloads.items():
        table = Table(
            title=f"{name} ({info['model_id']}); one item: {info['item']}, "
            f"{info['flops_per_item'] / 1e9:.2f} GFLOP",
            title_justify="left",
        )
        for column in ("engine", "provider", "precision"):
            table.add_column(column)
        for column in ("batch", "items/s", "ms/batch", "ORT/torch", "of peak FLOP/s"):
            table.add_column(column, justify="right")
        for row in (r for r in report.rows if r.workload == name):
            measured = row.items_per_second is not None and row.ms_per_batch is not None
            table.add_row(
                row.engine,
                row.provider,
                row.precision,
                str(row.batch) if row.batch else "",
                f"{row.items_per_second:,.1f}" if row.items_per_second is not None else row.note,
                f"{row.ms_per_batch:,.1f}" if measured and row.ms_per_batch is not None else "",
                f"{row.speedup:.2f}x" if row.speedup is not None else "",
                f"{row.flop_fraction:.1%}" if row.flop_fraction is not None else "",
            )
        out.print(table)
