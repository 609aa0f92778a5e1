"""One way to write a torch module as an ONNX graph, used by every exporter.

Why it exists: in torch 2.13 the TorchScript-based exporter (``dynamo=False``) is the one that
works for these models: it is fast and exact, where the torch.export-based one is slow and wrote an
invalid graph for the BERT text tower. Tracing records Python-level decisions as constants, which is
why every exporter checks parity on batch sizes and sequence lengths other than the example's.

A graph over protobuf's 2 GB limit (BGE-M3 at full size) keeps its weights in one external data
file beside it, ``<graph>.onnx.data``, which onnxruntime reads from the graph's directory and the
manifest pins like any other file.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import torch

__all__ = ["DEFAULT_OPSET", "EXTERNAL_DATA_SUFFIX", "OUTPUT_NAME", "export_graph"]

DEFAULT_OPSET = 17
"""ONNX opset of exported graphs: supported by every onnxruntime >= 1.14 and by TensorRT 8.6+."""

OUTPUT_NAME = "embeddings"
"""Name of the single output of every exported graph, shape ``(batch, dimension)``."""

EXTERNAL_DATA_SUFFIX = ".data"
"""Appended to a graph's file name for its external weights file (graphs over 2 GB only)."""


def export_graph(
    module: torch.nn.Module,
    example: Sequence[torch.Tensor],
    path: Path,
    *,
    input_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int = DEFAULT_OPSET,
    output_names: Sequence[str] = (OUTPUT_NAME,),
) -> None:
    """Trace ``module`` on ``example`` and write it to ``path`` as a checked ONNX graph.

    A graph over 2 GB gets its weights in one file beside it, ``path`` +
    :data:`EXTERNAL_DATA_SUFFIX`.

    Args:
        module: takes the inputs in ``input_names`` order and returns one tensor per output name
            (an embedder's ``(batch, dimension)``).
        example: example inputs for tracing; give padded batches so that masking is traced.
        path: the ``.onnx`` file to write.
        input_names: graph input names, in argument order.
        dynamic_axes: for each input, its dynamic axes (``{0: "batch", 1: "sequence"}``); an
            output not named here gets a dynamic batch axis.
        opset: ONNX opset version.
        output_names: graph output names, in the order the module returns them; the embedders'
            single :data:`OUTPUT_NAME` unless given (the reranker's is ``logits``).

    Raises:
        onnx.checker.ValidationError: the written graph is not valid ONNX.
    """
    # The exporter puts the module back in the mode it found it in afterwards; a wrapper left in
    # training mode would switch dropout back on in the model it wraps.
    module.eval()
    axes = {name: dict(dims) for name, dims in dynamic_axes.items()}
    for output in output_names:
        axes.setdefault(output, {0: "batch"})
    path = Path(path)
    # Over 2 GB the exporter writes every weight as its own file beside the graph; a scratch
    # directory keeps those out of the model directory until they are gathered into one file.
    with tempfile.TemporaryDirectory(prefix=".export-", dir=path.parent) as scratch:
        traced = Path(scratch) / path.name
        with torch.no_grad(), warnings.catch_warnings():
            # Tracer warnings flag Python branches frozen into the graph; the exporters' parity
            # checks on other shapes are what shows whether any of them matters.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The TorchScript exporter deprecates itself and its helpers; see the module docstring.
            warnings.simplefilter("ignore", DeprecationWarning)
            # Raised for transformers' padding mask, which indexes with aranges: never negative.
            warnings.filterwarnings(
                "ignore", message=".*aten::index operator of advanced indexing.*"
            )
            torch.onnx.export(
                module,
                tuple(example),
                str(traced),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        _move_graph(traced, path)
    # Checking by path (not a loaded proto) works past 2 GB and reads the external data file.
    onnx.checker.check_model(str(path), full_check=True)


def _move_graph(traced: Path, path: Path) -> None:
    """Move an exported graph to ``path``; weights the exporter wrote as separate files go into
    one external data file, ``path`` + :data:`EXTERNAL_DATA_SUFFIX`."""
    if [entry.name for entry in traced.parent.iterdir()] == [traced.name]:
        traced.replace(path)
        return
    model = onnx.load(str(traced), load_external_data=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + EXTERNAL_DATA_SUFFIX,
        # Small constants (shapes, scalars) stay inside the graph, as onnx does by default.
        size_threshold=1024,
    )
    # onnx creates the data file private (0600); the service reads it as it reads the graph.
    (path.parent / (path.name + EXTERNAL_DATA_SUFFIX)).chmod(path.stat().st_mode & 0o777)
