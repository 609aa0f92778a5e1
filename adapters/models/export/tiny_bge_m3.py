"""A tiny, randomly initialised model with BGE-M3's architecture, built from nothing.

Why it exists: the dense+sparse embedder's pipeline (FlagEmbedding loading, ONNX export, parity,
serving) must run in tests and demos on a machine without network access to the model hub, in
seconds. This module writes a local model directory in the layout FlagEmbedding's
``BGEM3FlagModel`` loads offline, with BGE-M3's structure: an ``XLMRobertaModel`` (Hugging Face
``config.json`` and ``model.safetensors``), ``sparse_linear.pt`` (``Linear(hidden, 1)``, the
lexical-weight head) and ``colbert_linear.pt`` (``Linear(hidden, hidden)``), and an XLM-R-style
SentencePiece-Unigram tokenizer (``<s> $A </s>``; ``<s>``, ``<pad>``, ``</s>``, ``<unk>`` as ids 0
to 3, as in XLM-R) whose pieces are counted from ``tiny_corpus.txt``. Weights are random from a
seed; the model then goes through :func:`adapters.models.export.bge_m3.export_bge_m3`, the code a
real BGE-M3 uses.

``size="real"`` builds BGE-M3's real dimensions (24 layers of width 1024, 16 heads, a 250,002-row
embedding table, 8,194 positions) with random weights, for speed measurements only; its graph is
over 2 GB and is written with an external data file, and like the tiny one it is exported to
truncate at 512 tokens.

Its outputs mean nothing: it is a placeholder, and its manifest says so to the clinician.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from adapters.models.export.bge_m3 import (
    COLBERT_HEAD,
    DEFAULT_MAX_LENGTH,
    SPARSE_HEAD,
    export_bge_m3,
)
from adapters.models.export.graph import DEFAULT_OPSET

__all__ = [
    "REAL_SIZE_NAME",
    "TINY_NAME",
    "XLMR_SPECIAL_TOKENS",
    "BgeM3Size",
    "build_tiny_bge_m3",
    "corpus_unigram_vocab",
    "write_tiny_bge_m3_source",
]

TINY_NAME = "tiny-bge-m3"
"""Manifest name of the tiny build."""

REAL_SIZE_NAME = "random-bge-m3"
"""Manifest name of the full-size random build."""

CORPUS = Path(__file__).with_name("tiny_corpus.txt")

BgeM3Size = Literal["tiny", "real"]
"""``tiny``: 2 layers of width 64, for tests and demos. ``real``: BGE-M3's dimensions with random
weights, for speed measurements."""

XLMR_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
"""XLM-R's first four ids, in order. transformers' XLM-R tokenizer rebuilds its Unigram model
with the unknown token fixed at id 3, so the order is not free."""

_MASK_PIECE = "<mask>"
# XLM-R's (SentencePiece's) word-boundary marker, prefixed to a piece that starts a word.
_BOUNDARY = "\u2581"

# Why the sparse head's bias is positive: the encoder's last hidden states are layer-normalised,
# so a random Linear(hidden, 1) gives each token a weight of mean ~0 and standard deviation
# ~0.58 before BGE-M3's relu, and about half of them would be zero. A bias of 0.3 keeps most
# tokens' weights positive, so that parity compares many non-zero weights, while some tokens
# still come out at zero and exercise the dropping of zero weights.
_SPARSE_BIAS = 0.3


@dataclass(frozen=True, slots=True)
class _Dimensions:
    width: int
    layers: int
    heads: int
    intermediate: int
    vocab_size: int
    positions: int


_SIZES: dict[str, _Dimensions] = {
    # 512 positions: the tiny model takes what the export truncates at, no more.
    "tiny": _Dimensions(64, 2, 2, 128, 0, 512),
    # BAAI/bge-m3's config.json: XLM-RoBERTa large with 8,194 positions (8,192 tokens).
    "real": _Dimensions(1024, 24, 16, 4096, 250002, 8192),
}


def write_tiny_bge_m3_source(
    source_dir: Path | str, *, seed: int = 0, size: BgeM3Size = "tiny"
) -> Path:
    """Write the model as a local BGE-M3 directory, with seeded random weights.

    The folder holds ``config.json`` and ``model.safetensors`` (``XLMRobertaModel``),
    ``sparse_linear.pt``, ``colbert_linear.pt``, ``tokenizer.json`` and ``tokenizer_config.json``;
    ``BGEM3FlagModel(str(source_dir))`` loads it offline.

    Args:
        source_dir: the folder to write; created if needed.
        seed: seed of the weights; the same seed gives identical files.
        size: ``"tiny"``, or ``"real"`` for BGE-M3's dimensions (for speed measurements only).

    Returns:
        The folder.
    """
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer

    dims = _SIZES[size]
    source_dir = Path(source_dir).resolve()
    source_dir.mkdir(parents=True, exist_ok=True)
    vocab = corpus_unigram_vocab(CORPUS.read_text(encoding="utf-8").splitlines())
    # Given the vocabulary, transformers' XLM-R tokenizer builds XLM-R's pipeline itself
    # (whitespace split, "▁" prefix, <s> $A </s>); it rebuilds the same one when it loads the
    # saved files, so the saved tokenizer.json is what FlagEmbedding tokenizes with.
    tokenizer = XLMRobertaTokenizer(vocab=vocab, model_max_length=dims.positions)
    tokenizer.save_pretrained(str(source_dir))
    pad_id = XLMR_SPECIAL_TOKENS.index("<pad>")
    config = XLMRobertaConfig(
        # The real size keeps BGE-M3's vocabulary size, so the embedding table is real-sized;
        # ids past the corpus vocabulary are simply never produced.
        vocab_size=max(len(vocab), dims.vocab_size),
        hidden_size=dims.width,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        intermediate_size=dims.intermediate,
        # XLM-R numbers positions from pad id + 1, so it needs two more than the token count.
        max_position_embeddings=dims.positions + pad_id + 1,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=pad_id,
        bos_token_id=XLMR_SPECIAL_TOKENS.index("<s>"),
        eos_token_id=XLMR_SPECIAL_TOKENS.index("</s>"),
    )
    # fork_rng keeps the caller's random state untouched by the seeding.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = XLMRobertaModel(config)
        colbert = torch.nn.Linear(dims.width, dims.width)
        sparse = torch.nn.Linear(dims.width, 1)
    with torch.no_grad():
        sparse.bias.fill_(_SPARSE_BIAS)
    model.save_pretrained(str(source_dir))
    torch.save(sparse.state_dict(), source_dir / SPARSE_HEAD)
    torch.save(colbert.state_dict(), source_dir / COLBERT_HEAD)
    return source_dir


def build_tiny_bge_m3(
    out_dir: Path | str, *, seed: int = 0, size: BgeM3Size = "tiny", opset: int = DEFAULT_OPSET
) -> Path:
    """Build the model and export it to ``out_dir`` as a ``dense-sparse-text-embedder``.

    Args:
        out_dir: the model directory to create; must not exist or be empty.
        seed: seed of the random weights; the same seed gives identical files.
        size: ``"tiny"``, or ``"real"`` for BGE-M3's dimensions with random weights (see
            :func:`write_tiny_bge_m3_source`; for speed measurements).
        opset: ONNX opset version.

    Returns:
        The model directory, named ``tiny-bge-m3`` (64-dimensional) or ``random-bge-m3``
        (1024-dimensional) in its manifest, both truncating at 512 tokens (the export's default,
        see :data:`adapters.models.export.bge_m3.DEFAULT_MAX_LENGTH`; the full-size encoder keeps
        BGE-M3's 8,194 positions), with fp16 and int8 variants. The full-size build takes about
        3 minutes on 2 cores (100 s of them for the variants) and 11.5 GB of memory at its peak;
        the directory holds 4 GB (1.7 GB of them the variants), and the source written on the
        way takes 2.3 GB of scratch space until the build ends.

    Example:
        >>> build_tiny_bge_m3("/models/tiny-bge-m3")  # doctest: +SKIP
        PosixPath('/models/tiny-bge-m3')
    """
    tiny = size == "tiny"
    with tempfile.TemporaryDirectory(prefix="tiny-bge-m3-source-") as scratch:
        source = write_tiny_bge_m3_source(Path(scratch) / "source", seed=seed, size=size)
        return export_bge_m3(
            source,
            out_dir,
            name=TINY_NAME if tiny else REAL_SIZE_NAME,
            description=(
                f"{'Tiny' if tiny else 'Full-size'} RANDOM placeholder with BGE-M3's "
                "architecture, never trained: its similarities and token weights mean nothing "
                f"(for {'demos and tests' if tiny else 'speed measurements'} only)."
            ),
            provenance=(
                f"random initialisation, seed {seed}, sparse head bias {_SPARSE_BIAS}; "
                "vocabulary counted from adapters/models/export/tiny_corpus.txt"
            ),
            max_length=DEFAULT_MAX_LENGTH,
            opset=opset,
        )


def corpus_unigram_vocab(lines: list[str]) -> list[tuple[str, float]]:
    """An XLM-R-style SentencePiece-Unigram vocabulary counted from a corpus.

    Every whitespace-separated chunk of the corpus is split into runs of word characters and
    single other characters; the first piece of a chunk carries the word-boundary marker ``▁``,
    as XLM-R's pre-tokenizer writes it. Each piece scores the log of its relative frequency; every
    character of the corpus and ``▁`` alone are pieces too, scored below every counted piece, so
    any text over the corpus's alphabet can be spelled and counted pieces win.

    Args:
        lines: the corpus (``CORPUS``'s lines for the tiny model).

    Returns:
        ``(piece, score)`` pairs in id order: :data:`XLMR_SPECIAL_TOKENS` first, pieces by
        falling count (ties by piece), characters, ``▁``, and ``<mask>`` last as in XLM-R.

    The vocabulary is counted here rather than with ``tokenizers``' Unigram trainer so that it is
    identical on every build, as the tiny models need.
    """
    counts = Counter(
        piece for line in lines for chunk in line.split() for piece in _chunk_pieces(chunk)
    )
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    scored = [(piece, math.log(count / total)) for piece, count in ranked]
    floor = min((score for _, score in scored), default=0.0) - 1.0
    characters = sorted({c for line in lines for c in line if not c.isspace()})
    specials = [(token, 0.0) for token in XLMR_SPECIAL_TOKENS]
    pieces: dict[str, float] = {}
    for piece, score in [
        *specials,
        *scored,
        *((character, floor) for character in characters),
        (_BOUNDARY, floor),
        (_MASK_PIECE, 0.0),
    ]:
        # A character already counted as a piece (punctuation) keeps its counted score and id.
        pieces.setdefault(piece, score)
    return list(pieces.items())


def _chunk_pieces(chunk: str) -> list[str]:
    pieces = re.findall(r"\w+|[^\w\s]", chunk)
    return [_BOUNDARY + pieces[0], *pieces[1:]] if pieces else []
