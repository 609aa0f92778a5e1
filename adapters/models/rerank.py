"""A cross-encoder reranker served by ONNX Runtime, scoring as FlashRank does.

Why it exists: nearest-neighbour search ranks literature passages by an embedding similarity that
looks at the query and the passage separately; a cross-encoder reads each (query, passage) pair
together and ranks the few retrieved passages better. The exporter
(:mod:`adapters.models.export.reranker`) writes the model in FlashRank's directory layout, so that
``flashrank.Ranker`` can load it too, but the service runs it here, in a
:class:`adapters.models.session.ModelSession` (providers, precision variant, warm-up) behind a
:class:`adapters.models.batching.MicroBatcher`: FlashRank creates its own session without
execution providers, which is CPU only, and runs each query's passages on their own.
Tokenization and the score transform are FlashRank's, so the scores are the ones FlashRank would
give for the same directory (within float rounding when a batch pads pairs of several calls to a
longer length than FlashRank would).

Layout of a ``reranker`` directory::

    flashrank-MiniLM-L-12-v2_Q.onnx  input_ids, attention_mask, token_type_ids (batch, sequence)
                                     int64 -> logits (batch, 1) float32; named by FLASHRANK_GRAPHS
    tokenizer.json                   pair template, truncating at max_length, padding to longest
    tokenizer_config.json            model_max_length and pad_token (read by FlashRank)
    special_tokens_map.json          special tokens (FlashRank registers them again)
    config.json                      the model's configuration; FlashRank reads pad_token_id
    flashrank-MiniLM-L-12-v2_Q.fp16.onnx
                                     a precision variant of the graph, listed in the manifest
                                     (so is an int8 one, if exported); FlashRank ignores them
    manifest.json
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from adapters.models.batching import BatchSettings
from adapters.models.manifest import ManifestError
from adapters.models.served import ServedModel
from adapters.models.session import (
    ProviderPreference,
    SessionSettings,
    check_signature,
)

__all__ = [
    "FLASHRANK_GRAPHS",
    "INPUT_NAMES",
    "OnnxReranker",
    "PairBatch",
    "encode_pair_batch",
    "encode_pairs",
    "rank_by_score",
    "relevance_scores",
]

FLASHRANK_GRAPHS = {
    "ms-marco-MiniLM-L-12-v2": "flashrank-MiniLM-L-12-v2_Q.onnx",
    "ms-marco-TinyBERT-L-2-v2": "flashrank-TinyBERT-L-2-v2.onnx",
}
"""Graph file name of each FlashRank model name a BERT cross-encoder may be exported as, copied
from ``flashrank.Config.model_file_map`` (0.2.10): FlashRank looks a model up as
``cache_dir/<name>/<file>``. The ``_Q`` (quantised) suffix is FlashRank's name for the slot; the
precision of the graph is the manifest's."""

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
"""Graph inputs, the ones FlashRank feeds a BERT cross-encoder. FlashRank leaves
``token_type_ids`` out only when all of them are 0, which BERT's pair template never gives: the
passage and its final ``[SEP]`` are segment 1."""

PairBatch = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]
"""``(input_ids, attention_mask, token_type_ids)``, int64 of shape ``(N, longest)``."""


class OnnxReranker(ServedModel):
    """Relevance scores of (query, passage) pairs from an exported ``reranker`` directory.

    The directory is verified against its manifest before anything is loaded. Its name does not
    matter here (FlashRank needs it to be the FlashRank model name). The graph runs in a
    :class:`adapters.models.session.ModelSession` (providers, precision variant, warm-up) behind a
    :class:`adapters.models.batching.MicroBatcher` whose items are (query, passage) pairs, so that
    concurrent calls share runs, for the same query or for different ones.

    Args:
        directory: the exported model directory (see the module docstring).
        session: how the graph's session is created (providers, precision, threads, warm-up);
            defaults to :class:`adapters.models.session.SessionSettings` ``()``.
        batching: how concurrent requests are gathered into runs.
        providers: shortcut for ``session=SessionSettings(providers=...)``, see
            :func:`adapters.models.session.resolve_providers`.
        intra_op_threads: shortcut for ``session=SessionSettings(intra_op_threads=...)``.

    Attributes:
        card: name and description of the model, for the clinician.
        manifest: the verified manifest.
        model_id: the model's identity (see :attr:`adapters.models.manifest.Manifest.model_id`).
        model_session: the graph's session.

    Raises:
        ManifestError: the directory is not an intact ``reranker`` export.
        ValueError: ``session`` and a shortcut were both given, or no preferred provider is
            available.

    Example:
        >>> reranker = OnnxReranker("/models/ms-marco-MiniLM-L-12-v2")  # doctest: +SKIP
        >>> await reranker.rerank("pleural effusion", ["Rib fracture.", "Fluid in the pleura."])
        ... # doctest: +SKIP
        [(1, 0.981...), (0, 0.0003...)]
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
            "reranker",
            session=session,
            batching=batching,
            providers=providers,
            intra_op_threads=intra_op_threads,
        )
        directory, manifest = self.directory, self.manifest
        graphs = sorted(set(FLASHRANK_GRAPHS.values()) & set(manifest.files))
        if len(graphs) != 1:
            raise ManifestError(
                directory, f"expected one of the graphs {sorted(FLASHRANK_GRAPHS.values())}"
            )
        self.model_session = self._open_graph(
            graphs[0],
            check=lambda graph: check_signature(graph, directory, inputs=INPUT_NAMES, dimension=1),
            shapes={name: ("batch", "sequence") for name in INPUT_NAMES},
        )
        self._batcher = self._batched(self.model_session, self._score_batch)

    async def score(self, query: str, passages: Sequence[str]) -> npt.NDArray[np.float32]:
        """One relevance score in ``[0, 1]`` per passage, float32 of shape ``(len(passages),)``.

        The pairs join a batch with other callers' pairs, padded to the longest pair of the batch
        (which the graph masks); tokenizing and inference run in a worker thread, off the event
        loop. Alone, the passages of one call run as one padded batch, as FlashRank runs them.

        Raises:
            TypeError: the query or a passage is not a string.
        """
        if not passages:
            return np.zeros(0, dtype=np.float32)
        # Checked here, so that one caller's wrong input cannot fail a batch shared with others.
        if not isinstance(query, str) or not all(isinstance(p, str) for p in passages):
            raise TypeError("the query and the passages must be strings")
        scores = await self._batcher.submit([(query, passage) for passage in passages])
        return np.asarray(scores, dtype=np.float32)

    async def rerank(
        self, query: str, passages: Sequence[str], *, top_n: int | None = None
    ) -> list[tuple[int, float]]:
        """The passages best first, as ``(index in passages, score)``, see :func:`rank_by_score`.

        Args:
            query: the question.
            passages: the candidate passages, usually in retrieval order.
            top_n: keep only the best ``top_n``; ``None`` keeps all.

        Raises:
            ValueError: ``top_n`` is negative.
            TypeError: the query or a passage is not a string.
        """
        if top_n is not None and top_n < 0:
            raise ValueError(f"top_n must be >= 0, got {top_n}")
        return rank_by_score(await self.score(query, passages), top_n=top_n)

    def _score_batch(self, pairs: list[tuple[str, str]]) -> list[np.float32]:
        input_ids, attention_mask, token_type_ids = encode_pair_batch(self._tokenizer, pairs)
        (logits,) = self.model_session.run(
            {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "token_type_ids": token_type_ids,
            }
        )
        return list(relevance_scores(logits))


def encode_pairs(tokenizer: Tokenizer, query: str, passages: Sequence[str]) -> PairBatch:
    """Token ids, attention mask and segment ids of (query, passage) pairs, as FlashRank makes them.

    Args:
        tokenizer: a reranker's tokenizer from :func:`adapters.models.tokenization.load_tokenizer`,
            which truncates ``longest_first`` (as FlashRank's does): tokens come off the longer of
            query and passage, so a long passage is cut and a short query kept whole.
        query: the question, first segment.
        passages: the passages, second segment.

    Example:
        >>> ids, mask, segments = encode_pairs(tokenizer, "effusion", ["fluid", "a rib fracture"])
        ... # doctest: +SKIP
        >>> segments[0].tolist()  # doctest: +SKIP
        [0, 0, 0, 1, 1, 0, 0]
    """
    return encode_pair_batch(tokenizer, [(query, passage) for passage in passages])


def encode_pair_batch(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]) -> PairBatch:
    """:func:`encode_pairs` for pairs that need not share their query: one padded batch, each
    pair tokenized (and truncated) on its own as FlashRank tokenizes it.

    Example:
        >>> ids, _, _ = encode_pair_batch(tokenizer, [("effusion", "fluid"), ("rib", "fracture")])
        ... # doctest: +SKIP
    """
    encodings = tokenizer.encode_batch(list(pairs))
    count = len(encodings)
    arrays = (
        np.array([encoding.ids for encoding in encodings], dtype=np.int64),
        np.array([encoding.attention_mask for encoding in encodings], dtype=np.int64),
        np.array([encoding.type_ids for encoding in encodings], dtype=np.int64),
    )
    input_ids, attention_mask, token_type_ids = (array.reshape(count, -1) for array in arrays)
    return input_ids, attention_mask, token_type_ids


def relevance_scores(logits: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """FlashRank's score of a one-logit cross-encoder: the logistic sigmoid, in float32.

    Written as FlashRank writes it (``1 / (1 + exp(-logit))`` on the float32 logits), so that the
    scores are bit for bit FlashRank's. Logits beyond about +-17 give exactly 1.0 or 0.0.

    Example:
        >>> [round(float(score), 4) for score in relevance_scores([[0.0], [2.0]])]
        [0.5, 0.8808]
    """
    flat = np.asarray(logits, dtype=np.float32).reshape(-1)
    # A very negative logit overflows exp to inf, and the score is then exactly 0, as it should be.
    with np.errstate(over="ignore"):
        return np.asarray(1 / (1 + np.exp(-flat)), dtype=np.float32)


def rank_by_score(scores: npt.ArrayLike, *, top_n: int | None = None) -> list[tuple[int, float]]:
    """Indices and scores, highest score first; equal scores keep their input order.

    The order is the one FlashRank's stable sort gives, so a saturated score (1.0) leaves the
    passages that share it in retrieval order.

    Args:
        scores: one score per passage.
        top_n: keep only the first ``top_n``; ``None`` keeps all.

    Example:
        >>> rank_by_score([0.2, 0.9, 0.2, 0.5], top_n=3)
        [(1, 0.9), (3, 0.5), (0, 0.2)]
    """
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-values, kind="stable")
    if top_n is not None:
        order = order[:top_n]
    return [(int(index), float(values[index])) for index in order]
