"""Speed of the exported graphs against torch eager on the same weights.

Why it exists: serving runs ONNX Runtime and never torch, and the claim that this is faster has
to be measured, not assumed. A :class:`Workload` pairs the torch module an exporter traced with the
ONNX graph it wrote from the same weights, and feeds both the same prepared inputs (tokenized
texts or preprocessed images), so the comparison covers the network alone: tokenizing and image
preprocessing are the same numpy code on either side. ``medirag bench embed``
(deploy/bench_embed.py) builds the workloads and prints the table.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from adapters.models.clip import IMAGE_GRAPH_NAME, TEXT_GRAPH_NAME, clean_text
from adapters.models.export.open_clip_onnx import load_open_clip, parity_images
from adapters.models.export.tiny import CORPUS
from adapters.models.manifest import read_manifest
from adapters.models.preprocess import PREPROCESS_NAME, ImagePreprocessing, preprocess_images
from adapters.models.tokenization import TOKENIZER_NAME, encode_batch, load_tokenizer

__all__ = [
    "Feeds",
    "Timing",
    "Workload",
    "bge_m3_workload",
    "clip_workloads",
    "count_flops",
    "findings_texts",
    "minilm_workload",
    "passage_texts",
    "reranker_workload",
    "time_runs",
    "torch_threads",
]

Feeds = dict[str, npt.NDArray[Any]]
"""Graph inputs by name, as numpy arrays."""

Modality = Literal["image", "text", "text pair"]


@dataclass(frozen=True, slots=True)
class Workload:
    """One network measured two ways.

    Args:
        name: what is measured (``"BiomedCLIP image tower"``).
        model_id: the exported model's id (its manifest's).
        modality: what one item is.
        directory: the exported model directory.
        graph: its fp32 graph's file name, exported from ``torch_forward``'s weights.
        torch_forward: runs the torch module on feeds (under ``torch.inference_mode``).
        feeds: prepared inputs for a batch of the given size.
        item: what an item is in words, for the table (``"224x224 image"``).
    """

    name: str
    model_id: str
    modality: Modality
    directory: Path
    graph: str
    torch_forward: Callable[[Feeds], Any]
    feeds: Callable[[int], Feeds]
    item: str


@dataclass(frozen=True, slots=True)
class Timing:
    """How fast one engine ran one batch size.

    Args:
        runs: timed runs (after one untimed warm-up run).
        seconds: their total wall time.
        batch: items per run.
    """

    runs: int
    seconds: float
    batch: int

    @property
    def items_per_second(self) -> float:
        """Throughput."""
        return self.runs * self.batch / self.seconds

    @property
    def ms_per_batch(self) -> float:
        """Latency of one run."""
        return 1000 * self.seconds / self.runs


def time_runs(
    run: Callable[[], object], batch: int, *, min_seconds: float, min_runs: int = 2
) -> Timing:
    """Time ``run`` after one warm-up call, repeating until both minimums are reached.

    Args:
        run: one inference on a prepared batch.
        batch: items per run.
        min_seconds: keep running until this much time has passed.
        min_runs: and at least this many runs.

    Example:
        >>> timing = time_runs(lambda: sum(range(1000)), 1, min_seconds=0.01)
        >>> timing.runs >= 2
        True
    """
    run()
    runs, started = 0, time.perf_counter()
    while True:
        run()
        runs += 1
        elapsed = time.perf_counter() - started
        if runs >= min_runs and elapsed >= min_seconds:
            return Timing(runs=runs, seconds=elapsed, batch=batch)


def torch_threads() -> int:
    """Threads torch eager uses for one operator (onnxruntime's default is one per core too)."""
    return torch.get_num_threads()


def count_flops(workload: Workload, batch: int = 1) -> float:
    """Floating-point operations of one torch forward pass on ``batch`` items, divided by
    ``batch`` (torch's FLOP counter: two per multiply-accumulate in matrix products,
    convolutions and attention; element-wise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        workload.torch_forward(workload.feeds(batch))
    return float(counter.get_total_flops()) / batch


def findings_texts() -> list[str]:
    """Findings-length texts (a sentence or two) from the tiny corpus, in a fixed order."""
    lines = [line.strip() for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if len(line.split()) >= 6]


def passage_texts(words: int = 200) -> list[str]:
    """Abstract-length passages (``words`` words each) made of the tiny corpus's sentences,
    each starting at a different sentence."""
    sentences = findings_texts()
    passages = []
    for start in range(len(sentences)):
        chosen: list[str] = []
        for sentence in itertools.islice(itertools.cycle(sentences), start, None):
            chosen.extend(sentence.split())
            if len(chosen) >= words:
                break
        passages.append(" ".join(chosen[:words]))
    return passages


def _cycled(texts: Sequence[str], batch: int) -> list[str]:
    return list(itertools.islice(itertools.cycle(texts), batch))


def _tensors(feeds: Mapping[str, npt.NDArray[Any]], names: Sequence[str]) -> Iterator[Any]:
    return (torch.from_numpy(feeds[name]) for name in names)


def clip_workloads(source: str, model_dir: Path) -> list[Workload]:
    """The image and text towers of an open_clip model and its export.

    Args:
        source: the open_clip source the model directory was exported from.
        model_dir: the exported ``image-text-embedder`` directory.
    """
    model: Any
    model, _ = load_open_clip(source)
    manifest = read_manifest(model_dir)
    settings = ImagePreprocessing.load(model_dir / PREPROCESS_NAME)
    tokenizer = load_tokenizer(model_dir / TOKENIZER_NAME, max_length=manifest.max_length)
    images = parity_images()
    texts = [clean_text(text) for text in findings_texts()]

    def image_feeds(batch: int) -> Feeds:
        return {"pixel_values": preprocess_images(_cycled_images(images, batch), settings)}

    def text_feeds(batch: int) -> Feeds:
        return {"input_ids": encode_batch(tokenizer, _cycled(texts, batch))[0]}

    def image_forward(feeds: Feeds) -> Any:
        with torch.inference_mode():
            return model.encode_image(*_tensors(feeds, ["pixel_values"]), normalize=True)

    def text_forward(feeds: Feeds) -> Any:
        with torch.inference_mode():
            return model.encode_text(*_tensors(feeds, ["input_ids"]), normalize=True)

    size = f"{settings.image_size}x{settings.image_size}"
    return [
        Workload(
            name=f"{manifest.name} image tower",
            model_id=manifest.model_id,
            modality="image",
            directory=model_dir,
            graph=IMAGE_GRAPH_NAME,
            torch_forward=image_forward,
            feeds=image_feeds,
            item=f"{size} image",
        ),
        Workload(
            name=f"{manifest.name} text tower",
            model_id=manifest.model_id,
            modality="text",
            directory=model_dir,
            graph=TEXT_GRAPH_NAME,
            torch_forward=text_forward,
            feeds=text_feeds,
            item=f"findings sentence ({_tokens(text_feeds(1))} tokens)",
        ),
    ]


def minilm_workload(model_dir: Path, *, passage_words: int = 200) -> Workload:
    """all-MiniLM-L6-v2 (the package's real weights) and its export, on passages.

    Args:
        model_dir: the directory :func:`adapters.models.export.minilm.export_minilm` wrote.
        passage_words: words per passage (200 is a PubMed abstract's length).
    """
    from transformers import BertModel

    from adapters.models.export.minilm import MeanPooledBert, minilm_source
    from adapters.models.text import GRAPH_NAME

    module = MeanPooledBert(BertModel.from_pretrained(str(minilm_source()))).eval()
    return _passage_workload("text", module, model_dir, GRAPH_NAME, passage_words)


def bge_m3_workload(source_dir: Path, model_dir: Path, *, passage_words: int = 200) -> Workload:
    """A BGE-M3 model loaded by FlagEmbedding and its export, dense and sparse heads in one pass,
    on passages.

    Args:
        source_dir: the local BGE-M3 folder the model directory was exported from.
        model_dir: the directory :func:`adapters.models.export.bge_m3.export_bge_m3` wrote.
        passage_words: words per passage.
    """
    from adapters.models.export.bge_m3 import dense_sparse_module, load_bge_m3
    from adapters.models.sparse_text import GRAPH_NAME

    module = dense_sparse_module(load_bge_m3(source_dir))
    return _passage_workload("dense+sparse", module, model_dir, GRAPH_NAME, passage_words)


def reranker_workload(source_dir: Path, model_dir: Path, *, passage_words: int = 200) -> Workload:
    """A cross-encoder (a Hugging Face sequence-classification folder) and its export, scoring
    (question, abstract-length passage) pairs.

    Args:
        source_dir: the Hugging Face folder the model directory was exported from.
        model_dir: the directory :func:`adapters.models.export.reranker.export_reranker` wrote.
        passage_words: words per passage.
    """
    from transformers import AutoModelForSequenceClassification

    from adapters.models.rerank import FLASHRANK_GRAPHS, INPUT_NAMES, encode_pairs

    manifest = read_manifest(model_dir)
    module = AutoModelForSequenceClassification.from_pretrained(str(source_dir)).eval()
    graph = next(name for name in FLASHRANK_GRAPHS.values() if (model_dir / name).is_file())
    tokenizer = load_tokenizer(model_dir / TOKENIZER_NAME, max_length=manifest.max_length)
    passages = passage_texts(passage_words)
    query = "Which treatments reduce mortality in patients with a large pleural effusion?"

    def feeds(batch: int) -> Feeds:
        arrays = encode_pairs(tokenizer, query, _cycled(passages, batch))
        return dict(zip(INPUT_NAMES, arrays, strict=True))

    def forward(inputs: Feeds) -> Any:
        with torch.inference_mode():
            return module(**dict(zip(INPUT_NAMES, _tensors(inputs, INPUT_NAMES), strict=True)))

    return Workload(
        name=f"{manifest.name} pairs",
        model_id=manifest.model_id,
        modality="text pair",
        directory=model_dir,
        graph=graph,
        torch_forward=forward,
        feeds=feeds,
        item=f"(question, passage) pair ({_tokens(feeds(1))} tokens)",
    )


def _passage_workload(
    what: str, module: Any, model_dir: Path, graph: str, passage_words: int
) -> Workload:
    """A text model taking ``input_ids`` and ``attention_mask``, on passages."""
    manifest = read_manifest(model_dir)
    tokenizer = load_tokenizer(model_dir / TOKENIZER_NAME, max_length=manifest.max_length)
    texts = passage_texts(passage_words)
    names = ["input_ids", "attention_mask"]

    def feeds(batch: int) -> Feeds:
        return dict(zip(names, encode_batch(tokenizer, _cycled(texts, batch)), strict=True))

    def forward(inputs: Feeds) -> Any:
        with torch.inference_mode():
            return module(*_tensors(inputs, names))

    return Workload(
        name=f"{manifest.name} {what}",
        model_id=manifest.model_id,
        modality="text",
        directory=model_dir,
        graph=graph,
        torch_forward=forward,
        feeds=feeds,
        item=f"passage ({_tokens(feeds(1))} tokens)",
    )


def _cycled_images(
    images: Sequence[npt.NDArray[np.float32]], batch: int
) -> list[npt.NDArray[np.float32]]:
    return list(itertools.islice(itertools.cycle(images), batch))


def _tokens(feeds: Feeds) -> int:
    return int(feeds["input_ids"].shape[1])
