"""Export a BGE-M3 model's dense and sparse heads, as FlagEmbedding computes them, as a
``dense-sparse-text-embedder`` directory.

Why it exists: BGE-M3 gives a text a dense vector (its L2-normalised CLS state) and lexical
weights (``relu(sparse_linear(last_hidden_state))``, one weight per token, kept per token id at its
largest) from one pass of an XLM-RoBERTa encoder. Its reference implementation is FlagEmbedding's
``BGEM3FlagModel``. This module loads a local model directory with it, writes one ONNX graph that
runs FlagEmbedding's own inference forward pass for both heads, and accepts the result only when
the service's tokenization and graph (:class:`adapters.models.sparse_text.OnnxBgeM3Embedder`'s
code) reproduce ``BGEM3FlagModel.encode``: the dense vectors by cosine, the lexical weights token
by token. The ColBERT head is not exported.

FlagEmbedding (1.4.2) loads ``sparse_linear.pt`` only when ``colbert_linear.pt`` is there too;
otherwise it initialises both heads randomly, saying so only in an info-level log line, and a path
that does not exist is taken for a hub id and downloaded. The exporter therefore refuses a source
without either file, or a missing directory, before FlagEmbedding sees it.

Layout written::

    model.onnx        input_ids, attention_mask (batch, sequence) int64
                      -> dense (batch, D) float32, sparse (batch, sequence) float32
    model.onnx.data   the weights, for a graph over 2 GB (full-size BGE-M3)
    tokenizer.json    FlagEmbedding's tokenizer, truncating at max_length (512 by default, see
                      DEFAULT_MAX_LENGTH), padding to the longest
    model.fp16.onnx, model.int8.onnx   precision variants (with .data files beside them when the
                      graph has one), measured against torch
    manifest.json

The ``sparse`` output is each token's weight as FlagEmbedding computes it, set to zero at padding
and at the special tokens FlagEmbedding leaves out of lexical weights (its tokenizer's CLS, EOS,
PAD and UNK tokens), so that serving only keeps positive weights and takes the largest per id.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tokenizers import Tokenizer

from adapters.models.export.graph import DEFAULT_OPSET, export_graph
from adapters.models.export.output import created_by, staged_directory
from adapters.models.export.parity import ParityError, require_parity
from adapters.models.export.precision import (
    DEFAULT_PRECISIONS,
    Feeds,
    by_precision,
    write_precision_variants,
)
from adapters.models.manifest import Manifest, Parity, hash_files, save_manifest
from adapters.models.session import create_session
from adapters.models.sparse_text import (
    DENSE_OUTPUT,
    GRAPH_NAME,
    INPUT_NAMES,
    SPARSE_OUTPUT,
    SparseWeights,
    lexical_weights,
)
from adapters.models.tokenization import TOKENIZER_NAME, encode_batch, load_tokenizer

__all__ = [
    "BGE_M3_MAX_LENGTH",
    "COLBERT_HEAD",
    "DEFAULT_MAX_LENGTH",
    "SPARSE_HEAD",
    "SPARSE_TOLERANCE",
    "dense_sparse_module",
    "export_bge_m3",
    "load_bge_m3",
]

logger = logging.getLogger(__name__)

SPARSE_HEAD = "sparse_linear.pt"
"""The lexical-weight head's state dict in a BGE-M3 directory."""

COLBERT_HEAD = "colbert_linear.pt"
"""The ColBERT head's state dict; not exported, but FlagEmbedding needs it to load the sparse
head."""

BGE_M3_MAX_LENGTH = 8192
"""BGE-M3's maximum input, in tokens, special tokens included."""

DEFAULT_MAX_LENGTH = 512
"""The tokens per text an export truncates at unless told otherwise, special tokens included.

Not BGE-M3's own limit (:data:`BGE_M3_MAX_LENGTH`): the exported graph computes attention as
XLM-RoBERTa's eager implementation does, materialising each layer's full attention matrices, 16
heads of ``sequence x sequence`` float32 values. At 8192 tokens that is 16 x 8192 x 8192 x 4 bytes
= 4.3 GB per text and layer (measured: 8192-token texts do not fit a CPU server), at 512 tokens
16 MB. The service embeds literature abstracts and queries, well under 512 tokens; a longer text
keeps its first 512 tokens."""

SPARSE_TOLERANCE = 1e-4
"""The largest acceptable absolute difference between a lexical weight from FlagEmbedding and one
from the export."""

# The roles FlagEmbedding's M3Embedder.encode_single_device leaves out of lexical weights.
_IGNORED_ROLES = ("cls_token", "eos_token", "pad_token", "unk_token")

_PARITY_TEXTS = (
    "Small left pleural effusion.",
    "No acute cardiopulmonary abnormality.",
    "Right lower lobe consolidation concerning for pneumonia, with a small parapneumonic "
    "effusion and no pneumothorax.",
    "Effusion, effusion and more effusion: the word repeats.",
    "Mild cardiomegaly with pulmonary vascular congestion and interstitial edema.",
    "Serum creatinine is raised; eGFR 38 mL/min/1.73m².",
    "pneumothorax",
)
# Repeated past max_length, so that one parity text is truncated.
_LONG_SENTENCE = "Bilateral pleural effusions, larger on the right, with basilar atelectasis. "


def dense_sparse_module(flag: Any) -> torch.nn.Module:
    """The torch module the exported graph is traced from: FlagEmbedding's inference forward pass
    for the dense and sparse heads, ``(input_ids, attention_mask) -> (dense, sparse)``, in eval
    mode (for exports and speed measurements).

    Args:
        flag: a ``BGEM3FlagModel`` from :func:`load_bge_m3`.
    """
    return _DenseSparse(flag.model, _ignored_token_ids(flag.tokenizer)).eval()


class _DenseSparse(torch.nn.Module):
    """FlagEmbedding's inference forward pass for the dense and sparse heads, with each token's
    weight zeroed where FlagEmbedding ignores the token (padding, ``ignored_ids``)."""

    def __init__(self, m3: torch.nn.Module, ignored_ids: Sequence[int]) -> None:
        super().__init__()
        self.m3: Any = m3
        self.ignored_ids = tuple(ignored_ids)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.m3(
            {"input_ids": input_ids, "attention_mask": attention_mask},
            return_dense=True,
            return_sparse=True,
        )
        weights = output["sparse_vecs"].squeeze(-1)
        keep = attention_mask.to(weights.dtype)
        for token_id in self.ignored_ids:
            keep = keep * (input_ids != token_id).to(weights.dtype)
        return output["dense_vecs"], weights * keep


def load_bge_m3(source_dir: Path | str) -> Any:
    """Load a local BGE-M3 directory with FlagEmbedding, on CPU in fp32, refusing one it would
    silently complete with random heads.

    Args:
        source_dir: a directory with the encoder (``config.json``, weights), the tokenizer,
            :data:`SPARSE_HEAD` and :data:`COLBERT_HEAD`.

    Returns:
        The ``BGEM3FlagModel`` (normalised CLS dense vectors, FlagEmbedding's defaults).

    Raises:
        FileNotFoundError: the directory, or one of the two head files, is missing.

    Example:
        >>> flag = load_bge_m3("/downloads/bge-m3")  # doctest: +SKIP
        >>> flag.encode(["pleural effusion"])["dense_vecs"].shape  # doctest: +SKIP
        (1, 1024)
    """
    source = Path(source_dir)
    if not source.is_dir():
        raise FileNotFoundError(
            f"{source} is not a directory (FlagEmbedding would look for a hub model of that name)"
        )
    for head, consequence in (
        (SPARSE_HEAD, "initialise the sparse head randomly"),
        (COLBERT_HEAD, "ignore sparse_linear.pt and initialise the sparse head randomly"),
    ):
        if not (source / head).is_file():
            # The file name first: it is what the reader must act on, whatever the path's length.
            raise FileNotFoundError(
                f"{head} is missing from {source}: FlagEmbedding would silently {consequence}"
            )
    from FlagEmbedding import BGEM3FlagModel

    return BGEM3FlagModel(
        str(source),
        use_fp16=False,
        devices="cpu",
        pooling_method="cls",
        normalize_embeddings=True,
    )


def export_bge_m3(
    source_dir: Path | str,
    out_dir: Path | str,
    *,
    name: str | None = None,
    description: str | None = None,
    provenance: str | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    opset: int = DEFAULT_OPSET,
    precisions: Sequence[str] = DEFAULT_PRECISIONS,
) -> Path:
    """Export a local BGE-M3 model's dense and sparse heads to ``out_dir``.

    Precision variants (``model.fp16.onnx``, ``model.int8.onnx``) are written beside the graph and
    measured against the torch module's two outputs on the parity batches
    (:func:`adapters.models.export.precision.output_agreement` compares each output row by row, the
    dense vectors and each text's per-token sparse weights, and records the smallest cosine of
    either). Measured on the tiny model against torch, per output:

    * fp16: dense min cosine 0.9999998, sparse 0.9999998 (max |Δweight| 0.001);
    * int8: dense 0.99997, sparse 0.99991 (max |Δweight| 0.028), no token id gained or lost
      among the 123 lexical weights of the parity texts.

    Args:
        source_dir: a local BGE-M3 directory, as BAAI/bge-m3 is laid out (see
            :func:`load_bge_m3`).
        out_dir: the model directory to create; must not exist or be empty.
        name: the model's short name; defaults to the source directory's name.
        description: the line shown to clinicians; defaults to one naming the source.
        provenance: what the manifest records as the source; defaults to the source directory.
        max_length: tokens per text, special tokens included; longer texts are truncated.
            :data:`DEFAULT_MAX_LENGTH` (512) by default, not BGE-M3's 8192: see there why.
        opset: ONNX opset version.
        precisions: the precision variants to write (``()`` for none). On 2 cores they add
            0.7 s to the tiny model's build (about 5 s); to the full-size model's (about 75 s)
            they add about 100 s and 1.7 GB of files (fp16 1.1 GB, int8 0.57 GB, each with an
            external data file like the graph's). The random full-size model measured fp16
            dense 0.9999984, sparse 0.999994; int8 dense 0.9967, sparse 0.9934, with 2 of 126
            token ids gained or lost (on 6 other texts its int8 sparse cosine fell to 0.985,
            near the 0.98 bound: int8 runs only when asked for).

    Returns:
        The model directory.

    Raises:
        FileNotFoundError: the source directory or one of its head files is missing.
        ValueError: ``max_length`` exceeds the encoder's positions.
        ParityError: the saved tokenizer or the graph does not reproduce FlagEmbedding's
            ``encode``: token ids differ, a dense cosine is below 0.9999, the sets of tokens
            with a lexical weight differ, a weight differs by more than
            :data:`SPARSE_TOLERANCE`, or no non-zero weight was there to compare; or a precision
            variant is below its bound (see :mod:`adapters.models.export.precision`).
        FileExistsError: ``out_dir`` holds files.

    Example:
        >>> export_bge_m3(  # doctest: +SKIP
        ...     "/downloads/bge-m3",
        ...     "/models/bge-m3",
        ...     name="BGE-M3",
        ...     description="BGE-M3 (BAAI): multilingual dense and sparse text embedder.",
        ...     provenance="BAAI/bge-m3 (Hugging Face hub, revision 5617a9f)",
        ... )
        PosixPath('/models/bge-m3')
    """
    started = time.perf_counter()
    source = Path(source_dir).resolve()
    name = name or source.name
    description = description or f"{name}: BGE-M3-style dense and sparse text embedder"
    flag = load_bge_m3(source)
    encoder = flag.model.model
    config = encoder.config
    positions = _max_tokens(config)
    if not 1 <= max_length <= positions:
        raise ValueError(f"max_length {max_length} outside 1..{positions}, the encoder's limit")
    ignored = _ignored_token_ids(flag.tokenizer)
    module = dense_sparse_module(flag)
    with staged_directory(out_dir) as staging:
        _write_tokenizer(flag.tokenizer, staging / TOKENIZER_NAME, max_length)
        tokenizer = load_tokenizer(staging / TOKENIZER_NAME, max_length=max_length)
        # Texts of different lengths, so that the traced example is padded.
        example = encode_batch(tokenizer, ["Effusion.", "A longer example, which is not padded."])
        export_graph(
            module,
            [torch.from_numpy(array) for array in example],
            staging / GRAPH_NAME,
            input_names=INPUT_NAMES,
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                SPARSE_OUTPUT: {0: "batch", 1: "sequence"},
            },
            output_names=(DENSE_OUTPUT, SPARSE_OUTPUT),
            opset=opset,
        )
        texts = (*_PARITY_TEXTS, _long_text(flag.tokenizer, max_length))
        # Batch sizes and padded lengths other than the tracing example's. The truncated text
        # runs alone: padding every other text to max_length would multiply the attention memory
        # (see DEFAULT_MAX_LENGTH), and the other batches test padding.
        batches = (texts[:-1], texts[2:4], texts[-1:])
        parity = _parity(flag, staging / GRAPH_NAME, tokenizer, batches, max_length)
        variants = write_precision_variants(
            staging / GRAPH_NAME,
            [_feeds(tokenizer, batch) for batch in batches],
            reference=lambda feeds: _torch_outputs(module, feeds),
            reference_name="torch eager",
            inputs=(
                f"{len(texts)} texts in padded batches of {_batch_sizes(batches)}, one truncated; "
                f"both outputs row by row ({DENSE_OUTPUT} vectors and each text's per-token "
                f"{SPARSE_OUTPUT} weights), the smaller cosine recorded"
            ),
            precisions=precisions,
        )
        manifest = Manifest(
            name=name,
            kind="dense-sparse-text-embedder",
            description=description,
            source=provenance or str(source),
            architecture=(
                f"{type(encoder).__name__} ({config.num_hidden_layers} layers, width "
                f"{config.hidden_size}, {config.num_attention_heads} heads, vocabulary "
                f"{config.vocab_size}); dense: L2-normalised CLS state; sparse: "
                f"relu(Linear({config.hidden_size}, 1)) per token, largest per token id, "
                f"token ids {list(ignored)} (CLS, EOS, PAD, UNK) dropped; ColBERT head not "
                "exported"
            ),
            dimension=parity.dimension,
            max_length=max_length,
            image_size=None,
            opset=opset,
            precision="fp32",
            files=hash_files(staging),
            parity=Parity(
                compared=(
                    f"FlagEmbedding {importlib.metadata.version('FlagEmbedding')} "
                    "BGEM3FlagModel.encode (torch CPU fp32) vs onnxruntime CPU fed by "
                    f"tokenizer.json: {len(texts)} texts in padded batches of "
                    f"{_batch_sizes(batches)}, one truncated at "
                    f"{max_length} tokens; token ids identical; dense min cosine "
                    f"{parity.min_cosine:.7f}; sparse: identical token sets, "
                    f"{parity.weights} non-zero weights compared, max |Δweight| "
                    f"{parity.max_abs_diff:.2e} (tolerance {SPARSE_TOLERANCE:g})"
                ),
                min_cosine=parity.min_cosine,
                max_abs_diff=parity.max_abs_diff,
            ),
            created_by=created_by(__name__, "torch", "transformers", "FlagEmbedding", "onnx"),
            variants=by_precision({GRAPH_NAME: variants}),
        )
        save_manifest(manifest, staging)
    logger.info(
        "model exported",
        extra={
            "model_id": manifest.model_id,
            "min_cosine": parity.min_cosine,
            "max_abs_diff": parity.max_abs_diff,
            "sparse_weights_compared": parity.weights,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    return Path(out_dir).resolve()


@dataclass(frozen=True, slots=True)
class _Measured:
    """What parity measured: the dense dimension and smallest cosine, the largest lexical weight
    difference and how many non-zero weights were compared."""

    dimension: int
    min_cosine: float
    max_abs_diff: float
    weights: int


def _batch_sizes(batches: Sequence[Sequence[str]]) -> str:
    return ", ".join(str(len(batch)) for batch in batches)


def _feeds(tokenizer: Tokenizer, texts: Sequence[str]) -> Feeds:
    """The graph inputs of ``texts``, tokenized as the service tokenizes."""
    return dict(zip(INPUT_NAMES, encode_batch(tokenizer, texts), strict=True))


def _torch_outputs(module: torch.nn.Module, feeds: Feeds) -> list[npt.NDArray[np.float32]]:
    """The torch module's ``[dense, sparse]``, in the graph's output order."""
    with torch.no_grad():
        dense, sparse = module(*(torch.from_numpy(feeds[name]) for name in INPUT_NAMES))
    return [dense.numpy(), sparse.numpy()]


def _max_tokens(config: Any) -> int:
    """Tokens the encoder can take: RoBERTa-family models number positions from pad id + 1."""
    positions = int(config.max_position_embeddings)
    if config.model_type in ("xlm-roberta", "roberta"):
        positions -= int(config.pad_token_id) + 1
    return positions


def _ignored_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The token ids FlagEmbedding leaves out of lexical weights, found as it finds them."""
    special = tokenizer.special_tokens_map
    ids = {
        int(tokenizer.convert_tokens_to_ids(special[role]))
        for role in _IGNORED_ROLES
        if role in special
    }
    return tuple(sorted(ids))


def _write_tokenizer(reference: Any, path: Path, max_length: int) -> None:
    """Save FlagEmbedding's tokenizer as ``tokenizer.json``, set to truncate at ``max_length``
    and to pad with its pad token."""
    tokenizer = Tokenizer.from_str(reference.backend_tokenizer.to_str())
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=int(reference.pad_token_id), pad_token=reference.pad_token)
    tokenizer.save(str(path))


def _long_text(reference: Any, max_length: int) -> str:
    """A text that FlagEmbedding's tokenizer makes longer than ``max_length`` tokens."""
    per_sentence = len(reference(_LONG_SENTENCE, add_special_tokens=False)["input_ids"])
    return _LONG_SENTENCE * (max_length // max(per_sentence, 1) + 2)


def _parity(
    flag: Any,
    graph: Path,
    tokenizer: Tokenizer,
    batches: Sequence[Sequence[str]],
    max_length: int,
) -> _Measured:
    session = create_session(graph, providers="cpu")
    worst_cosine, worst_diff, compared, dimension, truncated = 1.0, 0.0, 0, 0, False
    for batch in batches:
        texts = list(batch)
        expected_ids = flag.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        input_ids, attention_mask = encode_batch(tokenizer, texts)
        actual_ids = [
            row[mask == 1].tolist() for row, mask in zip(input_ids, attention_mask, strict=True)
        ]
        if actual_ids != [list(ids) for ids in expected_ids]:
            raise ParityError("tokenizer.json does not reproduce FlagEmbedding's token ids")
        truncated = truncated or any(len(ids) == max_length for ids in expected_ids)
        # One padded batch, as the service pads; a batch_size above the number of texts also
        # keeps FlagEmbedding's progress bars off.
        expected = flag.encode(
            texts,
            batch_size=len(texts) + 1,
            max_length=max_length,
            return_dense=True,
            return_sparse=True,
            return_colbert_vecs=False,
        )
        dense, weights = session.run(
            [DENSE_OUTPUT, SPARSE_OUTPUT],
            {"input_ids": input_ids, "attention_mask": attention_mask},
        )
        worst_cosine = min(
            worst_cosine, require_parity(expected["dense_vecs"], dense, "dense output")
        )
        dimension = int(dense.shape[1])
        diff, count = _compare_sparse(
            expected["lexical_weights"], lexical_weights(input_ids, np.asarray(weights))
        )
        worst_diff, compared = max(worst_diff, diff), compared + count
    if not truncated:
        raise ParityError(f"no parity text reached max_length {max_length}: truncation untested")
    if compared == 0:
        raise ParityError("no non-zero sparse weight was compared: sparse parity is untested")
    return _Measured(dimension, worst_cosine, worst_diff, compared)


def _compare_sparse(
    expected: Sequence[dict[str, Any]], actual: Sequence[SparseWeights]
) -> tuple[float, int]:
    """``(max |Δweight|, weights compared)`` between FlagEmbedding's lexical weights (token id
    as a string to a float32 weight) and the export's, which must have the same token ids."""
    worst, compared = 0.0, 0
    for index, (reference, ours) in enumerate(zip(expected, actual, strict=True)):
        wanted = {int(token): float(weight) for token, weight in reference.items()}
        if set(wanted) != set(ours):
            raise ParityError(
                f"sparse output, text {index}: token ids only FlagEmbedding weighs "
                f"{sorted(set(wanted) - set(ours))}, only the export weighs "
                f"{sorted(set(ours) - set(wanted))}"
            )
        differences: npt.NDArray[np.float64] = np.array(
            [abs(weight - ours[token]) for token, weight in wanted.items()], dtype=np.float64
        )
        if differences.size:
            worst = max(worst, float(differences.max()))
        compared += int(differences.size)
    if not worst <= SPARSE_TOLERANCE:
        raise ParityError(f"sparse output: max |Δweight| {worst:.2e} > {SPARSE_TOLERANCE:g}")
    return worst, compared
