"""The exported tiny BiomedCLIP-architecture model serves the torch model's embeddings."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adapters.models.batching import BatchSettings
from adapters.models.clip import OnnxClipEmbedder, clean_text
from adapters.models.export.open_clip_onnx import parity_images
from adapters.models.export.parity import MIN_COSINE, min_cosine
from adapters.models.export.precision import INT8_MIN_COSINE
from adapters.models.preprocess import preprocess_images
from adapters.models.session import SessionSettings
from core.ports import ImageEmbedder

FINDINGS = [
    "Small left pleural effusion.",
    "No acute cardiopulmonary abnormality.",
    "Large right pneumothorax with mediastinal shift; chest tube recommended.",
    "Cardiomegaly. " * 120,
]


@pytest.fixture(scope="module")
def embedder(tiny_dir: Path) -> OnnxClipEmbedder:
    return OnnxClipEmbedder(tiny_dir, providers="cpu")


def images_of(embedder: OnnxClipEmbedder, images: list[np.ndarray]) -> np.ndarray:
    return asyncio.run(embedder.embed_images(images))


def findings_of(embedder: OnnxClipEmbedder, texts: list[str]) -> np.ndarray:
    return asyncio.run(embedder.embed_findings(texts))


def test_implements_the_port_and_says_it_is_a_random_placeholder(
    embedder: OnnxClipEmbedder,
) -> None:
    assert isinstance(embedder, ImageEmbedder)
    assert embedder.dimension == 64
    assert embedder.card.name == "tiny-biomedclip"
    assert "RANDOM placeholder" in embedder.card.description
    assert "mean nothing" in embedder.card.description
    assert embedder.model_id.startswith("tiny-biomedclip@")
    assert embedder.manifest.parity.min_cosine >= MIN_COSINE


def test_images_of_any_size_give_normalised_vectors(embedder: OnnxClipEmbedder) -> None:
    rng = np.random.default_rng(3)
    shapes = [(64, 64), (512, 384), (300, 900), (224, 224)]
    images = [rng.random(shape, dtype=np.float32) for shape in shapes]
    vectors = images_of(embedder, images)
    assert vectors.shape == (4, 64)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert images_of(embedder, []).shape == (0, 64)


def test_image_embedding_does_not_depend_on_the_batch(embedder: OnnxClipEmbedder) -> None:
    images = parity_images()
    alone = images_of(embedder, images[1:2])[0]
    batched = images_of(embedder, images)[1]
    np.testing.assert_allclose(alone, batched, atol=1e-5)


def test_invalid_images_are_rejected(embedder: OnnxClipEmbedder) -> None:
    with pytest.raises(ValueError, match="within"):
        images_of(embedder, [np.full((64, 64), 255.0, np.float32)])
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        images_of(embedder, [np.zeros((64, 64, 3), np.float32)])


def test_findings_give_normalised_vectors(embedder: OnnxClipEmbedder) -> None:
    vectors = findings_of(embedder, FINDINGS)
    assert vectors.shape == (4, 64)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert findings_of(embedder, []).shape == (0, 64)


def test_findings_embedding_does_not_depend_on_the_batch(embedder: OnnxClipEmbedder) -> None:
    alone = findings_of(embedder, FINDINGS[:1])[0]
    batched = findings_of(embedder, FINDINGS)[0]
    np.testing.assert_allclose(alone, batched, atol=1e-5)


def test_findings_are_cleaned_like_open_clip(embedder: OnnxClipEmbedder) -> None:
    assert (
        clean_text("  Small\tleft &amp;amp; right\n effusions ") == "Small left & right effusions"
    )
    messy, tidy = findings_of(embedder, ["  Small   left\npleural effusion. ", FINDINGS[0]])
    np.testing.assert_allclose(messy, tidy, atol=1e-6)


def test_image_tower_matches_torch(embedder: OnnxClipEmbedder, tiny_torch: tuple[Any, Any]) -> None:
    model, _ = tiny_torch
    images = parity_images()
    pixel_values = torch.from_numpy(preprocess_images(images, embedder.preprocessing))
    with torch.no_grad():
        expected = model.encode_image(pixel_values, normalize=True).numpy()
    assert min_cosine(expected, images_of(embedder, images)) >= MIN_COSINE


def test_text_tower_matches_torch(embedder: OnnxClipEmbedder, tiny_torch: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_torch
    with torch.no_grad():
        expected = model.encode_text(tokenizer(FINDINGS), normalize=True).numpy()
    assert min_cosine(expected, findings_of(embedder, FINDINGS)) >= MIN_COSINE


def test_concurrent_calls_share_runs_and_get_their_own_results(tiny_dir: Path) -> None:
    embedder = OnnxClipEmbedder(
        tiny_dir, providers="cpu", batching=BatchSettings(max_batch=32, max_wait_ms=2.0)
    )
    rng = np.random.default_rng(5)
    # Different sizes: each image is preprocessed alone, then batched.
    images = [rng.random((64 + 9 * n, 200 - 3 * n), dtype=np.float32) for n in range(32)]
    texts = [f"{FINDINGS[n % 3]} {'Stable. ' * n}" for n in range(32)]

    async def concurrently() -> tuple[list[np.ndarray], list[np.ndarray], int, int]:
        image_runs, text_runs = embedder.image_session.runs, embedder.text_session.runs
        by_image = await asyncio.gather(*(embedder.embed_images([image]) for image in images))
        by_text = await asyncio.gather(*(embedder.embed_findings([text]) for text in texts))
        return (
            by_image,
            by_text,
            embedder.image_session.runs - image_runs,
            embedder.text_session.runs - text_runs,
        )

    by_image, by_text, image_runs, text_runs = asyncio.run(concurrently())
    assert image_runs <= 2
    assert text_runs <= 2
    for image, batched in zip(images, by_image, strict=True):
        assert min_cosine(images_of(embedder, [image]), batched) >= 0.99999
    # Texts are padded to the longest of their batch; the graph masks the padding.
    for text, batched in zip(texts, by_text, strict=True):
        assert min_cosine(findings_of(embedder, [text]), batched) >= 0.99999


def test_an_invalid_image_fails_only_its_own_caller(embedder: OnnxClipEmbedder) -> None:
    good = np.full((64, 64), 0.5, np.float32)

    async def together() -> list[object]:
        return await asyncio.gather(
            embedder.embed_images([np.full((64, 64), 2.0, np.float32)]),
            embedder.embed_images([good]),
            return_exceptions=True,
        )

    refused, served = asyncio.run(together())
    assert isinstance(refused, ValueError)
    assert isinstance(served, np.ndarray)
    np.testing.assert_allclose(served, images_of(embedder, [good]), atol=1e-6)
    with pytest.raises(TypeError, match="strings"):
        findings_of(embedder, ["effusion", None])  # type: ignore[list-item]


def test_runtime_reports_what_each_tower_runs_on(embedder: OnnxClipEmbedder) -> None:
    runtime = embedder.runtime
    assert runtime.model_id == embedder.model_id
    assert [graph.graph for graph in runtime.graphs] == ["image.onnx", "text.onnx"]
    for graph in runtime.graphs:
        assert graph.providers == ("CPUExecutionProvider",)
        assert graph.precision == "fp32"
        assert graph.warmup_seconds is not None


def test_int8_towers_on_request(tiny_dir: Path) -> None:
    embedder = OnnxClipEmbedder(
        tiny_dir, session=SessionSettings(providers="cpu", precision="int8")
    )
    assert [graph.file for graph in embedder.runtime.graphs] == [
        "image.int8.onnx",
        "text.int8.onnx",
    ]
    reference = OnnxClipEmbedder(tiny_dir, providers="cpu")
    images = parity_images()
    assert min_cosine(images_of(reference, images), images_of(embedder, images)) >= INT8_MIN_COSINE
    assert (
        min_cosine(findings_of(reference, FINDINGS), findings_of(embedder, FINDINGS))
        >= INT8_MIN_COSINE
    )
    with pytest.raises(ValueError, match="not both"):
        OnnxClipEmbedder(tiny_dir, session=SessionSettings(), providers="cpu")
