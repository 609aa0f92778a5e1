"""A sentence embedder served by ONNX Runtime: :class:`core.ports.TextEmbedder` for literature.

Why it exists: literature search embeds passages and queries with a sentence-embedding model. The
exporter (:mod:`adapters.models.export.minilm`) folds the transformer, the attention-masked mean
pooling and the L2 normalisation into one graph, so serving is: tokenize, run, return.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adapters.models.manifest import ManifestError, load_manifest
from adapters.models.session import ProviderPreference, check_signature, create_session
from adapters.models.tokenization import TOKENIZER_NAME, encode_batch, load_tokenizer
from core.types import ModelCard, Vector

__all__ = ["GRAPH_NAME", "OnnxTextEmbedder"]

GRAPH_NAME = "model.onnx"
"""File name of the text graph in a ``text-embedder`` directory."""


class OnnxTextEmbedder:
    """Text embeddings from an exported ``text-embedder`` directory.

    The directory is verified against its manifest before anything is loaded.

    Args:
        directory: the exported model directory (``model.onnx``, ``tokenizer.json``,
            ``manifest.json``).
        providers: execution provider preference, see
            :func:`adapters.models.session.resolve_providers`.
        intra_op_threads: onnxruntime threads per operator; ``None`` uses all cores.

    Attributes:
        card: name and description of the model, for the clinician.
        dimension: length of the embeddings.
        manifest: the verified manifest.
        model_id: the model's identity, for the stores (see
            :attr:`adapters.models.manifest.Manifest.model_id`).

    Raises:
        ManifestError: the directory is not an intact ``text-embedder`` export.

    Example:
        >>> embedder = OnnxTextEmbedder("/models/minilm")  # doctest: +SKIP
        >>> (await embedder.embed_texts(["pleural effusion"])).shape  # doctest: +SKIP
        (1, 384)
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        providers: ProviderPreference = "auto",
        intra_op_threads: int | None = None,
    ) -> None:
        directory = Path(directory)
        manifest = load_manifest(directory)
        if manifest.kind != "text-embedder":
            raise ManifestError(directory, f"kind is {manifest.kind!r}, not 'text-embedder'")
        self.manifest = manifest
        self.model_id = manifest.model_id
        self.card: ModelCard = manifest.card
        self.dimension: int = manifest.dimension
        self._tokenizer = load_tokenizer(directory / TOKENIZER_NAME, max_length=manifest.max_length)
        self._session = create_session(
            directory / GRAPH_NAME, providers=providers, intra_op_threads=intra_op_threads
        )
        check_signature(
            self._session,
            directory,
            inputs=("input_ids", "attention_mask"),
            dimension=manifest.dimension,
        )

    async def embed_texts(self, texts: Sequence[str]) -> Vector:
        """L2-normalised embeddings of ``texts``, float32 of shape ``(len(texts), dimension)``.

        Tokenizing and inference run in a worker thread, off the event loop.
        """
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return await asyncio.to_thread(self._embed, list(texts))

    def _embed(self, texts: list[str]) -> Vector:
        input_ids, attention_mask = encode_batch(self._tokenizer, texts)
        (embeddings,) = self._session.run(
            None, {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        return np.asarray(embeddings, dtype=np.float32)
