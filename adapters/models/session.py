"""ONNX Runtime sessions, created one way for every model.

Why it exists: the same graphs run on a laptop CPU and on an NVIDIA GPU server. Which execution
providers a session uses is decided here, once: the fastest available first (TensorRT, then CUDA,
then CPU), or an explicit list from configuration, always limited to what the installed
onnxruntime build offers. Graph optimisation is always fully enabled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from adapters.models.manifest import ManifestError

__all__ = [
    "PROVIDER_ORDER",
    "ProviderPreference",
    "check_signature",
    "create_session",
    "resolve_providers",
]

logger = logging.getLogger(__name__)

PROVIDER_ORDER = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
"""Providers ``"auto"`` considers, fastest first."""

_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}

ProviderPreference = str | Sequence[str]
"""``"auto"``, or provider names in order of preference: full onnxruntime names or the aliases
``tensorrt``, ``cuda``, ``cpu``, as a sequence or one comma-separated string."""


def resolve_providers(
    preference: ProviderPreference = "auto", available: Sequence[str] | None = None
) -> list[str]:
    """The execution providers to request, best first.

    Args:
        preference: ``"auto"`` for :data:`PROVIDER_ORDER`, or an explicit order (see
            :data:`ProviderPreference`).
        available: the providers this onnxruntime build offers; defaults to
            ``onnxruntime.get_available_providers()``.

    Returns:
        The preferred providers that are available, in order of preference.

    Raises:
        ValueError: a name is not a known provider, or none of the preferred ones is available.

    Example:
        >>> resolve_providers("auto", available=["CPUExecutionProvider", "CUDAExecutionProvider"])
        ['CUDAExecutionProvider', 'CPUExecutionProvider']
        >>> resolve_providers("cpu", available=["CPUExecutionProvider", "CUDAExecutionProvider"])
        ['CPUExecutionProvider']
    """
    offered = list(ort.get_available_providers() if available is None else available)
    if isinstance(preference, str):
        if preference.strip().lower() == "auto":
            wanted: list[str] = list(PROVIDER_ORDER)
        else:
            wanted = [_canonical(name) for name in preference.split(",") if name.strip()]
    else:
        wanted = [_canonical(name) for name in preference]
    chosen = [name for name in dict.fromkeys(wanted) if name in offered]
    if not chosen:
        raise ValueError(f"none of the execution providers {wanted} is available here: {offered}")
    return chosen


def create_session(
    model_path: Path | str,
    *,
    providers: ProviderPreference = "auto",
    intra_op_threads: int | None = None,
) -> ort.InferenceSession:
    """An inference session for an ONNX graph, with all graph optimisations enabled.

    Args:
        model_path: the ``.onnx`` file.
        providers: provider preference, see :func:`resolve_providers`.
        intra_op_threads: threads for one operator; ``None`` lets onnxruntime use all cores.

    Returns:
        The session. ``session.get_providers()`` tells which providers it really uses:
        onnxruntime falls back to the next provider when one fails to initialise.

    Example:
        >>> session = create_session("model.onnx", providers="cpu", intra_op_threads=2)
        ... # doctest: +SKIP
    """
    if intra_op_threads is not None and intra_op_threads < 1:
        raise ValueError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    requested = resolve_providers(providers)
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=requested)
    logger.info(
        "onnxruntime session created",
        extra={
            "graph": Path(model_path).name,
            "requested": requested,
            "providers": session.get_providers(),
        },
    )
    return session


def check_signature(
    session: ort.InferenceSession, directory: Path, *, inputs: Sequence[str], dimension: int
) -> None:
    """Check that a graph takes exactly ``inputs`` and returns one ``(batch, dimension)`` output.

    Raises:
        ManifestError: the graph does not match what its manifest promised.
    """
    names = [node.name for node in session.get_inputs()]
    if sorted(names) != sorted(inputs):
        raise ManifestError(directory, f"graph inputs are {names}, expected {list(inputs)}")
    outputs = session.get_outputs()
    if len(outputs) != 1 or len(outputs[0].shape) != 2 or outputs[0].shape[1] != dimension:
        shapes = [output.shape for output in outputs]
        raise ManifestError(directory, f"graph outputs {shapes}, expected [[batch, {dimension}]]")


def _canonical(name: str) -> str:
    stripped = name.strip()
    canonical = _ALIASES.get(stripped.lower(), stripped)
    if canonical not in PROVIDER_ORDER and not canonical.endswith("ExecutionProvider"):
        raise ValueError(f"unknown execution provider {name!r}")
    return canonical
