"""A CLIP-style image/text model served by ONNX Runtime: :class:`core.ports.ImageEmbedder`.

Why it exists: similar cases are searched by chest image and by recorded findings in one embedding
space (BiomedCLIP, or the tiny placeholder with the same architecture). The exporter
(:mod:`adapters.models.export.open_clip_onnx`) writes the two towers as ``image.onnx`` and
``text.onnx``, each ending in L2 normalisation, with the tokenizer and the image preprocessing
beside them; this class prepares inputs exactly as open_clip does and runs the graphs.
"""

from __future__ import annotations

import asyncio
import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adapters.models.manifest import ManifestError, load_manifest
from adapters.models.preprocess import PREPROCESS_NAME, ImagePreprocessing, preprocess_images
from adapters.models.session import ProviderPreference, check_signature, create_session
from adapters.models.tokenization import TOKENIZER_NAME, encode_batch, load_tokenizer
from core.types import ModelCard, Vector

__all__ = ["IMAGE_GRAPH_NAME", "TEXT_GRAPH_NAME", "OnnxClipEmbedder", "clean_text"]

IMAGE_GRAPH_NAME = "image.onnx"
"""File name of the image tower in an ``image-text-embedder`` directory."""

TEXT_GRAPH_NAME = "text.onnx"
"""File name of the text tower in an ``image-text-embedder`` directory."""


def clean_text(text: str) -> str:
    """open_clip's ``whitespace`` text cleaning, without ftfy: unescape HTML entities (twice, as
    open_clip does) and collapse runs of whitespace.

    open_clip also repairs mis-decoded Unicode with ftfy, which changes nothing in well-formed
    text; findings arrive as decoded JSON strings, so the service does not depend on it.

    Example:
        >>> clean_text("  small  left&amp;right\\neffusions ")
        'small left&right effusions'
    """
    return " ".join(html.unescape(html.unescape(text)).split())


class OnnxClipEmbedder:
    """Image and findings embeddings from an exported ``image-text-embedder`` directory.

    The directory is verified against its manifest before anything is loaded.

    Args:
        directory: the exported model directory (``image.onnx``, ``text.onnx``,
            ``tokenizer.json``, ``preprocess.json``, ``manifest.json``).
        providers: execution provider preference, see
            :func:`adapters.models.session.resolve_providers`.
        intra_op_threads: onnxruntime threads per operator; ``None`` uses all cores.

    Attributes:
        card: name and description of the model, for the clinician.
        dimension: length of the embeddings (shared by both towers).
        manifest: the verified manifest.
        model_id: the model's identity, for the stores.
        preprocessing: how images are prepared for the image tower.

    Raises:
        ManifestError: the directory is not an intact ``image-text-embedder`` export.

    Example:
        >>> embedder = OnnxClipEmbedder("/models/tiny-biomedclip")  # doctest: +SKIP
        >>> (await embedder.embed_images([np.zeros((512, 400), np.float32)])).shape
        ... # doctest: +SKIP
        (1, 64)
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
        if manifest.kind != "image-text-embedder":
            raise ManifestError(directory, f"kind is {manifest.kind!r}, not 'image-text-embedder'")
        try:
            self.preprocessing = ImagePreprocessing.load(directory / PREPROCESS_NAME)
        except ValueError as error:
            raise ManifestError(directory, str(error)) from None
        if self.preprocessing.image_size != manifest.image_size:
            raise ManifestError(directory, f"{PREPROCESS_NAME} disagrees with the manifest")
        self.manifest = manifest
        self.model_id = manifest.model_id
        self.card: ModelCard = manifest.card
        self.dimension: int = manifest.dimension
        self._tokenizer = load_tokenizer(directory / TOKENIZER_NAME, max_length=manifest.max_length)
        self._image = create_session(
            directory / IMAGE_GRAPH_NAME, providers=providers, intra_op_threads=intra_op_threads
        )
        self._text = create_session(
            directory / TEXT_GRAPH_NAME, providers=providers, intra_op_threads=intra_op_threads
        )
        check_signature(
            self._image, directory, inputs=("pixel_values",), dimension=manifest.dimension
        )
        check_signature(self._text, directory, inputs=("input_ids",), dimension=manifest.dimension)

    async def embed_images(self, images: Sequence[Vector]) -> Vector:
        """L2-normalised embeddings of ``(H, W)`` float images in ``[0, 1]`` (0 is black),
        float32 of shape ``(len(images), dimension)``.

        Preprocessing and inference run in a worker thread, off the event loop.

        Raises:
            ValueError: an image is not 2-D, or has values outside ``[0, 1]``.
        """
        if not images:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return await asyncio.to_thread(self._embed_images, list(images))

    async def embed_findings(self, texts: Sequence[str]) -> Vector:
        """L2-normalised embeddings of findings texts in the image embedding space, float32 of
        shape ``(len(texts), dimension)``."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return await asyncio.to_thread(self._embed_texts, list(texts))

    def _embed_images(self, images: list[Vector]) -> Vector:
        pixel_values = preprocess_images(images, self.preprocessing)
        (embeddings,) = self._image.run(None, {"pixel_values": pixel_values})
        return np.asarray(embeddings, dtype=np.float32)

    def _embed_texts(self, texts: list[str]) -> Vector:
        # The text graph derives its attention mask from the pad id, so the mask is not passed.
        input_ids, _ = encode_batch(self._tokenizer, [clean_text(text) for text in texts])
        (embeddings,) = self._text.run(None, {"input_ids": input_ids})
        return np.asarray(embeddings, dtype=np.float32)
