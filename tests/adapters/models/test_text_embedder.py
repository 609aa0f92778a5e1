"""The exported MiniLM serves sentence-transformers' embeddings through onnxruntime."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertModel

from adapters.models.batching import BatchSettings
from adapters.models.export.minilm import minilm_source
from adapters.models.export.parity import MIN_COSINE, min_cosine
from adapters.models.manifest import ManifestError, load_manifest
from adapters.models.session import SessionSettings
from adapters.models.text import OnnxTextEmbedder
from core.ports import TextEmbedder

LONG = "Chest radiograph shows bilateral interstitial opacities and small effusions. " * 40


@pytest.fixture(scope="module")
def embedder(minilm_dir: Path) -> OnnxTextEmbedder:
    return OnnxTextEmbedder(minilm_dir, providers="cpu")


def embed(embedder: OnnxTextEmbedder, texts: list[str]) -> np.ndarray:
    return asyncio.run(embedder.embed_texts(texts))


def _sentence_transformers_reference(texts: list[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 as sentence-transformers computes it: Hugging Face tokenizer (256 tokens),
    BertModel, mean over the attention mask, L2 normalisation."""
    source = str(minilm_source())
    tokenizer = AutoTokenizer.from_pretrained(source)
    model: torch.nn.Module = BertModel.from_pretrained(source)
    model.eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


def test_manifest_describes_the_real_general_english_model(minilm_dir: Path) -> None:
    manifest = load_manifest(minilm_dir)
    assert manifest.name == "all-MiniLM-L6-v2"
    assert manifest.kind == "text-embedder"
    assert (manifest.dimension, manifest.max_length, manifest.image_size) == (384, 256, None)
    assert "not trained on medical text" in manifest.description
    assert manifest.parity.min_cosine >= MIN_COSINE
    padding = json.loads((minilm_dir / "tokenizer.json").read_text())["padding"]
    assert padding["strategy"] == "BatchLongest"


def test_implements_the_port_with_normalised_vectors(embedder: OnnxTextEmbedder) -> None:
    assert isinstance(embedder, TextEmbedder)
    assert embedder.dimension == 384
    assert embedder.card.name == "all-MiniLM-L6-v2"
    vectors = embed(embedder, ["Small left pleural effusion.", "", LONG])
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_empty_input_gives_an_empty_matrix(embedder: OnnxTextEmbedder) -> None:
    vectors = embed(embedder, [])
    assert vectors.shape == (0, 384)
    assert vectors.dtype == np.float32


def test_matches_sentence_transformers_computed_in_torch(embedder: OnnxTextEmbedder) -> None:
    texts = ["Pleural effusion.", "Fluid in the pleural space.", "Heart failure", LONG]
    assert min_cosine(_sentence_transformers_reference(texts), embed(embedder, texts)) >= MIN_COSINE


def test_embedding_does_not_depend_on_the_batch(embedder: OnnxTextEmbedder) -> None:
    alone = embed(embedder, ["Pleural effusion."])[0]
    batched = embed(embedder, ["Pleural effusion.", LONG, "Rib fracture"])[0]
    np.testing.assert_allclose(alone, batched, atol=1e-5)


def test_long_texts_are_truncated_at_256_tokens(embedder: OnnxTextEmbedder) -> None:
    extended = embed(embedder, [LONG, LONG + " Completely different ending about a wrist."])
    np.testing.assert_allclose(extended[0], extended[1], atol=1e-6)


def test_similarities_are_semantically_sensible(embedder: OnnxTextEmbedder) -> None:
    effusion, paraphrase, wrist, pneumonia, consolidation = embed(
        embedder,
        [
            "pleural effusion",
            "fluid in the pleural space",
            "fractured wrist",
            "community-acquired pneumonia",
            "lung infection with consolidation",
        ],
    )
    assert effusion @ paraphrase > effusion @ wrist + 0.2
    assert pneumonia @ consolidation > pneumonia @ wrist + 0.2


def test_refuses_an_image_text_model_directory(tiny_dir: Path) -> None:
    with pytest.raises(ManifestError, match="not 'text-embedder'"):
        OnnxTextEmbedder(tiny_dir)


def test_concurrent_queries_share_runs_and_get_their_own_embeddings(minilm_dir: Path) -> None:
    embedder = OnnxTextEmbedder(
        minilm_dir, providers="cpu", batching=BatchSettings(max_batch=32, max_wait_ms=2.0)
    )
    # Lengths from 2 to about 100 tokens: each batch is padded to its longest text.
    texts = [f"Finding {n}: " + "pleural effusion and atelectasis, " * (n % 9) for n in range(32)]

    async def concurrently() -> tuple[list[np.ndarray], int]:
        before = embedder.model_session.runs
        vectors = await asyncio.gather(*(embedder.embed_texts([text]) for text in texts))
        return vectors, embedder.model_session.runs - before

    vectors, runs = asyncio.run(concurrently())
    assert runs <= 2
    for text, batched in zip(texts, vectors, strict=True):
        assert min_cosine(embed(embedder, [text]), batched) >= 0.99999


def test_runtime_and_settings(minilm_dir: Path, embedder: OnnxTextEmbedder) -> None:
    (graph,) = embedder.runtime.graphs
    assert (graph.graph, graph.file, graph.precision) == ("model.onnx", "model.onnx", "fp32")
    assert graph.providers == ("CPUExecutionProvider",)
    assert embedder.runtime.model_id == embedder.model_id
    int8 = OnnxTextEmbedder(minilm_dir, session=SessionSettings(providers="cpu", precision="int8"))
    assert int8.runtime.graphs[0].file == "model.int8.onnx"
    assert int8.model_id == embedder.model_id
    with pytest.raises(TypeError, match="strings"):
        embed(embedder, ["effusion", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not both"):
        OnnxTextEmbedder(minilm_dir, session=SessionSettings(), intra_op_threads=1)
