"""ONNX Runtime sessions, created one way for every model.

Why it exists: the same model directories are served from a laptop CPU and from an NVIDIA GPU
server, and everything that decides how a graph runs is decided here, once, for every model:

* which execution providers to ask for: the fastest available first (TensorRT, then CUDA, then
  CPU), or an explicit list from configuration, limited to what the installed onnxruntime offers;
* which graph file runs: the fp32 graph, or a precision variant the exporter wrote and measured
  (:mod:`adapters.models.export.precision`): fp16 on a GPU, int8 on a CPU;
* the providers' options (TensorRT's fp16 mode, engine cache and shape profiles; CUDA's device),
  the graph optimisation level and the thread counts;
* a warm-up run at start-up, so that the first clinical request does not pay for kernel selection
  or a TensorRT engine build;
* how inputs reach the device: IO binding on a GPU, a plain run on a CPU.

onnxruntime silently falls back to the next provider when one fails to initialise, so a
:class:`ModelSession` reports what it really got (providers, precision and why), for the logs and
for the service's start-up report, rather than what was asked for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from adapters.models.manifest import Manifest, ManifestError

__all__ = [
    "GPU_PROVIDERS",
    "PROVIDER_ORDER",
    "TRT_MAX_WORKSPACE_BYTES",
    "GraphOptimization",
    "ModelRuntime",
    "ModelSession",
    "Precision",
    "PrecisionPreference",
    "ProviderPreference",
    "SessionRuntime",
    "SessionSettings",
    "TrtProfile",
    "check_signature",
    "choose_precision",
    "create_session",
    "provider_options",
    "resolve_providers",
    "session_settings",
    "trt_profile",
    "warmup_feeds",
]

logger = logging.getLogger(__name__)

PROVIDER_ORDER = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
"""Providers ``"auto"`` considers, fastest first."""

GPU_PROVIDERS = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider"})
"""Providers that run on an NVIDIA GPU: fp16 variants pay off there, and inputs are bound to the
device."""

TRT_MAX_WORKSPACE_BYTES = 2 << 30
"""TensorRT's scratch memory limit while building engines (2 GiB): enough for the tactics of
BERT-base and ViT-B sized graphs at batch 32, small enough to share a GPU with other models."""

_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}

ProviderPreference = str | Sequence[str]
"""``"auto"``, or provider names in order of preference: full onnxruntime names or the aliases
``tensorrt``, ``cuda``, ``cpu``, as a sequence or one comma-separated string."""

Precision = Literal["fp32", "fp16", "int8"]
"""Numeric precision of a graph file that runs."""

PrecisionPreference = Literal["auto", "fp32", "fp16", "int8"]
"""What configuration asks for; see :func:`choose_precision`."""

GraphOptimization = Literal["disabled", "basic", "extended", "all"]
"""onnxruntime's graph optimisation levels, by their documented names."""

TrtProfile = Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
"""TensorRT optimisation profile: for each input, its ``(min, opt, max)`` shapes."""

_OPTIMIZATION_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_PRECISION_PREFERENCES: tuple[str, ...] = get_args(PrecisionPreference)

# Warm-up and TensorRT profiles: the sequence length of the dummy batch, and the sequence length
# TensorRT tunes its kernels for (typical findings and passages are shorter than 128 tokens).
_WARMUP_SEQUENCE = 8
_TRT_OPT_SEQUENCE = 128

_NUMPY_TYPES: dict[str, type[np.generic]] = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
}


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


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """How the sessions of a model are created; one value serves every model of a deployment.

    Args:
        providers: execution provider preference, see :func:`resolve_providers`.
        precision: which graph file runs, see :func:`choose_precision`. ``"auto"`` is fp16 on a
            GPU provider when the model has an fp16 variant, fp32 otherwise.
        graph_optimization: onnxruntime's graph optimisation level.
        intra_op_threads: threads for one operator; ``None`` lets onnxruntime use all cores.
        inter_op_threads: threads running independent operators at once; more than one switches
            the session to onnxruntime's parallel execution mode, which only pays off for graphs
            with parallel branches. ``None`` keeps sequential execution.
        warmup: run the graph once on a dummy batch when the session is created.
        trt_cache_dir: where TensorRT keeps its built engines between restarts (one
            subdirectory per graph file and onnxruntime version); ``None`` builds them at every
            start. Never inside a model directory: the manifest check refuses unlisted files.
        device_id: the CUDA device the GPU providers run on.

    Raises:
        ValueError: a value is out of range or unknown.

    Example:
        >>> SessionSettings(providers="cuda,cpu", precision="fp16", intra_op_threads=4).precision
        'fp16'
    """

    providers: ProviderPreference = "auto"
    precision: PrecisionPreference = "auto"
    graph_optimization: GraphOptimization = "all"
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    warmup: bool = True
    trt_cache_dir: Path | None = None
    device_id: int = 0

    def __post_init__(self) -> None:
        if self.precision not in _PRECISION_PREFERENCES:
            raise ValueError(f"precision must be one of {_PRECISION_PREFERENCES}")
        if self.graph_optimization not in _OPTIMIZATION_LEVELS:
            raise ValueError(f"graph_optimization must be one of {tuple(_OPTIMIZATION_LEVELS)}")
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.device_id < 0:
            raise ValueError(f"device_id must be >= 0, got {self.device_id}")


def session_settings(
    settings: SessionSettings | None = None,
    *,
    providers: ProviderPreference | None = None,
    intra_op_threads: int | None = None,
) -> SessionSettings:
    """The settings a model adapter uses, from its ``session=`` argument or from the
    ``providers=`` and ``intra_op_threads=`` shortcuts its constructor also takes.

    Raises:
        ValueError: both ``settings`` and a shortcut were given (which one wins would be a
            guess), or a value is out of range.

    Example:
        >>> session_settings(providers="cpu").providers
        'cpu'
    """
    if settings is not None:
        if providers is not None or intra_op_threads is not None:
            raise ValueError(
                "give providers and intra_op_threads in the session settings or as "
                "arguments, not both"
            )
        return settings
    return SessionSettings(
        providers="auto" if providers is None else providers, intra_op_threads=intra_op_threads
    )


def create_session(
    model_path: Path | str,
    *,
    providers: ProviderPreference = "auto",
    intra_op_threads: int | None = None,
) -> ort.InferenceSession:
    """An inference session for an ONNX graph, with all graph optimisations enabled.

    For exporters' parity checks and other one-off runs; the service uses :class:`ModelSession`.

    Args:
        model_path: the ``.onnx`` file.
        providers: provider preference, see :func:`resolve_providers`.
        intra_op_threads: threads for one operator; ``None`` lets onnxruntime use all cores.

    Returns:
        The session. ``session.get_providers()`` tells which providers it really uses:
        onnxruntime falls back to the next provider when one fails to initialise.

    Raises:
        ValueError: ``intra_op_threads`` is below 1, or no preferred provider is available.

    Example:
        >>> session = create_session("model.onnx", providers="cpu", intra_op_threads=2)
        ... # doctest: +SKIP
    """
    settings = SessionSettings(providers=providers, intra_op_threads=intra_op_threads)
    requested = resolve_providers(providers)
    session = ort.InferenceSession(
        str(model_path), sess_options=_session_options(settings), providers=requested
    )
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


def choose_precision(
    preference: PrecisionPreference, provider: str, variants: Collection[str]
) -> tuple[Precision, str]:
    """The precision a graph runs in, and why, for the provider it runs on.

    fp16 only pays off on a GPU: onnxruntime's CPU provider computes the fp16 operators it has no
    fp16 kernel for in fp32 behind inserted casts, which measured slower than the fp32 graph.
    The int8 variants are dynamically quantised for the CPU's integer kernels; on a GPU they would
    run partly on the CPU. A request that cannot be honoured falls back to fp32, with the reason.

    Args:
        preference: ``"auto"`` (fp16 on a GPU provider when there is an fp16 variant, else
            fp32), or a precision asked for explicitly.
        provider: the first provider of the session.
        variants: the precisions the model directory has variants of (``{"fp16", "int8"}``).

    Returns:
        ``(precision, reason)``; the reason is one line for the logs.

    Example:
        >>> choose_precision("auto", "CUDAExecutionProvider", {"fp16", "int8"})
        ('fp16', 'auto: the fp16 variant on a GPU provider')
        >>> choose_precision("fp16", "CPUExecutionProvider", {"fp16"})[0]
        'fp32'
    """
    on_gpu = provider in GPU_PROVIDERS
    if preference == "fp32":
        return "fp32", "fp32 requested"
    if preference == "auto":
        if not on_gpu:
            return "fp32", "auto: fp32 on a CPU provider"
        if "fp16" in variants:
            return "fp16", "auto: the fp16 variant on a GPU provider"
        return "fp32", "auto: the model has no fp16 variant"
    if preference == "fp16":
        if not on_gpu:
            return "fp32", (
                "fp16 requested, but the session runs on the CPU, where fp16 gains nothing "
                "(onnxruntime computes most fp16 operators in fp32 there): fp32 instead"
            )
        if "fp16" not in variants:
            return "fp32", "fp16 requested, but the model has no fp16 variant: fp32 instead"
        return "fp16", "fp16 requested"
    if on_gpu:
        return "fp32", (
            "int8 requested, but the session runs on a GPU, and the dynamic int8 variant is "
            "made for CPU integer kernels (use fp16 on a GPU): fp32 instead"
        )
    if "int8" not in variants:
        return "fp32", "int8 requested, but the model has no int8 variant: fp32 instead"
    return "int8", "int8 requested"


def trt_profile(
    shapes: Mapping[str, Sequence[int | str]], *, max_batch: int, max_length: int
) -> TrtProfile:
    """The TensorRT optimisation profile of a graph whose input shapes are known.

    Without an explicit profile TensorRT builds an engine for the shapes it has seen, and builds
    it again (seconds to minutes) whenever a batch is larger or longer, in the middle of serving.
    With one, the engine built at warm-up covers every batch the service sends.

    Args:
        shapes: each input's shape, with ``"batch"`` and ``"sequence"`` for the dynamic axes
            and integers for the static ones.
        max_batch: the largest batch (the micro-batcher's ``max_batch``).
        max_length: the longest sequence (the manifest's ``max_length``).

    Returns:
        ``{input: (min, opt, max)}``: from 1 to the maximum on dynamic axes, tuned for full
        batches of ``min(128, max_length)`` tokens.

    Raises:
        ValueError: an axis is a name other than ``batch`` or ``sequence``, or a bound is below 1.

    Example:
        >>> trt_profile({"input_ids": ("batch", "sequence")}, max_batch=32, max_length=256)
        {'input_ids': ((1, 1), (32, 128), (32, 256))}
    """
    if max_batch < 1 or max_length < 1:
        raise ValueError("max_batch and max_length must be >= 1")
    bounds = {
        "batch": (1, max_batch, max_batch),
        "sequence": (1, min(_TRT_OPT_SEQUENCE, max_length), max_length),
    }
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        axes = []
        for axis in shape:
            if isinstance(axis, int):
                axes.append((axis, axis, axis))
            elif axis in bounds:
                axes.append(bounds[axis])
            else:
                raise ValueError(f"input {name!r}: unknown dynamic axis {axis!r}")
        low, opt, high = (tuple(axis[i] for axis in axes) for i in range(3))
        profile[name] = (low, opt, high)
    return profile


def provider_options(
    providers: Sequence[str],
    *,
    precision: Precision,
    device_id: int = 0,
    trt_cache_dir: Path | None = None,
    profile: TrtProfile | None = None,
) -> list[tuple[str, dict[str, str]]]:
    """The ``providers`` argument of ``onnxruntime.InferenceSession``: each provider with its
    options, as strings (onnxruntime parses them).

    Args:
        providers: resolved provider names, best first.
        precision: the precision of the graph file that runs; fp16 lets TensorRT build fp16
            kernels.
        device_id: the CUDA device.
        trt_cache_dir: TensorRT's engine (and timing) cache directory for this graph file;
            ``None`` disables the cache.
        profile: TensorRT's shape profile (see :func:`trt_profile`); ``None`` lets TensorRT
            build for the shapes it sees.

    Returns:
        ``[(provider, options), ...]`` in the order given.

    Example:
        >>> provider_options(["CUDAExecutionProvider", "CPUExecutionProvider"], precision="fp32")
        [('CUDAExecutionProvider', {'device_id': '0', 'cudnn_conv_algo_search': 'HEURISTIC'}), \
('CPUExecutionProvider', {})]
    """
    chosen: list[tuple[str, dict[str, str]]] = []
    for name in providers:
        options: dict[str, str] = {}
        if name == "TensorrtExecutionProvider":
            options = {
                "device_id": str(device_id),
                "trt_fp16_enable": str(precision == "fp16"),
                "trt_max_workspace_size": str(TRT_MAX_WORKSPACE_BYTES),
            }
            if trt_cache_dir is not None:
                options |= {
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": str(trt_cache_dir),
                    "trt_timing_cache_enable": "True",
                    "trt_timing_cache_path": str(trt_cache_dir),
                }
            if profile:
                for index, key in enumerate(("min", "opt", "max")):
                    options[f"trt_profile_{key}_shapes"] = ",".join(
                        f"{input_name}:{'x'.join(str(d) for d in shapes[index])}"
                        for input_name, shapes in profile.items()
                    )
        elif name == "CUDAExecutionProvider":
            # EXHAUSTIVE (onnxruntime's default) benchmarks every convolution algorithm for each
            # new input shape, and every batch size is a new shape: a slow first call per size.
            options = {"device_id": str(device_id), "cudnn_conv_algo_search": "HEURISTIC"}
        chosen.append((name, options))
    return chosen


def warmup_feeds(inputs: Sequence[Any]) -> dict[str, npt.NDArray[Any]]:
    """A dummy batch of one for a graph, from its input metadata (``session.get_inputs()``).

    Integer inputs are token inputs, ``_WARMUP_SEQUENCE`` (8) long on dynamic axes: ids of 2
    (a valid id of any vocabulary, and neither BERT's pad id 0 nor XLM-R's 1, so that graphs that
    derive the mask from the pad id see real tokens), a mask of ones for ``*mask*`` inputs,
    zeros for ``*type*`` inputs. Float inputs (images) are zeros in their static dimensions.

    Args:
        inputs: objects with ``name``, ``type`` (``"tensor(int64)"``) and ``shape`` (ints for
            static axes, names or ``None`` for dynamic ones).

    Returns:
        ``{input name: array}``.

    Raises:
        ValueError: an input type is not int32, int64, float or float16.
    """
    feeds: dict[str, npt.NDArray[Any]] = {}
    for node in inputs:
        dtype = _NUMPY_TYPES.get(node.type)
        if dtype is None:
            raise ValueError(f"cannot make a warm-up input of type {node.type} for {node.name!r}")
        shape = tuple(
            axis if isinstance(axis, int) else (1 if position == 0 else _WARMUP_SEQUENCE)
            for position, axis in enumerate(node.shape)
        )
        if np.issubdtype(dtype, np.integer):
            name = node.name.lower()
            value = 1 if "mask" in name else 0 if "type" in name else 2
            feeds[node.name] = np.full(shape, value, dtype=dtype)
        else:
            feeds[node.name] = np.zeros(shape, dtype=dtype)
    return feeds


@dataclass(frozen=True, slots=True)
class SessionRuntime:
    """What one graph really runs on, for the logs and the service's start-up report.

    Args:
        graph: the graph's name in the model directory (``"image.onnx"``).
        file: the file that runs (``"image.fp16.onnx"`` for the fp16 variant).
        precision: the precision of that file.
        reason: why that precision (one line).
        requested: the providers asked for, best first.
        providers: the providers the session really got; onnxruntime drops those that fail.
        io_binding: whether inputs are bound to the GPU.
        warmup_seconds: how long the warm-up run took; ``None`` when warm-up was disabled.
    """

    graph: str
    file: str
    precision: Precision
    reason: str
    requested: tuple[str, ...]
    providers: tuple[str, ...]
    io_binding: bool
    warmup_seconds: float | None

    def to_log(self) -> dict[str, Any]:
        """The runtime as ``extra=`` fields of a log record."""
        return {
            "graph": self.graph,
            "graph_file": self.file,
            "precision": self.precision,
            "precision_reason": self.reason,
            "requested": list(self.requested),
            "providers": list(self.providers),
            "io_binding": self.io_binding,
            "warmup_seconds": self.warmup_seconds,
        }


@dataclass(frozen=True, slots=True)
class ModelRuntime:
    """What a model's graphs really run on.

    Args:
        model_id: the model's identity (its fp32 identity, whatever precision runs).
        graphs: one entry per graph of the model.
    """

    model_id: str
    graphs: tuple[SessionRuntime, ...]


class ModelSession:
    """One graph of a verified model directory, in the precision and on the providers that the
    settings, the model's variants and the machine allow; warmed up and ready to run.

    Args:
        directory: the model directory, already verified with
            :func:`adapters.models.manifest.load_manifest`.
        manifest: its manifest (names the graph's precision variants and every file's hash).
        graph: the fp32 graph's file name (``"text.onnx"``); a variant is chosen from it.
        settings: how to create the session; defaults to :class:`SessionSettings` ``()``.
        check: called with the onnxruntime session before warm-up, to refuse a graph whose
            inputs or outputs are not what the caller serves (see :func:`check_signature`).
        shapes: the inputs' shapes with ``"batch"`` and ``"sequence"`` for dynamic axes; gives
            TensorRT an explicit shape profile (see :func:`trt_profile`).
        max_batch: the largest batch that will be run (TensorRT's profile).

    Attributes:
        session: the onnxruntime session.
        graph: the fp32 graph's file name.
        file: the file that runs.
        precision: the precision of that file.
        precision_reason: why.
        requested: providers asked for.
        providers: providers really used (onnxruntime drops those that fail to initialise).
        io_binding: whether runs bind inputs to the GPU.
        warmup_seconds: duration of the warm-up run, ``None`` without warm-up.

    Raises:
        ValueError: no preferred provider is available, or ``trt_cache_dir`` lies inside the
            model directory.
        ManifestError: the manifest does not list the graph, or ``check`` refused it.

    Example:
        >>> manifest = load_manifest("/models/minilm")  # doctest: +SKIP
        >>> session = ModelSession(Path("/models/minilm"), manifest, "model.onnx",
        ...                        SessionSettings(providers="cpu", precision="int8"))
        ... # doctest: +SKIP
        >>> session.precision, session.providers  # doctest: +SKIP
        ('int8', ['CPUExecutionProvider'])
    """

    def __init__(
        self,
        directory: Path | str,
        manifest: Manifest,
        graph: str,
        settings: SessionSettings | None = None,
        *,
        check: Callable[[ort.InferenceSession], None] | None = None,
        shapes: Mapping[str, Sequence[int | str]] | None = None,
        max_batch: int = 32,
    ) -> None:
        directory = Path(directory)
        settings = settings or SessionSettings()
        if graph not in manifest.files:
            raise ManifestError(directory, f"the manifest does not list the graph {graph}")
        if settings.trt_cache_dir is not None and _is_within(settings.trt_cache_dir, directory):
            raise ValueError(
                f"trt_cache_dir {settings.trt_cache_dir} lies inside the model directory, "
                "whose manifest would refuse the engine files: choose a directory outside it"
            )
        self._directory = directory
        self._manifest = manifest
        self._settings = settings
        self._shapes = shapes
        self._max_batch = max_batch
        self.graph = graph
        self.requested = resolve_providers(settings.providers)
        variants = {precision for precision, graphs in manifest.variants.items() if graph in graphs}
        precision, reason = choose_precision(settings.precision, self.requested[0], variants)
        session = self._open(precision)
        if precision == "fp16" and session.get_providers()[0] not in GPU_PROVIDERS:
            # The GPU provider failed to initialise (driver, CUDA libraries) and onnxruntime fell
            # back to the CPU with the fp16 graph, which is slower there than fp32.
            reason = (
                f"fp16 chosen for {self.requested[0]}, but onnxruntime fell back to "
                f"{session.get_providers()[0]}: fp32 instead"
            )
            precision = "fp32"
            session = self._open(precision)
        self.session = session
        self.precision: Precision = precision
        self.precision_reason = reason
        self.file = self._file(precision)
        self.providers: list[str] = session.get_providers()
        self.io_binding = self.providers[0] in GPU_PROVIDERS
        # onnxruntime's device name for both GPU providers' memory.
        self._binding_device = "cuda"
        self._outputs = [output.name for output in session.get_outputs()]
        self._runs = 0
        self._count_lock = threading.Lock()
        self.warmup_seconds: float | None = None
        if check is not None:
            check(session)
        logger.info(
            "onnxruntime session created",
            extra={"model_id": manifest.model_id, **self.runtime.to_log()},
        )
        if settings.precision not in ("auto", precision):
            logger.warning(
                "precision request not honoured",
                extra={"graph": graph, "precision_reason": reason},
            )
        if settings.warmup:
            started = time.perf_counter()
            self._run(warmup_feeds(session.get_inputs()))
            self.warmup_seconds = time.perf_counter() - started
            logger.info(
                "onnxruntime session warmed up",
                extra={
                    "graph_file": self.file,
                    "providers": self.providers,
                    "seconds": round(self.warmup_seconds, 3),
                },
            )

    @property
    def runs(self) -> int:
        """How many times :meth:`run` has run the graph (the warm-up not included)."""
        return self._runs

    @property
    def runtime(self) -> SessionRuntime:
        """What this graph really runs on."""
        return SessionRuntime(
            graph=self.graph,
            file=self.file,
            precision=self.precision,
            reason=self.precision_reason,
            requested=tuple(self.requested),
            providers=tuple(self.providers),
            io_binding=self.io_binding,
            warmup_seconds=self.warmup_seconds,
        )

    def run(self, feeds: Mapping[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        """Run the graph once.

        On a GPU provider the inputs are bound to the device and the outputs to host memory
        (see the comment in the code); on the CPU it is a plain ``session.run``. Safe to call
        from several threads; the micro-batcher calls it from one at a time.

        Args:
            feeds: every graph input by name, as numpy arrays of the graph's input types.

        Returns:
            The graph's outputs as numpy arrays, in the graph's output order.
        """
        outputs = self._run(feeds)
        with self._count_lock:
            self._runs += 1
        return outputs

    def _run(self, feeds: Mapping[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        if not self.io_binding:
            return [np.asarray(value) for value in self.session.run(self._outputs, dict(feeds))]
        binding = self.session.io_binding()
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(array), self._binding_device, self._settings.device_id
            )
            binding.bind_ortvalue_input(name, value)
        # Outputs are bound to host memory: every consumer (the stores, the ranking) needs them
        # there, so onnxruntime's own copy after the last kernel is the only transfer, without
        # knowing the dynamic output shapes in advance or holding device buffers between runs.
        for name in self._outputs:
            binding.bind_output(name, "cpu")
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return [np.asarray(value) for value in binding.copy_outputs_to_cpu()]

    def _file(self, precision: Precision) -> str:
        if precision == "fp32":
            return self.graph
        return self._manifest.variants[precision][self.graph].file

    def _open(self, precision: Precision) -> ort.InferenceSession:
        file = self._file(precision)
        cache = None
        if self._settings.trt_cache_dir is not None and (
            "TensorrtExecutionProvider" in self.requested
        ):
            # onnxruntime names cached engines after the graph's structure and file name, not its
            # weights: two exports of one architecture would share an engine (weights included).
            # One subdirectory per file content and onnxruntime version keeps them apart.
            digest = self._manifest.files[file][:16]
            cache = self._settings.trt_cache_dir / f"{file}-{digest}-ort{ort.__version__}"
            cache.mkdir(parents=True, exist_ok=True)
        profile = None
        if self._shapes is not None:
            profile = trt_profile(
                self._shapes, max_batch=self._max_batch, max_length=self._manifest.max_length
            )
        return ort.InferenceSession(
            str(self._directory / file),
            sess_options=_session_options(self._settings),
            providers=provider_options(
                self.requested,
                precision=precision,
                device_id=self._settings.device_id,
                trt_cache_dir=cache,
                profile=profile,
            ),
        )


def _session_options(settings: SessionSettings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = _OPTIMIZATION_LEVELS[settings.graph_optimization]
    if settings.intra_op_threads is not None:
        options.intra_op_num_threads = settings.intra_op_threads
    if settings.inter_op_threads is not None:
        options.inter_op_num_threads = settings.inter_op_threads
        # inter-op threads are only used in parallel execution mode.
        options.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL
            if settings.inter_op_threads > 1
            else ort.ExecutionMode.ORT_SEQUENTIAL
        )
    return options


def _is_within(path: Path, directory: Path) -> bool:
    return Path(path).resolve().is_relative_to(directory.resolve())


def _canonical(name: str) -> str:
    stripped = name.strip()
    canonical = _ALIASES.get(stripped.lower(), stripped)
    if canonical not in PROVIDER_ORDER and not canonical.endswith("ExecutionProvider"):
        raise ValueError(f"unknown execution provider {name!r}")
    return canonical
