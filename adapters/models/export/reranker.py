"""Export a Hugging Face cross-encoder (BERT with one relevance logit) as a ``reranker``
directory in FlashRank's layout.

Why it exists: literature passages found by embedding similarity are reordered by a cross-encoder
that reads the query and each passage together (ms-marco-MiniLM-L-12-v2 and models like it). This
module loads such a model from a local folder, writes it as one ONNX graph with exactly the inputs
FlashRank feeds and the tokenizer files FlashRank reads, and accepts the result only when

* the exported tokenizer, configured as FlashRank configures it, gives the Hugging Face
  tokenizer's token ids,
* the graph's logits match torch's within :data:`MAX_LOGIT_DIFF` and rank every batch the same,
* ``flashrank.Ranker`` loads the directory offline and scores as
  :class:`adapters.models.rerank.OnnxReranker` does,
* each precision variant written beside the graph (fp16 by default, see
  :data:`RERANKER_PRECISIONS`) is within its bound of torch's logits
  (:mod:`adapters.models.export.precision`).

FlashRank finds a model as ``cache_dir/<model name>/<file name>``, the file name fixed per model
name (:data:`adapters.models.rerank.FLASHRANK_GRAPHS`). The graph is named for the
``flashrank_name`` slot; for FlashRank to load the directory, the directory's own name must be
that model name too. The service's :class:`~adapters.models.rerank.OnnxReranker` accepts any
directory name. The layout is described in :mod:`adapters.models.rerank`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tokenizers import Tokenizer

from adapters.models.export.graph import DEFAULT_OPSET, export_graph
from adapters.models.export.output import created_by, staged_directory
from adapters.models.export.parity import ParityError, min_cosine
from adapters.models.export.precision import Feeds, by_precision, write_precision_variants
from adapters.models.manifest import GraphVariant, Manifest, Parity, hash_files, save_manifest
from adapters.models.rerank import (
    FLASHRANK_GRAPHS,
    INPUT_NAMES,
    encode_pairs,
    rank_by_score,
    relevance_scores,
)
from adapters.models.session import create_session
from adapters.models.tokenization import TOKENIZER_NAME, load_tokenizer

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_FLASHRANK_NAME",
    "FLASHRANK_SCORE_TOLERANCE",
    "LOGITS_NAME",
    "MAX_LOGIT_DIFF",
    "RERANKER_PRECISIONS",
    "SPECIAL_TOKENS_NAME",
    "TOKENIZER_CONFIG_NAME",
    "export_reranker",
]

logger = logging.getLogger(__name__)

DEFAULT_FLASHRANK_NAME = "ms-marco-MiniLM-L-12-v2"
"""FlashRank's name for the BERT cross-encoder it recommends; the slot the service's reranker
(and the tiny placeholder standing in for it) is exported as."""

MAX_LOGIT_DIFF = 1e-4
"""The largest accepted absolute difference between a torch and an ONNX logit."""

RERANKER_PRECISIONS: tuple[str, ...] = ("fp16",)
"""The precision variants :func:`export_reranker` writes by default: fp16 only, no int8.

Both pass the generic bounds of :mod:`adapters.models.export.precision`, but for a reranker those
compare each batch's vector of logits, and logits sharing an offset (the full-size random
placeholder's lie between 3.9 and 4.7) keep a cosine near 1 whatever their order, while the order
is what the service uses. Measured against torch on the parity batches (onnxruntime CPU):

* fp16: cosine 0.99999996 (tiny) and 0.9999998 (full-size random), max |logit difference|
  0.0022 and 0.0075; every batch ranked as torch ranks it;
* int8: cosine 0.99993 and 0.99976, above the 0.98 bound, but max |logit difference| 0.098 and
  0.19, 25 to 45 times fp16's, and passages reordered: in 1 of 3 parity batches for each model
  (torch logits 0.005 apart in the tiny model, 0.036 and 0.044 apart in the full-size one).

So int8 is written only on request (``precisions=("fp16", "int8")``; FlashRank's own graph for
this slot is int8, and a trained model's wider logit spread may rank well); the manifest then
records, for every variant, how many parity batches it ranks as torch does."""

FLASHRANK_SCORE_TOLERANCE = 1e-6
"""The largest accepted difference between FlashRank's and the service's score of a pair: both
run the same graph on the same tokens, so only thread scheduling may differ."""

LOGITS_NAME = "logits"
"""Name of the graph's output, ``(batch, 1)``: the relevance logit of each pair."""

CONFIG_NAME = "config.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_NAME = "special_tokens_map.json"

# Two clinical questions and passages of different lengths; the last passage is longer than any
# max_length and is truncated.
_QUERIES = ("How is a large pleural effusion treated?", "What raises serum creatinine?")
_PASSAGES = (
    "Small left pleural effusion.",
    "Therapeutic thoracentesis relieves dyspnoea caused by a large pleural effusion.",
    "Fractured wrist after a fall.",
    "Acute kidney injury is defined by a rise in serum creatinine or a fall in urine output.",
    "Right lower lobe consolidation concerning for pneumonia, with a small parapneumonic "
    "effusion and no pneumothorax.",
    "The quick brown fox jumps over the lazy dog.",
    "Heart failure",
    "Pulmonary edema has improved compared with the previous study. " * 60,
)
# Batch sizes and padded lengths other than the tracing example's, each a reranking request.
_BATCHES = (
    (_QUERIES[0], _PASSAGES),
    (_QUERIES[1], _PASSAGES[:3]),
    (_QUERIES[1], _PASSAGES[6:]),
)


class _Logits(torch.nn.Module):
    """The cross-encoder with the graph's argument order, returning its ``(batch, 1)`` logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model: Any = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> torch.Tensor:
        logits: torch.Tensor = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits
        return logits


def export_reranker(
    source_dir: Path | str,
    out_dir: Path | str,
    *,
    flashrank_name: str = DEFAULT_FLASHRANK_NAME,
    name: str | None = None,
    description: str | None = None,
    provenance: str | None = None,
    max_length: int = 512,
    opset: int = DEFAULT_OPSET,
    precisions: Sequence[str] = RERANKER_PRECISIONS,
) -> Path:
    """Export a local Hugging Face cross-encoder to ``out_dir`` as a verified ``reranker``
    directory in FlashRank's layout.

    Writes the graph (named for ``flashrank_name``: inputs ``input_ids``, ``attention_mask``,
    ``token_type_ids``, int64, dynamic batch and sequence; output ``logits``, ``(batch, 1)``),
    ``tokenizer.json`` (pair template, truncating ``longest_first`` at ``max_length``, padding to
    the longest), ``tokenizer_config.json``, ``special_tokens_map.json``, ``config.json`` and
    ``manifest.json``.

    FlashRank loads the result as ``flashrank.Ranker(model_name=flashrank_name,
    cache_dir=out_dir.parent)``, which needs ``out_dir``'s name to be ``flashrank_name``: export to
    ``models_dir / flashrank_name``. FlashRank then downloads nothing, and truncates at
    ``min(max_length, Ranker's max_length)``, so its default of 512 suffices up to 512.

    Args:
        source_dir: a Hugging Face model folder that ``AutoModelForSequenceClassification`` and
            ``AutoTokenizer`` load offline: one output label, segment (token type) embeddings,
            and a tokenizer whose pair template puts the passage in segment 1 (BERT's).
        out_dir: the model directory to create; must not exist or be empty.
        flashrank_name: the FlashRank model name whose slot the model fills, one of
            :data:`adapters.models.rerank.FLASHRANK_GRAPHS`; it names the graph file.
            ``ms-marco-MiniLM-L-12-v2`` by default.
        name: short model name for the clinician; the source folder's name by default.
        description: the line shown to clinicians about the model.
        provenance: where the weights came from; names the source folder by default.
        max_length: tokens per (query, passage) pair, special tokens included.
        opset: ONNX opset version.
        precisions: the precision variants to write beside the graph (``()`` for none), each
            measured against torch's logits (see :data:`RERANKER_PRECISIONS` for the default).

    Returns:
        The model directory.

    Raises:
        ValueError: the model or its tokenizer is not a one-logit BERT-style cross-encoder,
            ``flashrank_name`` is unknown, ``out_dir`` is named for another FlashRank model, or
            ``max_length`` exceeds the model's positions.
        ParityError: the exported tokenizer's ids differ from the Hugging Face tokenizer's, the
            logits differ by more than :data:`MAX_LOGIT_DIFF`, a batch ranks differently, or
            FlashRank's scores differ from the service's, or a precision variant is below its
            bound (see :mod:`adapters.models.export.precision`).
        ModuleNotFoundError: flashrank is not installed.
        FileExistsError: ``out_dir`` holds files.

    Example:
        >>> export_reranker("/downloads/ms-marco-MiniLM-L-12-v2",
        ...                 "/models/ms-marco-MiniLM-L-12-v2")  # doctest: +SKIP
        PosixPath('/models/ms-marco-MiniLM-L-12-v2')
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    started = time.perf_counter()
    flashrank_version = _flashrank_version()
    source = Path(source_dir).resolve()
    graph_name = _graph_name(flashrank_name, Path(out_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(source))
    model.eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(source))
    pad_id = _check_model(model.config, hf_tokenizer, max_length)
    module = _Logits(model).eval()
    name = name or source.name
    with staged_directory(out_dir) as staging:
        _write_tokenizer_files(hf_tokenizer, staging, max_length, pad_id)
        model.config.to_json_file(str(staging / CONFIG_NAME))
        tokenizer = load_tokenizer(staging / TOKENIZER_NAME, max_length=max_length)
        # Passages of different lengths, so that the traced example is padded.
        example = encode_pairs(
            tokenizer, "effusion", ["Effusion.", "A longer passage, which is not padded."]
        )
        export_graph(
            module,
            [torch.from_numpy(array) for array in example],
            staging / graph_name,
            input_names=INPUT_NAMES,
            dynamic_axes={input_name: {0: "batch", 1: "sequence"} for input_name in INPUT_NAMES},
            opset=opset,
            output_names=(LOGITS_NAME,),
        )
        worst_diff, worst_cosine = _parity(
            module, hf_tokenizer, staging / graph_name, tokenizer, max_length
        )
        flashrank_diff = _check_flashrank(staging, flashrank_name, tokenizer, max_length)
        feeds = _parity_feeds(tokenizer)
        variants = write_precision_variants(
            staging / graph_name,
            feeds,
            reference=lambda batch: [_torch_logits(module, batch)],
            reference_name="torch eager",
            inputs=(
                f"the logits of {len(_PASSAGES)} passages for {len(_QUERIES)} queries in padded "
                f"batches of {_batch_sizes()}, each batch's logits as one vector"
            ),
            precisions=precisions,
        )
        variants = {
            precision: _with_ranking(staging, variant, feeds, module)
            for precision, variant in variants.items()
        }
        manifest = Manifest(
            name=name,
            kind="reranker",
            description=description
            or f"{name}: a cross-encoder reranker scoring how well a passage answers a query.",
            source=provenance or f"local Hugging Face model folder {source.name}",
            architecture=(
                f"{type(model).__name__} ({model.config.num_hidden_layers} layers, width "
                f"{model.config.hidden_size}, {model.config.num_attention_heads} heads); one "
                f"relevance logit per (query, passage) pair, score = sigmoid(logit); FlashRank "
                f"layout as {flashrank_name}"
            ),
            dimension=1,
            max_length=max_length,
            image_size=None,
            opset=opset,
            precision="fp32",
            files=hash_files(staging),
            parity=Parity(
                compared=(
                    f"torch eager vs onnxruntime CPU: {len(_PASSAGES)} passages for "
                    f"{len(_QUERIES)} queries in padded batches of {_batch_sizes()}, one "
                    "truncated; "
                    "token ids identical, ranking identical in every batch; flashrank "
                    f"{flashrank_version} loads the directory offline, scores within "
                    f"{flashrank_diff:.1e} of the service's, same order"
                ),
                min_cosine=worst_cosine,
                max_abs_diff=worst_diff,
            ),
            created_by=created_by(__name__, "torch", "transformers", "onnx", "flashrank"),
            variants=by_precision({graph_name: variants}),
        )
        save_manifest(manifest, staging)
    logger.info(
        "model exported",
        extra={
            "model_id": manifest.model_id,
            "max_abs_diff": worst_diff,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    return Path(out_dir).resolve()


def _graph_name(flashrank_name: str, out_dir: Path) -> str:
    if flashrank_name not in FLASHRANK_GRAPHS:
        raise ValueError(
            f"unknown FlashRank model name {flashrank_name!r}; one of {sorted(FLASHRANK_GRAPHS)}"
        )
    folder = out_dir.resolve().name
    if folder in FLASHRANK_GRAPHS and folder != flashrank_name:
        # FlashRank would look in this folder for another model's file name.
        raise ValueError(f"{out_dir} is named for FlashRank's {folder}, not {flashrank_name}")
    if folder != flashrank_name:
        logger.info(
            "flashrank.Ranker finds this model only in a folder named for it",
            extra={"folder": folder, "flashrank_name": flashrank_name},
        )
    return FLASHRANK_GRAPHS[flashrank_name]


def _check_model(config: Any, hf_tokenizer: Any, max_length: int) -> int:
    """The pad id, after checking that the model is what the graph and FlashRank assume."""
    if config.num_labels != 1:
        raise ValueError(f"expected one relevance logit, the model has {config.num_labels} labels")
    if getattr(config, "type_vocab_size", 0) < 2:
        # FlashRank feeds token_type_ids whenever a pair has segment 1, so the graph needs them.
        raise ValueError("expected segment (token type) embeddings, as BERT has")
    positions = int(getattr(config, "max_position_embeddings", 0))
    if not 1 <= max_length <= positions:
        raise ValueError(f"max_length {max_length} is not within the model's {positions} positions")
    pad_id = hf_tokenizer.pad_token_id
    if pad_id is None or config.pad_token_id != pad_id:
        # FlashRank pads with config.json's pad_token_id, the tokenizer with its own pad token.
        raise ValueError(
            f"the tokenizer's pad id {pad_id} is not the configuration's {config.pad_token_id}"
        )
    segments = hf_tokenizer("query", "passage", return_token_type_ids=True)["token_type_ids"]
    if 1 not in segments:
        raise ValueError("the tokenizer's pair template does not put the passage in segment 1")
    return int(pad_id)


def _write_tokenizer_files(
    hf_tokenizer: Any, directory: Path, max_length: int, pad_id: int
) -> None:
    """Write what FlashRank's ``Ranker._get_tokenizer`` reads: ``tokenizer.json``, and the
    ``model_max_length``, ``pad_token`` and special tokens it applies on top."""
    special = {
        key: value
        for key, value in hf_tokenizer.special_tokens_map.items()
        if isinstance(value, str)
    }
    tokenizer = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    # FlashRank registers every token of special_tokens_map.json as special; doing it here makes
    # that a no-op, so the service's tokenizer (this file alone) splits text as FlashRank's does.
    tokenizer.add_special_tokens(list(special.values()))
    pad_token = tokenizer.id_to_token(pad_id)
    if pad_token is None or pad_token != hf_tokenizer.pad_token:
        raise ValueError(f"pad id {pad_id} is not the pad token {hf_tokenizer.pad_token!r}")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    tokenizer.save(str(directory / TOKENIZER_NAME))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "model_input_names": list(INPUT_NAMES),
        **special,
    }
    for file_name, content in ((TOKENIZER_CONFIG_NAME, config), (SPECIAL_TOKENS_NAME, special)):
        text = json.dumps(content, indent=2, sort_keys=True) + "\n"
        (directory / file_name).write_text(text, encoding="utf-8")


def _parity(
    module: torch.nn.Module, hf_tokenizer: Any, graph: Path, tokenizer: Tokenizer, max_length: int
) -> tuple[float, float]:
    """``(largest |logit difference|, smallest cosine of a batch's logit vectors)``, raising
    :class:`ParityError` on different token ids, a difference above :data:`MAX_LOGIT_DIFF`, or a
    different ranking."""
    session = create_session(graph, providers="cpu")
    worst_diff, worst_cosine = 0.0, 1.0
    for query, passages in _BATCHES:
        arrays = encode_pairs(tokenizer, query, passages)
        reference = hf_tokenizer(
            [query] * len(passages),
            list(passages),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_token_type_ids=True,
            return_tensors="np",
        )
        for input_name, array in zip(INPUT_NAMES, arrays, strict=True):
            if not np.array_equal(np.asarray(reference[input_name]), array):
                raise ParityError(f"exported tokenizer: {input_name} differ from Hugging Face's")
        expected = _torch_logits(module, dict(zip(INPUT_NAMES, arrays, strict=True)))
        (actual,) = session.run(None, dict(zip(INPUT_NAMES, arrays, strict=True)))
        diff = float(np.abs(expected - np.asarray(actual)).max())
        if not diff <= MAX_LOGIT_DIFF:
            raise ParityError(f"reranker logits differ by {diff:.2e} > {MAX_LOGIT_DIFF}")
        if _order(expected) != _order(actual):
            raise ParityError(f"reranker: torch and onnxruntime rank {query!r}'s passages apart")
        worst_diff = max(worst_diff, diff)
        worst_cosine = min(worst_cosine, min_cosine(expected.reshape(1, -1), actual.reshape(1, -1)))
    return worst_diff, worst_cosine


def _batch_sizes() -> str:
    return ", ".join(str(len(passages)) for _, passages in _BATCHES)


def _parity_feeds(tokenizer: Tokenizer) -> list[Feeds]:
    """The graph inputs of the parity batches, tokenized as the service tokenizes."""
    return [
        dict(zip(INPUT_NAMES, encode_pairs(tokenizer, query, passages), strict=True))
        for query, passages in _BATCHES
    ]


def _torch_logits(module: torch.nn.Module, feeds: Feeds) -> npt.NDArray[np.float32]:
    with torch.no_grad():
        logits: torch.Tensor = module(*(torch.from_numpy(feeds[name]) for name in INPUT_NAMES))
    return logits.numpy()


def _with_ranking(
    directory: Path, variant: GraphVariant, feeds: Sequence[Feeds], module: torch.nn.Module
) -> GraphVariant:
    """The variant, its parity description completed with how many parity batches it ranks as
    torch does: a cosine of logit vectors that share an offset says little about the order,
    which is what the service uses."""
    if variant.parity is None:
        return variant
    session = create_session(directory / variant.file, providers="cpu")
    same = sum(
        _order(session.run(None, dict(batch))[0]) == _order(_torch_logits(module, batch))
        for batch in feeds
    )
    compared = f"{variant.parity.compared}; ranks {same} of {len(feeds)} batches as torch does"
    if same < len(feeds):
        logger.warning(
            "a precision variant ranks parity batches differently from torch",
            extra={"graph_file": variant.file, "batches": len(feeds), "same_order": same},
        )
    return dataclasses.replace(
        variant, parity=dataclasses.replace(variant.parity, compared=compared)
    )


def _order(logits: npt.ArrayLike) -> list[int]:
    return [index for index, _ in rank_by_score(np.asarray(logits).reshape(-1))]


def _check_flashrank(
    directory: Path, flashrank_name: str, tokenizer: Tokenizer, max_length: int
) -> float:
    """Load ``directory`` with ``flashrank.Ranker``, offline, and compare its scores of the first
    parity batch with the service's computation; returns the largest difference.

    Raises:
        ParityError: a score differs by more than :data:`FLASHRANK_SCORE_TOLERANCE`, or the order
            differs.
    """
    from flashrank import Ranker, RerankRequest

    query, passages = _BATCHES[0]
    session = create_session(directory / FLASHRANK_GRAPHS[flashrank_name], providers="cpu")
    arrays = encode_pairs(tokenizer, query, passages)
    (logits,) = session.run(None, dict(zip(INPUT_NAMES, arrays, strict=True)))
    expected = relevance_scores(logits)
    with tempfile.TemporaryDirectory(prefix="flashrank-cache-") as cache, _no_basic_config():
        # FlashRank looks in cache_dir/<model name> and downloads only when that is missing; a
        # link with the model name to the staging directory lets it load these very files.
        (Path(cache) / flashrank_name).symlink_to(directory, target_is_directory=True)
        ranker = Ranker(model_name=flashrank_name, cache_dir=cache, max_length=max_length)
        ranked = ranker.rerank(
            RerankRequest(
                query=query,
                passages=[{"id": index, "text": text} for index, text in enumerate(passages)],
            )
        )
    order = [int(result["id"]) for result in ranked]
    scores = np.array([result["score"] for result in ranked], dtype=np.float32)
    diff = float(np.abs(scores - expected[order]).max())
    if not diff <= FLASHRANK_SCORE_TOLERANCE:
        raise ParityError(f"flashrank's scores differ from the service's by {diff:.2e}")
    if order != _order(expected):
        raise ParityError("flashrank ranks the passages differently from the service")
    return diff


@contextlib.contextmanager
def _no_basic_config() -> Iterator[None]:
    """Keep ``flashrank.Ranker``'s ``logging.basicConfig(level=INFO)`` from configuring logging.

    basicConfig does nothing when the root logger has a handler; without one, it would give the
    process a stderr handler and an INFO root level. A null handler for the call prevents that.
    """
    root = logging.getLogger()
    guard = None if root.handlers else logging.NullHandler()
    if guard is not None:
        root.addHandler(guard)
    try:
        yield
    finally:
        if guard is not None:
            root.removeHandler(guard)


def _flashrank_version() -> str:
    try:
        return importlib.metadata.version("flashrank")
    except importlib.metadata.PackageNotFoundError:
        # --no-deps: flashrank's requirements would pull in a second onnxruntime build.
        raise ModuleNotFoundError(
            "flashrank is not installed (pip install --no-deps flashrank==0.2.10)"
        ) from None
