"""Text to token-id batches, with the ``tokenizers`` library and the ``tokenizer.json`` of a model.

Why it exists: both the text embedder and the text tower of the image/text model tokenize the same
way at serving time: truncate at the model's maximum length (special tokens included), pad to the
longest text of the batch with the pad token the exporter recorded in ``tokenizer.json``, and hand
onnxruntime int64 arrays. Padding to the longest text rather than to the maximum keeps short
batches cheap; the graphs mask padding, so a text's embedding does not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

__all__ = ["TOKENIZER_NAME", "TokenBatch", "encode_batch", "load_tokenizer"]

TOKENIZER_NAME = "tokenizer.json"
"""File name of the tokenizer inside a model directory."""

TokenBatch = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]
"""``(input_ids, attention_mask)``, both int64 of shape ``(N, longest)``."""


def load_tokenizer(path: Path, *, max_length: int) -> Tokenizer:
    """Load ``tokenizer.json`` and set truncation at ``max_length`` and padding to the longest.

    Args:
        path: the ``tokenizer.json`` of an exported model; its padding section names the pad
            token (the exporters write it).
        max_length: tokens per text, special tokens included.

    Returns:
        A tokenizer ready for :func:`encode_batch`.

    Raises:
        ValueError: the file does not say which token pads.
    """
    tokenizer = Tokenizer.from_file(str(path))
    padding = tokenizer.padding
    if padding is None:
        raise ValueError(f"{path} has no padding section: the pad token is unknown")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(
        direction="right", pad_id=padding["pad_id"], pad_token=padding["pad_token"]
    )
    return tokenizer


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str]) -> TokenBatch:
    """Token ids and attention mask of a batch of texts.

    Example:
        >>> ids, mask = encode_batch(load_tokenizer(path, max_length=256), ["a", "a b c"])
        ... # doctest: +SKIP
        >>> ids.shape, mask[0].tolist()  # doctest: +SKIP
        ((2, 5), [1, 1, 1, 0, 0])
    """
    encodings = tokenizer.encode_batch(list(texts))
    ids = np.array([encoding.ids for encoding in encodings], dtype=np.int64)
    mask = np.array([encoding.attention_mask for encoding in encodings], dtype=np.int64)
    return ids.reshape(len(encodings), -1), mask.reshape(len(encodings), -1)
