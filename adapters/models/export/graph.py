"""One way to write a torch module as an ONNX graph, used by every exporter.

Why it exists: in torch 2.13 the TorchScript-based exporter (``dynamo=False``) is the one that
works for these models: it is fast and exact, where the torch.export-based one is slow and wrote an
invalid graph for the BERT text tower. Tracing records Python-level decisions as constants, which is
why every exporter checks parity on batch sizes and sequence lengths other than the example's.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import torch

__all__ = ["DEFAULT_OPSET", "OUTPUT_NAME", "export_graph"]

DEFAULT_OPSET = 17
"""ONNX opset of exported graphs: supported by every onnxruntime >= 1.14 and by TensorRT 8.6+."""

OUTPUT_NAME = "embeddings"
"""Name of the single output of every exported graph, shape ``(batch, dimension)``."""


def export_graph(
    module: torch.nn.Module,
    example: Sequence[torch.Tensor],
    path: Path,
    *,
    input_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int = DEFAULT_OPSET,
) -> None:
    """Trace ``module`` on ``example`` and write it to ``path`` as a checked ONNX graph.

    Args:
        module: takes the inputs in ``input_names`` order and returns ``(batch, dimension)``.
        example: example inputs for tracing; give padded batches so that masking is traced.
        path: the ``.onnx`` file to write.
        input_names: graph input names, in argument order.
        dynamic_axes: for each input, its dynamic axes (``{0: "batch", 1: "sequence"}``); the
            output's batch axis is always dynamic.
        opset: ONNX opset version.

    Raises:
        onnx.checker.ValidationError: the written graph is not valid ONNX.
    """
    # The exporter puts the module back in the mode it found it in afterwards; a wrapper left in
    # training mode would switch dropout back on in the model it wraps.
    module.eval()
    axes = {name: dict(dims) for name, dims in dynamic_axes.items()}
    axes[OUTPUT_NAME] = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings flag Python branches frozen into the graph; the exporters' parity checks
        # on other shapes are what shows whether any of them matters.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript exporter deprecates itself and its helpers; see the module docstring.
        warnings.simplefilter("ignore", DeprecationWarning)
        # Raised for transformers' padding mask, which indexes with aranges: never negative.
        warnings.filterwarnings("ignore", message=".*aten::index operator of advanced indexing.*")
        torch.onnx.export(
            module,
            tuple(example),
            str(path),
            input_names=list(input_names),
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(str(path), full_check=True)
