"""A CLIP-style image/text model served by ONNX Runtime: :class:`core.ports.ImageEmbedder`.

Why it exists: similar cases are searched by chest image and by recorded findings in one embedding
space (BiomedCLIP, or the tiny placeholder with the same architecture). The exporter
(:mod:`adapters.models.export.open_clip_onnx`) writes the two towers as ``image.onnx`` and
``text.onnx``, each ending in L2 normalisation, with the tokenizer and the image preprocessing
beside them; this class prepares inputs exactly as open_clip does and runs the graphs. Each graph
runs in a :class:`adapters.models.session.ModelSession` (providers, precision variant, warm-up)
behind its own :class:`adapters.models.batching.MicroBatcher`, so that concurrent requests share
runs.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adapters.models.batching import BatchSettings
from adapters.models.manifest import ManifestError
from adapters.models.preprocess import PREPROCESS_NAME, ImagePreprocessing, preprocess_image
from adapters.models.served import ServedModel
from adapters.models.session import (
    ProviderPreference,
    SessionSettings,
    check_signature,
)
from adapters.models.tokenization import encode_batch
from core.types import Vector

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


class OnnxClipEmbedder(ServedModel):
    """Image and findings embeddings from an exported ``image-text-embedder`` directory.

    The directory is verified against its manifest before anything is loaded.

    Args:
        directory: the exported model directory (``image.onnx``, ``text.onnx``,
            ``tokenizer.json``, ``preprocess.json``, ``manifest.json``, and any precision
            variants).
        session: how the graphs' sessions are created (providers, precision, threads, warm-up);
            defaults to :class:`adapters.models.session.SessionSettings` ``()``.
        batching: how concurrent requests are gathered into runs, per graph.
        providers: shortcut for ``session=SessionSettings(providers=...)``, see
            :func:`adapters.models.session.resolve_providers`.
        intra_op_threads: shortcut for ``session=SessionSettings(intra_op_threads=...)``.

    Attributes:
        card: name and description of the model, for the clinician.
        dimension: length of the embeddings (shared by both towers).
        manifest: the verified manifest.
        model_id: the model's identity, for the stores.
        preprocessing: how images are prepared for the image tower.
        image_session: the image tower's session.
        text_session: the text tower's session.

    Raises:
        ManifestError: the directory is not an intact ``image-text-embedder`` export.
        ValueError: ``session`` and a shortcut were both given, or no preferred provider is
            available.

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
        session: SessionSettings | None = None,
        batching: BatchSettings | None = None,
        providers: ProviderPreference | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        super().__init__(
            directory,
            "image-text-embedder",
            session=session,
            batching=batching,
            providers=providers,
            intra_op_threads=intra_op_threads,
        )
        directory, manifest = self.directory, self.manifest
        try:
            self.preprocessing = ImagePreprocessing.load(directory / PREPROCESS_NAME)
        except ValueError as error:
            raise ManifestError(directory, str(error)) from None
        if self.preprocessing.image_size != manifest.image_size:
            raise ManifestError(directory, f"{PREPROCESS_NAME} disagrees with the manifest")
        self.dimension: int = manifest.dimension
        size = self.preprocessing.image_size
        self.image_session = self._open_graph(
            IMAGE_GRAPH_NAME,
            check=lambda graph: check_signature(
                graph, directory, inputs=("pixel_values",), dimension=manifest.dimension
            ),
            shapes={"pixel_values": ("batch", 3, size, size)},
        )
        self.text_session = self._open_graph(
            TEXT_GRAPH_NAME,
            check=lambda graph: check_signature(
                graph, directory, inputs=("input_ids",), dimension=manifest.dimension
            ),
            shapes={"input_ids": ("batch", "sequence")},
        )
        self._images = self._batched(self.image_session, self._embed_image_batch)
        self._texts = self._batched(self.text_session, self._embed_text_batch)

    async def embed_images(self, images: Sequence[Vector]) -> Vector:
        """L2-normalised embeddings of ``(H, W)`` float images in ``[0, 1]`` (0 is black),
        float32 of shape ``(len(images), dimension)``.

        The images join a batch with other callers' images; preprocessing and inference run in
        a worker thread, off the event loop.

        Raises:
            ValueError: an image is not 2-D, or has values outside ``[0, 1]`` (other callers'
                images in the same batch are not affected).
        """
        if not images:
            return np.zeros((0, self.dimension), dtype=np.float32)
        outcomes = await self._images.submit(list(images))
        vectors = []
        for outcome in outcomes:
            if isinstance(outcome, ValueError):
                raise outcome
            vectors.append(outcome)
        return np.stack(vectors)

    async def embed_findings(self, texts: Sequence[str]) -> Vector:
        """L2-normalised embeddings of findings texts in the image embedding space, float32 of
        shape ``(len(texts), dimension)``.

        Raises:
            TypeError: an item is not a string.
        """
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        # Checked here, so that one caller's wrong input cannot fail a batch shared with others.
        if not all(isinstance(text, str) for text in texts):
            raise TypeError("findings must be strings")
        return np.stack(await self._texts.submit(list(texts)))

    def _embed_image_batch(self, images: list[Vector]) -> list[Vector | ValueError]:
        # An invalid image fails its own caller only: its error takes its place in the results.
        prepared: list[Vector | ValueError] = []
        for image in images:
            try:
                prepared.append(preprocess_image(image, self.preprocessing))
            except ValueError as error:
                prepared.append(error)
        valid = [pixels for pixels in prepared if not isinstance(pixels, ValueError)]
        if not valid:
            return prepared
        (embeddings,) = self.image_session.run({"pixel_values": np.stack(valid)})
        rows = iter(np.asarray(embeddings, dtype=np.float32))
        return [item if isinstance(item, ValueError) else next(rows) for item in prepared]

    def _embed_text_batch(self, texts: list[str]) -> list[Vector]:
        # The text graph derives its attention mask from the pad id, so the mask is not passed.
        input_ids, _ = encode_batch(self._tokenizer, [clean_text(text) for text in texts])
        (embeddings,) = self.text_session.run({"input_ids": input_ids})
        return list(np.asarray(embeddings, dtype=np.float32))
