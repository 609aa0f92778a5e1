"""A tiny, randomly initialised cross-encoder reranker, built from nothing.

Why it exists: the demo and the tests must run the real reranking pipeline (a Hugging Face
cross-encoder folder, ONNX export in FlashRank's layout, parity, serving) without network access
to the model hub and in seconds. This module writes a Hugging Face
``BertForSequenceClassification`` folder with one output label, the architecture of
ms-marco-MiniLM-L-12-v2, but 2 layers of width 64 (2 heads), random weights from a seed, and the
WordPiece vocabulary the tiny image/text model counts from ``tiny_corpus.txt``. It then goes
through :func:`adapters.models.export.reranker.export_reranker`, the code a real cross-encoder
uses. ``size="real"`` gives ms-marco-MiniLM-L-12-v2's own dimensions (12 layers, width 384, 12
heads, 30,522-token embedding table), still random, to measure speed.

Its scores mean nothing: it is a placeholder, and its manifest says so to the clinician.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer

from adapters.models.export.graph import DEFAULT_OPSET
from adapters.models.export.reranker import DEFAULT_FLASHRANK_NAME, export_reranker
from adapters.models.export.tiny import BERT_SPECIAL_TOKENS, CORPUS, corpus_wordpiece_tokenizer
from adapters.models.rerank import INPUT_NAMES

__all__ = [
    "REAL_SIZE_RERANKER_NAME",
    "TINY_RERANKER_NAME",
    "RerankerSize",
    "build_tiny_reranker",
    "write_tiny_reranker_source",
]

TINY_RERANKER_NAME = "tiny-reranker"
"""Manifest name of the tiny build."""

REAL_SIZE_RERANKER_NAME = "random-reranker"
"""Manifest name of the full-size random build."""

RerankerSize = Literal["tiny", "real"]
"""``tiny``: 2 layers of width 64, for tests and demos. ``real``: ms-marco-MiniLM-L-12-v2's
dimensions with random weights, for speed measurements."""

_MAX_LENGTH = 512


@dataclass(frozen=True, slots=True)
class _Dimensions:
    layers: int
    width: int
    heads: int
    intermediate: int
    vocab_size: int
    initializer_range: float


_SIZES = {
    # vocab_size 0: the corpus vocabulary's own size. At width 64, BERT's initialisation (std 0.02)
    # leaves the [CLS] vector almost the same for every input; std 0.1 lets the text move it.
    "tiny": _Dimensions(2, 64, 2, 128, vocab_size=0, initializer_range=0.1),
    # cross-encoder/ms-marco-MiniLM-L-12-v2's BERT configuration and BERT's initialisation.
    "real": _Dimensions(12, 384, 12, 1536, vocab_size=30522, initializer_range=0.02),
}


def write_tiny_reranker_source(
    source_dir: Path | str, *, seed: int = 0, size: RerankerSize = "tiny"
) -> Path:
    """Write the tiny reranker as a Hugging Face model folder, with seeded random weights.

    The folder holds ``config.json``, ``model.safetensors``, ``tokenizer.json`` and
    ``tokenizer_config.json``; ``AutoModelForSequenceClassification`` and ``AutoTokenizer`` load
    it offline.

    Args:
        source_dir: the folder to write; created if needed.
        seed: seed of the weights; the same seed gives the same files.
        size: ``"tiny"``, or ``"real"`` for ms-marco-MiniLM-L-12-v2's dimensions (its embedding
            table keeps the 30,522-token vocabulary size; ids past the corpus vocabulary are
            simply never produced).

    Returns:
        The folder.

    Raises:
        RuntimeError: the saved tokenizer does not load back as the one written.

    Example:
        >>> write_tiny_reranker_source("/tmp/tiny-reranker-source", seed=0)  # doctest: +SKIP
        PosixPath('/tmp/tiny-reranker-source')
    """
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    dims = _SIZES[size]
    source_dir = Path(source_dir).resolve()
    source_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = corpus_wordpiece_tokenizer(CORPUS.read_text(encoding="utf-8").splitlines())
    # transformers 5's BertTokenizerFast(vocab_file=...) ignores the file; wrapping the tokenizers
    # object is the way that keeps the vocabulary. The input names make AutoTokenizer return the
    # segment ids a cross-encoder needs.
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=_MAX_LENGTH,
        model_input_names=list(INPUT_NAMES),
        **BERT_SPECIAL_TOKENS,
    ).save_pretrained(str(source_dir))
    _check_tokenizer_round_trip(source_dir, tokenizer)
    config = BertConfig(
        vocab_size=max(tokenizer.get_vocab_size(), dims.vocab_size),
        hidden_size=dims.width,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        intermediate_size=dims.intermediate,
        max_position_embeddings=_MAX_LENGTH,
        type_vocab_size=2,
        initializer_range=dims.initializer_range,
        pad_token_id=tokenizer.token_to_id(BERT_SPECIAL_TOKENS["pad_token"]),
    )
    # One relevance logit per pair (set here: BertConfig's typed signature does not list it).
    config.num_labels = 1
    # fork_rng keeps the caller's random state untouched by the seeding.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
        # With the initialisation's head the untrained logits of different passages lie within
        # about 1e-4 of each other, close enough to float rounding that ONNX and torch could rank
        # them apart; this head spreads them about a unit (gaps of 1e-3 or more on the parity
        # batches, against rounding of about 1e-6), so the ranking is well defined.
        torch.nn.init.normal_(model.classifier.weight, std=0.5)
    model.save_pretrained(str(source_dir))
    return source_dir


def build_tiny_reranker(
    out_dir: Path | str,
    *,
    seed: int = 0,
    size: RerankerSize = "tiny",
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Build the tiny reranker and export it to ``out_dir`` as a ``reranker`` directory.

    The graph is named for FlashRank's ``ms-marco-MiniLM-L-12-v2`` slot, the model it stands in
    for; ``flashrank.Ranker`` finds it when ``out_dir`` is named ``ms-marco-MiniLM-L-12-v2`` (see
    :func:`adapters.models.export.reranker.export_reranker`).

    Args:
        out_dir: the model directory to create; must not exist or be empty.
        seed: seed of the random weights; the same seed gives identical files.
        size: ``"tiny"``, or ``"real"`` for ms-marco-MiniLM-L-12-v2's dimensions with random
            weights (see :func:`write_tiny_reranker_source`; for speed measurements).
        opset: ONNX opset version.

    Returns:
        The model directory, named ``tiny-reranker`` or ``random-reranker`` in its manifest.

    Example:
        >>> build_tiny_reranker("/models/ms-marco-MiniLM-L-12-v2")  # doctest: +SKIP
        PosixPath('/models/ms-marco-MiniLM-L-12-v2')
    """
    tiny = size == "tiny"
    with tempfile.TemporaryDirectory(prefix="tiny-reranker-source-") as scratch:
        source = write_tiny_reranker_source(Path(scratch) / "source", seed=seed, size=size)
        return export_reranker(
            source,
            out_dir,
            flashrank_name=DEFAULT_FLASHRANK_NAME,
            name=TINY_RERANKER_NAME if tiny else REAL_SIZE_RERANKER_NAME,
            description=(
                f"{'Tiny' if tiny else 'Full-size'} RANDOM placeholder cross-encoder reranker, "
                "never trained: its relevance scores mean nothing "
                f"(for {'demos and tests' if tiny else 'speed measurements'} only)."
            ),
            provenance=(
                f"random initialisation, seed {seed}; vocabulary counted from "
                "adapters/models/export/tiny_corpus.txt"
            ),
            max_length=_MAX_LENGTH,
            opset=opset,
        )


def _check_tokenizer_round_trip(source_dir: Path, tokenizer: Tokenizer) -> None:
    """Refuse a saved tokenizer that transformers loads differently from the one written."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(source_dir))
    query, passage = "Pleural effusion?", "Fluid in the pleural space, drained."
    expected = tokenizer.encode(query, passage)
    got = loaded(query, passage)
    if (
        loaded.get_vocab() != tokenizer.get_vocab()
        or got["input_ids"] != expected.ids
        or got["token_type_ids"] != expected.type_ids
    ):
        raise RuntimeError(f"the tokenizer saved in {source_dir} does not load back unchanged")
