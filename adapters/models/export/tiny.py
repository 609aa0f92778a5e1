"""A tiny, randomly initialised model with BiomedCLIP's architecture, built from nothing.

Why it exists: the demo and the tests must run the real image/text pipeline (open_clip loading, ONNX
export, parity, serving) on a machine without network access to the model hub and in seconds. This
module writes an open_clip ``local-dir`` model with BiomedCLIP's structure (``CustomTextCLIP``: a
timm ViT with 16-pixel patches on 224-pixel images, token pooling and a linear projection; a
Hugging Face BERT text tower with CLS pooling, an MLP projection and a 256-token context; OpenAI
CLIP normalisation) but only 2 blocks of width 64 on each side, random weights from a seed, and a
WordPiece vocabulary counted from ``tiny_corpus.txt``. It then goes through
:func:`adapters.models.export.open_clip_onnx.export_open_clip`, the code the real BiomedCLIP uses.

Its embeddings mean nothing: it is a placeholder, and its manifest says so to the clinician.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from adapters.models.export import torchvision_standin
from adapters.models.export.graph import DEFAULT_OPSET
from adapters.models.export.open_clip_onnx import export_open_clip

__all__ = [
    "BERT_SPECIAL_TOKENS",
    "REAL_SIZE_NAME",
    "TINY_NAME",
    "TINY_VIT",
    "ModelSize",
    "build_tiny_biomedclip",
    "corpus_wordpiece_tokenizer",
    "medirag_tiny_vit_patch16_224",
    "register_tiny_vit",
    "write_tiny_biomedclip_source",
]

TINY_NAME = "tiny-biomedclip"

TINY_VIT = "medirag_tiny_vit_patch16_224"
"""timm name of the tiny image tower (registered by :func:`register_tiny_vit`)."""

CORPUS = Path(__file__).with_name("tiny_corpus.txt")

_CONTEXT_LENGTH = 256

ModelSize = Literal["tiny", "real"]
"""``tiny``: a few narrow layers, for tests and demos. ``real``: the original model's dimensions
with random weights, for speed measurements."""

REAL_SIZE_NAME = "random-biomedclip"
"""Manifest name of the full-size random build."""


@dataclass(frozen=True, slots=True)
class _Dimensions:
    vision: str
    embed_dim: int
    text_width: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    vocab_size: int
    max_positions: int


_SIZES = {
    "tiny": _Dimensions(TINY_VIT, 64, 64, 2, 2, 128, 0, _CONTEXT_LENGTH),
    # BiomedCLIP-PubMedBERT_256-vit_base_patch16_224's open_clip and BERT configurations.
    "real": _Dimensions("vit_base_patch16_224", 512, 768, 12, 12, 3072, 30522, 512),
}
# OpenAI CLIP's normalisation, which BiomedCLIP uses.
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)
# BERT's special tokens; [PAD] first, so that the pad id is 0 as in BERT vocabularies.
BERT_SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


def medirag_tiny_vit_patch16_224(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    """timm entry point of the tiny image tower: ViT-B/16's patching and input size, 2 blocks of
    width 64 (2 heads)."""
    from timm.models.vision_transformer import _create_vision_transformer

    # Naming the architecture keeps timm from warning that the model has no pretrained config;
    # timm.create_model passes pretrained_cfg=None explicitly.
    if kwargs.get("pretrained_cfg") is None:
        kwargs["pretrained_cfg"] = {"architecture": TINY_VIT}
    settings = {"patch_size": 16, "img_size": 224, "embed_dim": 64, "depth": 2, "num_heads": 2}
    return _create_vision_transformer(TINY_VIT, pretrained=pretrained, **{**settings, **kwargs})


def register_tiny_vit() -> str:
    """Register the tiny image tower with timm (once), so that open_clip can build it by name.

    Returns:
        Its timm name, :data:`TINY_VIT`.
    """
    torchvision_standin.ensure_importable()
    import timm.models

    if not timm.models.is_model(TINY_VIT):
        timm.models.register_model(medirag_tiny_vit_patch16_224)
    return TINY_VIT


def write_tiny_biomedclip_source(
    source_dir: Path | str, *, seed: int = 0, size: ModelSize = "tiny"
) -> Path:
    """Write the tiny model as an open_clip ``local-dir`` folder, with seeded random weights.

    The folder holds ``open_clip_config.json``, ``open_clip_model.safetensors``, the tokenizer
    files, and ``text/config.json`` (the BERT configuration, referenced by absolute path, so the
    folder must stay where it was written). Load it with
    ``open_clip.create_model("local-dir:" + str(source_dir))`` after :func:`register_tiny_vit`.

    Args:
        source_dir: the folder to write; created if needed.
        seed: seed of the weights; the same seed gives the same weights.
        size: ``"tiny"``, or ``"real"`` for BiomedCLIP's own dimensions (ViT-B/16, a 12-layer
            BERT of width 768 with PubMedBERT's 30,522-token vocabulary size, 512-dimensional
            embeddings), randomly initialised, for speed measurements only.

    Returns:
        The folder.
    """
    register_tiny_vit()
    dims = _SIZES[size]
    import open_clip
    from safetensors.torch import save_file
    from transformers import BertConfig, PreTrainedTokenizerFast

    source_dir = Path(source_dir).resolve()
    text_dir = source_dir / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = corpus_wordpiece_tokenizer(CORPUS.read_text(encoding="utf-8").splitlines())
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=_CONTEXT_LENGTH, **BERT_SPECIAL_TOKENS
    )
    hf_tokenizer.save_pretrained(str(source_dir))
    BertConfig(
        # The real size keeps PubMedBERT's vocabulary size, so the embedding table is real-sized;
        # ids past the corpus vocabulary are simply never produced.
        vocab_size=max(tokenizer.get_vocab_size(), dims.vocab_size),
        hidden_size=dims.text_width,
        num_hidden_layers=dims.text_layers,
        num_attention_heads=dims.text_heads,
        intermediate_size=dims.text_intermediate,
        max_position_embeddings=dims.max_positions,
        pad_token_id=tokenizer.token_to_id(BERT_SPECIAL_TOKENS["pad_token"]),
    ).save_pretrained(str(text_dir))
    config = {
        "model_cfg": {
            "embed_dim": dims.embed_dim,
            "vision_cfg": {
                "timm_model_name": dims.vision,
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": 224,
            },
            "text_cfg": {
                "hf_model_name": str(text_dir),
                "hf_tokenizer_name": str(source_dir),
                "hf_model_pretrained": False,
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": _CONTEXT_LENGTH,
            },
        },
        "preprocess_cfg": {"mean": list(_MEAN), "std": list(_STD)},
    }
    (source_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # fork_rng keeps the caller's random state untouched by the seeding.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(
            f"local-dir:{source_dir}", load_weights=False, pretrained_text=False
        )
    save_file(model.state_dict(), str(source_dir / "open_clip_model.safetensors"))
    return source_dir


def build_tiny_biomedclip(
    out_dir: Path | str, *, seed: int = 0, size: ModelSize = "tiny", opset: int = DEFAULT_OPSET
) -> Path:
    """Build the tiny model and export it to ``out_dir`` as an ``image-text-embedder``.

    Args:
        out_dir: the model directory to create; must not exist or be empty.
        seed: seed of the random weights; the same seed gives identical files.
        size: ``"tiny"``, or ``"real"`` for BiomedCLIP's dimensions with random weights (see
            :func:`write_tiny_biomedclip_source`; for speed measurements).
        opset: ONNX opset version.

    Returns:
        The model directory, named ``tiny-biomedclip`` (64-dimensional) or
        ``random-biomedclip`` (512-dimensional) in its manifest.

    Example:
        >>> build_tiny_biomedclip("/models/tiny-biomedclip")  # doctest: +SKIP
        PosixPath('/models/tiny-biomedclip')
    """
    with tempfile.TemporaryDirectory(prefix="tiny-biomedclip-source-") as scratch:
        source = write_tiny_biomedclip_source(Path(scratch) / "source", seed=seed, size=size)
        return export_open_clip(
            f"local-dir:{source}",
            out_dir,
            name=TINY_NAME if size == "tiny" else REAL_SIZE_NAME,
            description=(
                f"{'Tiny' if size == 'tiny' else 'Full-size'} RANDOM placeholder with "
                "BiomedCLIP's architecture, never trained: its similarities mean nothing "
                f"(for {'demos and tests' if size == 'tiny' else 'speed measurements'} only)."
            ),
            provenance=(
                f"random initialisation, seed {seed}; vocabulary counted from "
                "adapters/models/export/tiny_corpus.txt"
            ),
            opset=opset,
        )


def corpus_wordpiece_tokenizer(lines: list[str]) -> Tokenizer:
    """A BERT-style WordPiece tokenizer whose vocabulary is the corpus's characters and words.

    Args:
        lines: the corpus (``CORPUS``'s lines for every tiny model).

    Returns:
        A tokenizer adding ``[CLS]`` and ``[SEP]``, with ``[PAD]`` as id 0.

    The vocabulary is counted here rather than with ``tokenizers``' WordPiece trainer because that
    trainer breaks ties between equally frequent merges differently from one process to the next,
    and the tiny model must be identical on every build.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter(
        word
        for line in lines
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
    )
    characters = sorted({character for word in counts for character in word})
    # Every character, alone and as a continuation, so any corpus-alphabet word can be spelled.
    specials = list(BERT_SPECIAL_TOKENS.values())
    tokens = list(dict.fromkeys([*specials, *characters, *(f"##{c}" for c in characters)]))
    known = set(tokens)
    tokens += [
        word
        for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        if word not in known
    ]
    tokenizer = Tokenizer(
        models.WordPiece(
            {token: i for i, token in enumerate(tokens)}, unk_token=BERT_SPECIAL_TOKENS["unk_token"]
        )
    )
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tokenizer
