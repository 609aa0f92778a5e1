"""A sentence embedder served by ONNX Runtime: :class:`core.ports.TextEmbedder` for literature.

Why it exists: literature search embeds passages and queries with a sentence-embedding model. The
exporter (:mod:`adapters.models.export.minilm`) folds the transformer, the attention-masked mean
pooling and the L2 normalisation into one graph, so serving is: tokenize, run, return. The graph
runs in a :class:`adapters.models.session.ModelSession` (providers, precision variant, warm-up)
behind a :class:`adapters.models.batching.MicroBatcher`, so that concurrent queries share runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adapters.models.batching import BatchSettings
from adapters.models.served import ServedModel
from adapters.models.session import (
    ProviderPreference,
    SessionSettings,
    check_signature,
)
from adapters.models.tokenization import encode_batch
from core.types import Vector

__all__ = ["GRAPH_NAME", "OnnxTextEmbedder"]

GRAPH_NAME = "model.onnx"
"""File name of the text graph in a ``text-embedder`` directory."""


class OnnxTextEmbedder(ServedModel):
    """Text embeddings from an exported ``text-embedder`` directory.

    The directory is verified against its manifest before anything is loaded.

    Args:
        directory: the exported model directory (``model.onnx``, ``tokenizer.json``,
            ``manifest.json``, and any precision variants).
        session: how the graph's session is created (providers, precision, threads, warm-up);
            defaults to :class:`adapters.models.session.SessionSettings` ``()``.
        batching: how concurrent requests are gathered into runs.
        providers: shortcut for ``session=SessionSettings(providers=...)``, see
            :func:`adapters.models.session.resolve_providers`.
        intra_op_threads: shortcut for ``session=SessionSettings(intra_op_threads=...)``.

    Attributes:
        card: name and description of the model, for the clinician.
        dimension: length of the embeddings.
        manifest: the verified manifest.
        model_id: the model's identity, for the stores (see
            :attr:`adapters.models.manifest.Manifest.model_id`).
        model_session: the graph's session.

    Raises:
        ManifestError: the directory is not an intact ``text-embedder`` export.
        ValueError: ``session`` and a shortcut were both given, or no preferred provider is
            available.

    Example:
        >>> embedder = OnnxTextEmbedder("/models/minilm")  # doctest: +SKIP
        >>> (await embedder.embed_texts(["pleural effusion"])).shape  # doctest: +SKIP
        (1, 384)
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
            "text-embedder",
            session=session,
            batching=batching,
            providers=providers,
            intra_op_threads=intra_op_threads,
        )
        directory, manifest = self.directory, self.manifest
        self.dimension: int = manifest.dimension
        self.model_session = self._open_graph(
            GRAPH_NAME,
            check=lambda graph: check_signature(
                graph,
                directory,
                inputs=("input_ids", "attention_mask"),
                dimension=manifest.dimension,
            ),
            shapes={"input_ids": ("batch", "sequence"), "attention_mask": ("batch", "sequence")},
        )
        self._batcher = self._batched(self.model_session, self._embed_batch)

    async def embed_texts(self, texts: Sequence[str]) -> Vector:
        """L2-normalised embeddings of ``texts``, float32 of shape ``(len(texts), dimension)``.

        The texts join a batch with other callers' texts (padded to the longest of the batch,
        which the graph masks); tokenizing and inference run in a worker thread, off the event
        loop.

        Raises:
            TypeError: an item is not a string.
        """
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        # Checked here, so that one caller's wrong input cannot fail a batch shared with others.
        if not all(isinstance(text, str) for text in texts):
            raise TypeError("texts must be strings")
        return np.stack(await self._batcher.submit(list(texts)))

    def _embed_batch(self, texts: list[str]) -> list[Vector]:
        input_ids, attention_mask = encode_batch(self._tokenizer, texts)
        (embeddings,) = self.model_session.run(
            {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        return list(np.asarray(embeddings, dtype=np.float32))
