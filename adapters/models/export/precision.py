"""Precision variants of an exported graph: fp16 for GPUs, int8 for CPUs, each measured.

Why it exists: an fp32 graph is the reference, but it is not the fastest way to serve a model. On
an NVIDIA GPU an fp16 copy runs on the tensor cores at about half the memory; on a CPU a copy with
int8 weights (dynamic quantisation) runs several times faster (MiniLM on 2 AVX2 cores: 0.20 s
against 0.74 s for 5 texts). Both change the numbers, so neither is accepted on trust: each
variant is written next to its fp32 graph at export, run on the parity inputs the exporter already
uses, compared with the original model's outputs, and refused below its bound. The manifest
records each variant's file and measured parity (:class:`adapters.models.manifest.GraphVariant`);
:class:`adapters.models.session.ModelSession` picks one at serving time.

Files written, for a graph ``<stem>.onnx``:

* ``<stem>.fp16.onnx``: onnxruntime's float16 converter with ``keep_io_types``, so the service
  still feeds and receives float32 (casts at the edges of the graph);
* ``<stem>.int8.onnx``: ``quantize_dynamic`` with per-channel int8 weights in 7 bits
  (``reduce_range``): on CPUs without VNNI the 8-bit products saturate (the tiny image tower
  measured 0.977 without it, 0.9995 with it), and an integer graph computes the same on any CPU;
* ``<name>.data`` beside a variant when its fp32 graph keeps its weights in external data (graphs
  over protobuf's 2 GB limit; fp16 halves the size, but the layout stays the same as the
  original's).

fp16 parity is measured on onnxruntime's CPU provider, which runs the fp16 operators it has no
fp16 kernel for in fp32 behind inserted casts: the measurement covers the rounding of weights and
activations to fp16, not a GPU's fp16 arithmetic, which the GPU-marked tests measure. Where the CPU
cannot run a variant at all, its parity is recorded as not measured.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from adapters.models.export.graph import EXTERNAL_DATA_SUFFIX
from adapters.models.export.parity import ParityError
from adapters.models.manifest import VARIANT_PRECISIONS, GraphVariant, Parity
from adapters.models.session import create_session

__all__ = [
    "DEFAULT_PRECISIONS",
    "FP16_MIN_COSINE",
    "INT8_MIN_COSINE",
    "MIN_COSINE_BY_PRECISION",
    "Feeds",
    "Reference",
    "by_precision",
    "output_agreement",
    "variant_name",
    "write_precision_variants",
]

logger = logging.getLogger(__name__)

FP16_MIN_COSINE = 0.999
"""Smallest acceptable cosine between an original output and its fp16 variant's. Measured against
torch on onnxruntime CPU: 0.9999992 (MiniLM), 0.9999998 and 0.9999997 (tiny image and text
towers). fp16 keeps 11 significant bits, so a correct conversion stays far above the bound, while
an overflow to infinity or a wrongly converted operator falls far below it; 0.999 leaves room for
a GPU's fp16 arithmetic (accumulation order, fused kernels) on models deeper than those measured."""

INT8_MIN_COSINE = 0.98
"""Smallest acceptable cosine between an original output and its int8 variant's. Measured against
torch: 0.9899 (MiniLM, the worst of its 8 parity texts in 3 batches), 0.9994 (tiny image tower),
0.9998 (tiny text tower). The bound refuses the failures measured on the way: per-tensor weights
(MiniLM 0.70) and 8-bit products that saturate on AVX2 (tiny image tower 0.977). At 0.99 a
nearest-neighbour list mostly keeps its order, but not exactly, which is why int8 runs only when
asked for (``precision="int8"``), never under ``"auto"``."""

MIN_COSINE_BY_PRECISION = {"fp16": FP16_MIN_COSINE, "int8": INT8_MIN_COSINE}
"""The bound of each precision."""

DEFAULT_PRECISIONS = ("fp16", "int8")
"""The variants the exporters write unless told otherwise."""

Feeds = Mapping[str, npt.NDArray[Any]]
"""One batch of graph inputs, by input name."""

Reference = Callable[[Feeds], Sequence[npt.ArrayLike]]
"""Computes the original model's outputs for one batch of inputs, in the graph's output order."""

# Kept in fp32 besides onnxruntime's default list: none needed for the exported embedders, whose
# operators (MatMul, LayerNormalization, Softmax, Erf, ReduceL2, Conv) all have fp16 kernels on
# CUDA and TensorRT; this is where an operator that overflows in fp16 would be added.
_FP16_EXTRA_BLOCKED: tuple[str, ...] = ()
_TWO_GB = 2**31
# What onnxruntime raises when it cannot load or run a graph (missing kernels, refused inputs).
_ORT_ERRORS: tuple[type[Exception], ...] = (
    ort_errors.Fail,
    ort_errors.NotImplemented,
    ort_errors.InvalidGraph,
    ort_errors.InvalidArgument,
    ort_errors.RuntimeException,
    ort_errors.EPFail,
)


def variant_name(graph: str, precision: str) -> str:
    """The file name of a graph's variant.

    Example:
        >>> variant_name("image.onnx", "fp16")
        'image.fp16.onnx'
    """
    stem = graph.removesuffix(".onnx")
    return f"{stem}.{precision}.onnx"


def output_agreement(
    expected: Sequence[npt.ArrayLike], actual: Sequence[npt.ArrayLike]
) -> tuple[float, float]:
    """How closely two runs' outputs agree: ``(min cosine, max absolute difference)``.

    Each output is compared row by row (one row per batch item) when its rows hold several values
    (embeddings, token weights), and as one vector over the batch when they hold one value each
    (a reranker's logits). Two all-zero rows agree (cosine 1); a zero row against a non-zero one
    does not (cosine 0).

    Raises:
        ValueError: the outputs differ in number or shape.

    Example:
        >>> output_agreement([[[1.0, 0.0]]], [[[1.0, 0.0]]])
        (1.0, 0.0)
    """
    if len(expected) != len(actual):
        raise ValueError(f"{len(expected)} expected outputs, {len(actual)} actual")
    worst, largest = 1.0, 0.0
    for want, got in zip(expected, actual, strict=True):
        a = np.asarray(want, dtype=np.float64)
        b = np.asarray(got, dtype=np.float64)
        if a.shape != b.shape or a.size == 0:
            raise ValueError(f"outputs of shapes {a.shape} and {b.shape} cannot be compared")
        rows = a.reshape(1, -1) if a.ndim < 2 or a[0].size == 1 else a.reshape(len(a), -1)
        other = b.reshape(rows.shape)
        norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(other, axis=1)
        both_zero = ~rows.any(axis=1) & ~other.any(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cosine = np.where(norms > 0, (rows * other).sum(axis=1) / norms, 0.0)
        cosine = np.where(both_zero, 1.0, cosine)
        worst = min(worst, float(cosine.min()))
        largest = max(largest, float(np.abs(a - b).max()))
    return worst, largest


def write_precision_variants(
    graph: Path,
    feeds: Sequence[Feeds],
    *,
    reference: Reference | None = None,
    reference_name: str = "the fp32 graph on onnxruntime CPU",
    inputs: str = "",
    precisions: Sequence[str] = DEFAULT_PRECISIONS,
) -> dict[str, GraphVariant]:
    """Write and measure precision variants of an fp32 graph, beside it.

    Call it in an exporter's staging directory after the fp32 graph passed its own parity check,
    and before hashing the directory for the manifest: the variant files are new files.

    Args:
        graph: the fp32 ``.onnx`` file (with its external data, if any, beside it).
        feeds: batches of graph inputs to measure on, as the service prepares them (the
            exporter's parity inputs: several batch sizes and lengths).
        reference: the original model's outputs for a batch (torch eager in the exporters);
            ``None`` compares with the fp32 graph on onnxruntime CPU, which matches torch within
            :data:`adapters.models.export.parity.MIN_COSINE`.
        reference_name: what ``reference`` is, for the manifest (``"torch eager"``).
        inputs: what ``feeds`` hold, for the manifest (``"8 texts in batches of 8, 3 and 1"``).
        precisions: which variants to write, from :data:`VARIANT_PRECISIONS`.

    Returns:
        ``{precision: GraphVariant}`` for the variants written.

    Raises:
        ParityError: a variant's min cosine is below its bound
            (:data:`MIN_COSINE_BY_PRECISION`); its files are removed.
        ValueError: an unknown precision, no feeds, or a variant file already exists.
        RuntimeError: writing a variant left files other than the expected ones.

    Example:
        >>> write_precision_variants(  # doctest: +SKIP
        ...     staging / "model.onnx",
        ...     [{"input_ids": ids, "attention_mask": mask}],
        ...     reference=lambda feeds: [torch_model(**feeds)],
        ...     reference_name="torch eager",
        ...     inputs="8 texts in one padded batch",
        ... )
        {'fp16': GraphVariant(file='model.fp16.onnx', ...), 'int8': GraphVariant(...)}
    """
    unknown = [precision for precision in precisions if precision not in VARIANT_PRECISIONS]
    if unknown:
        raise ValueError(f"unknown precision(s) {unknown}; known: {VARIANT_PRECISIONS}")
    if not feeds:
        raise ValueError("precision variants need inputs to measure parity on")
    graph = Path(graph)
    expected_outputs = _reference_outputs(graph, feeds, reference)
    external = _uses_external_data(graph)
    written: dict[str, GraphVariant] = {}
    for precision in dict.fromkeys(precisions):
        written[precision] = _write_variant(
            graph,
            precision,
            feeds,
            expected_outputs,
            external=external,
            compared=f"{reference_name} vs the {precision} graph on onnxruntime CPU"
            + (f", {inputs}" if inputs else ""),
        )
    return written


def by_precision(
    per_graph: Mapping[str, Mapping[str, GraphVariant]],
) -> dict[str, dict[str, GraphVariant]]:
    """Turn ``{graph: {precision: variant}}`` (one :func:`write_precision_variants` result per
    graph) into the manifest's ``{precision: {graph: variant}}``.

    Example:
        >>> by_precision({"image.onnx": {}, "text.onnx": {}})
        {}
    """
    variants: dict[str, dict[str, GraphVariant]] = {}
    for graph, written in per_graph.items():
        for precision, variant in written.items():
            variants.setdefault(precision, {})[graph] = variant
    return variants


def _reference_outputs(
    graph: Path, feeds: Sequence[Feeds], reference: Reference | None
) -> list[list[npt.NDArray[Any]]]:
    if reference is not None:
        return [[np.asarray(output) for output in reference(batch)] for batch in feeds]
    session = create_session(graph, providers="cpu")
    return [[np.asarray(output) for output in session.run(None, dict(batch))] for batch in feeds]


def _write_variant(
    graph: Path,
    precision: str,
    feeds: Sequence[Feeds],
    expected: Sequence[Sequence[npt.NDArray[Any]]],
    *,
    external: bool,
    compared: str,
) -> GraphVariant:
    directory = graph.parent
    target = directory / variant_name(graph.name, precision)
    data_name = target.name + EXTERNAL_DATA_SUFFIX
    if target.exists() or (directory / data_name).exists():
        raise ValueError(f"{target.name} already exists")
    before = {path.name for path in directory.iterdir()}
    try:
        if precision == "fp16":
            _write_fp16(graph, target, external=external)
            method = "operators without a CPU fp16 kernel run in fp32: GPU arithmetic not covered"
        else:
            method = _write_int8(graph, target, external=external)
        _check_new_files(directory, before, target, data_name)
        measured, not_measured = _measure(target, feeds, expected, precision)
        if measured is None and precision == "int8":
            raise RuntimeError(f"{target.name} does not run on onnxruntime CPU: {not_measured}")
        bound = MIN_COSINE_BY_PRECISION[precision]
        if measured is not None and not measured[0] >= bound:
            raise ParityError(
                f"{target.name}: min cosine {measured[0]:.6f} < {bound} (the {precision} bound)"
            )
    except BaseException:
        _remove(directory, before)
        raise
    parity = None
    if measured is not None:
        parity = Parity(f"{compared} ({method})", measured[0], measured[1])
    variant = GraphVariant(
        file=target.name,
        parity=parity,
        not_measured=None if parity is not None else f"{compared}: {not_measured}",
        external_data=(data_name,) if (directory / data_name).exists() else (),
    )
    logger.info(
        "precision variant written",
        extra={
            "graph_file": target.name,
            "precision": precision,
            "min_cosine": None if parity is None else parity.min_cosine,
            "not_measured": variant.not_measured,
        },
    )
    return variant


def _write_fp16(graph: Path, target: Path, *, external: bool) -> None:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    # From the path, the converter infers shapes with infer_shapes_path, which works past 2 GB.
    model = convert_float_to_float16(
        str(graph),
        keep_io_types=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *_FP16_EXTRA_BLOCKED],
    )
    _save(model, target, external=external or model.ByteSize() >= _TWO_GB)


def _write_int8(graph: Path, target: Path, *, external: bool) -> str:
    """Quantise ``graph`` to ``target``; returns how, in words, for the manifest."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # A known onnxruntime issue (microsoft/onnxruntime#25489, reproduced with 1.32): a MatMul
    # whose constant weight is not 2-D quantises per channel without complaint, then fails at
    # run time ("b zero point is not valid"). Such MatMuls stay in fp32; should one be unnamed
    # (it cannot be excluded then), the whole graph is quantised per tensor instead.
    model = onnx.load(str(graph), load_external_data=False)
    ranks = {tensor.name: len(tensor.dims) for tensor in model.graph.initializer}
    unsupported = [
        node
        for node in model.graph.node
        if node.op_type == "MatMul" and len(node.input) > 1 and ranks.get(node.input[1], 2) != 2
    ]
    per_channel = all(node.name for node in unsupported)
    excluded = [node.name for node in unsupported] if per_channel else []
    with _without_preprocessing_hint():
        quantize_dynamic(
            graph,
            target,
            per_channel=per_channel,
            reduce_range=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            use_external_data_format=external,
        )
    method = f"{'per-channel' if per_channel else 'per-tensor'} 7-bit int8 weights"
    if excluded:
        method += f"; {len(excluded)} MatMul(s) with weights not 2-D kept in fp32"
    return method


def _save(model: onnx.ModelProto, target: Path, *, external: bool) -> None:
    if external:
        onnx.save_model(
            model,
            str(target),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=target.name + EXTERNAL_DATA_SUFFIX,
        )
        # onnx creates the data file private (0600); the service reads it as it reads the graph.
        data = target.with_name(target.name + EXTERNAL_DATA_SUFFIX)
        data.chmod(target.stat().st_mode & 0o777)
    else:
        onnx.save_model(model, str(target))


def _measure(
    target: Path,
    feeds: Sequence[Feeds],
    expected: Sequence[Sequence[npt.NDArray[Any]]],
    precision: str,
) -> tuple[tuple[float, float] | None, str]:
    """``((min cosine, max abs diff), "")``, or ``(None, why)`` when the CPU cannot run it."""
    try:
        session = create_session(target, providers="cpu")
        actual = [session.run(None, dict(batch)) for batch in feeds]
    except _ORT_ERRORS as error:
        reason = str(error).strip().splitlines()[0][:300]
        logger.warning(
            "precision variant does not run on onnxruntime CPU",
            extra={"graph_file": target.name, "precision": precision, "reason": reason},
        )
        return None, f"not measured: onnxruntime CPU cannot run it ({reason})"
    worst, largest = 1.0, 0.0
    for want, got in zip(expected, actual, strict=True):
        cosine, difference = output_agreement(want, got)
        worst, largest = min(worst, cosine), max(largest, difference)
    return (worst, largest), ""


def _uses_external_data(graph: Path) -> bool:
    model = onnx.load(str(graph), load_external_data=False)
    return any(
        tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer
    )


def _check_new_files(directory: Path, before: set[str], target: Path, data_name: str) -> None:
    new = {path.name for path in directory.iterdir()} - before
    unexpected = new - {target.name, data_name}
    if target.name not in new or unexpected:
        raise RuntimeError(
            f"writing {target.name} left {sorted(new)}; expected {target.name} "
            f"(and {data_name} for external data)"
        )


def _remove(directory: Path, before: set[str]) -> None:
    for path in directory.iterdir():
        if path.name not in before and path.is_file():
            path.unlink()


class _DropPreprocessingHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _without_preprocessing_hint() -> Iterator[None]:
    # quantize_dynamic logs on the root logger that the graph could be pre-processed first;
    # measured on MiniLM, pre-processing changes nothing (min cosine identical), so the hint is
    # noise in an export's output.
    hint = _DropPreprocessingHint()
    root = logging.getLogger()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)
