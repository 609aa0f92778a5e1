"""BGE-M3 served by ONNX Runtime: a dense vector and sparse token weights from one run.

Why it exists: hybrid literature search ranks passages both by meaning (a dense vector in the index)
and by the words they share with the query (sparse lexical weights). BGE-M3 gives both from one
pass of its encoder. The exporter (:mod:`adapters.models.export.bge_m3`) writes one graph that
computes both heads as FlagEmbedding does; this module tokenizes, runs the graph once, and turns
the per-token weights into FlagEmbedding's lexical weights: for each token id of a text, the
largest weight it has anywhere in that text, with zero weights left out. The graph has already
zeroed padding and the special tokens FlagEmbedding drops. The graph runs in a
:class:`adapters.models.session.ModelSession` (providers, precision variant, warm-up) behind a
:class:`adapters.models.batching.MicroBatcher`, so that concurrent callers share runs.

:class:`OnnxBgeM3Embedder` is a :class:`core.ports.TextEmbedder` through its dense vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from adapters.models.batching import BatchSettings
from adapters.models.manifest import ManifestError, ModelKind
from adapters.models.served import ServedModel
from adapters.models.session import (
    ProviderPreference,
    SessionSettings,
)
from adapters.models.tokenization import encode_batch
from core.types import SparseWeights, Vector

__all__ = [
    "DENSE_OUTPUT",
    "GRAPH_NAME",
    "INPUT_NAMES",
    "SPARSE_OUTPUT",
    "OnnxBgeM3Embedder",
    "SparseWeights",
    "lexical_weights",
]

GRAPH_NAME = "model.onnx"
"""File name of the graph in a ``dense-sparse-text-embedder`` directory."""

INPUT_NAMES = ("input_ids", "attention_mask")
"""Graph inputs, both int64 ``(batch, sequence)``."""

DENSE_OUTPUT = "dense"
"""Graph output: L2-normalised dense vectors, float32 ``(batch, dimension)``."""

SPARSE_OUTPUT = "sparse"
"""Graph output: one weight per token, float32 ``(batch, sequence)``, zero at padding and at the
special tokens FlagEmbedding leaves out of lexical weights."""


_KIND: ModelKind = "dense-sparse-text-embedder"


def lexical_weights(
    input_ids: npt.NDArray[np.int64], token_weights: npt.NDArray[np.float32]
) -> list[SparseWeights]:
    """FlagEmbedding's lexical weights from the graph's per-token weights.

    For each text, every token id with a positive weight maps to its largest weight in the text
    (a word repeated in a text counts once, at its strongest), as ``BGEM3FlagModel.encode`` does.

    Args:
        input_ids: the token ids the graph was given, ``(batch, sequence)``.
        token_weights: the graph's :data:`SPARSE_OUTPUT` for them, same shape.

    Returns:
        One dict per text, token id to weight.

    Example:
        >>> lexical_weights(np.array([[0, 7, 9, 7, 2]]), np.array([[0, 0.2, 0, 0.5, 0]]))
        [{7: 0.5}]
    """
    if input_ids.shape != token_weights.shape:
        raise ValueError(f"ids {input_ids.shape} and weights {token_weights.shape} differ in shape")
    result: list[SparseWeights] = []
    for ids, weights in zip(input_ids, token_weights, strict=True):
        present = weights > 0
        tokens, position = np.unique(ids[present], return_inverse=True)
        strongest = np.zeros(len(tokens), dtype=weights.dtype)
        np.maximum.at(strongest, position, weights[present])
        result.append(dict(zip(tokens.tolist(), strongest.tolist(), strict=True)))
    return result


class OnnxBgeM3Embedder(ServedModel):
    """Dense vectors and lexical weights from an exported ``dense-sparse-text-embedder``.

    The directory is verified against its manifest before anything is loaded. The graph runs in a
    :class:`adapters.models.session.ModelSession` (providers, precision variant, warm-up) behind a
    :class:`adapters.models.batching.MicroBatcher` whose items are texts: one run computes both
    heads for every waiting text, whichever method each caller used, and each caller gets its own
    dense rows and lexical weights.

    Args:
        directory: the exported model directory (``model.onnx``, for a full-size model also
            ``model.onnx.data``, ``tokenizer.json``, ``manifest.json``, and any precision
            variants).
        session: how the graph's session is created (providers, precision, threads, warm-up);
            defaults to :class:`adapters.models.session.SessionSettings` ``()``.
        batching: how concurrent requests are gathered into runs.
        providers: shortcut for ``session=SessionSettings(providers=...)``, see
            :func:`adapters.models.session.resolve_providers`.
        intra_op_threads: shortcut for ``session=SessionSettings(intra_op_threads=...)``.

    Attributes:
        card: name and description of the model, for the clinician.
        dimension: length of the dense vectors.
        manifest: the verified manifest.
        model_id: the model's identity, for the stores (see
            :attr:`adapters.models.manifest.Manifest.model_id`).
        model_session: the graph's session.

    Raises:
        ManifestError: the directory is not an intact ``dense-sparse-text-embedder`` export.
        ValueError: ``session`` and a shortcut were both given, or no preferred provider is
            available.

    Example:
        >>> embedder = OnnxBgeM3Embedder("/models/bge-m3")  # doctest: +SKIP
        >>> dense, sparse = await embedder.encode(["pleural effusion"])  # doctest: +SKIP
        >>> dense.shape, len(sparse[0])  # doctest: +SKIP
        ((1, 1024), 4)
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        session: SessionSettings | None = None,
        batching: BatchSettings | None = None,
        providers: ProviderPreference | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        super().__init__(
            directory,
            _KIND,
            session=session,
            batching=batching,
            providers=providers,
            intra_op_threads=intra_op_threads,
        )
        directory, manifest = self.directory, self.manifest
        self.dimension: int = manifest.dimension
        self.model_session = self._open_graph(
            GRAPH_NAME,
            check=lambda graph: _check_graph(graph, directory, manifest.dimension),
            shapes={name: ("batch", "sequence") for name in INPUT_NAMES},
        )
        # ModelSession.run returns the outputs in the graph's order; _check_graph made sure that
        # both are there.
        outputs = [node.name for node in self.model_session.session.get_outputs()]
        self._dense_index = outputs.index(DENSE_OUTPUT)
        self._sparse_index = outputs.index(SPARSE_OUTPUT)
        self._batcher = self._batched(self.model_session, self._encode_batch)

    async def embed_texts(self, texts: Sequence[str]) -> Vector:
        """L2-normalised dense vectors of ``texts``, float32 ``(len(texts), dimension)``.

        The texts join a batch with other callers' texts (padded to the longest of the batch,
        which the graph masks); tokenizing and inference run in a worker thread, off the event
        loop.

        Raises:
            TypeError: an item is not a string.
        """
        dense, _ = await self.encode(texts)
        return dense

    async def embed_sparse(self, texts: Sequence[str]) -> list[SparseWeights]:
        """Lexical weights of ``texts``, one dict (token id to weight) per text.

        Batched like :meth:`embed_texts`.

        Raises:
            TypeError: an item is not a string.
        """
        _, sparse = await self.encode(texts)
        return sparse

    async def encode(self, texts: Sequence[str]) -> tuple[Vector, list[SparseWeights]]:
        """Dense vectors and lexical weights of ``texts`` from one run of the graph.

        Returns:
            ``(dense, sparse)`` as :meth:`embed_texts` and :meth:`embed_sparse` return them.

        Raises:
            TypeError: an item is not a string.
        """
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32), []
        # Checked here, so that one caller's wrong input cannot fail a batch shared with others.
        if not all(isinstance(text, str) for text in texts):
            raise TypeError("texts must be strings")
        results = await self._batcher.submit(list(texts))
        return np.stack([dense for dense, _ in results]), [sparse for _, sparse in results]

    def _encode_batch(self, texts: list[str]) -> list[tuple[Vector, SparseWeights]]:
        input_ids, attention_mask = encode_batch(self._tokenizer, texts)
        outputs = self.model_session.run({"input_ids": input_ids, "attention_mask": attention_mask})
        dense = np.asarray(outputs[self._dense_index], dtype=np.float32)
        weights = np.asarray(outputs[self._sparse_index], dtype=np.float32)
        return list(zip(dense, lexical_weights(input_ids, weights), strict=True))


def _check_graph(session: ort.InferenceSession, directory: Path, dimension: int) -> None:
    """Check that the graph takes :data:`INPUT_NAMES` and returns exactly a ``(batch,
    dimension)`` :data:`DENSE_OUTPUT` and a ``(batch, sequence)`` :data:`SPARSE_OUTPUT`."""
    names = [node.name for node in session.get_inputs()]
    if sorted(names) != sorted(INPUT_NAMES):
        raise ManifestError(directory, f"graph inputs are {names}, expected {list(INPUT_NAMES)}")
    shapes = {node.name: node.shape for node in session.get_outputs()}
    dense, sparse = shapes.get(DENSE_OUTPUT), shapes.get(SPARSE_OUTPUT)
    if (
        len(shapes) != 2
        or dense is None
        or sparse is None
        or len(dense) != 2
        or dense[1] != dimension
        or len(sparse) != 2
    ):
        raise ManifestError(
            directory,
            f"graph outputs {shapes}, expected {DENSE_OUTPUT} [batch, {dimension}] and "
            f"{SPARSE_OUTPUT} [batch, sequence]",
        )
