"""PubMedQA abstracts as citable literature passages.

`PubMedQA <https://pubmedqa.github.io>`_ ships each abstract as a JSON object keyed by its PMID,
with the abstract split into labelled sections (``CONTEXTS`` and ``LABELS``). Each section
becomes one :class:`core.types.Passage` with a stable id (``<pmid>:<section index>``), so a
retrieved passage can be cited by PMID and section.

The dataset has no article titles. Its ``QUESTION`` is an evaluation question written for the
abstract, not the title, so it is never put into a passage; :func:`read_pubmedqa_questions`
returns the questions separately for evaluations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from core.types import Passage

__all__ = ["PubMedQAFormatError", "read_pubmedqa", "read_pubmedqa_questions"]


class PubMedQAFormatError(ValueError):
    """The file is not shaped like PubMedQA (a JSON object of PMID to abstract record)."""


def _load(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The file's records by PMID, checked for the fields both readers rely on."""
    source = Path(path)
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PubMedQAFormatError(f"{source} is not JSON: {error}") from error
    if not isinstance(data, dict):
        raise PubMedQAFormatError(
            f"{source}: expected a JSON object of PMID to record, got {type(data).__name__}"
        )
    for pmid, record in data.items():
        where = f"{source}, PMID {pmid}"
        if not pmid.isdigit():
            raise PubMedQAFormatError(f"{source}: key {pmid!r} is not a PMID")
        if not isinstance(record, dict):
            raise PubMedQAFormatError(f"{where}: expected an object, got {type(record).__name__}")
        contexts, labels = record.get("CONTEXTS"), record.get("LABELS")
        if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
            raise PubMedQAFormatError(f"{where}: CONTEXTS must be a list of strings")
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise PubMedQAFormatError(f"{where}: LABELS must be a list of strings")
        if len(labels) != len(contexts):
            raise PubMedQAFormatError(f"{where}: {len(contexts)} CONTEXTS but {len(labels)} LABELS")
        if not isinstance(record.get("YEAR"), str | int | None):
            raise PubMedQAFormatError(f"{where}: YEAR must be a string, a number or null")
        if not isinstance(record.get("QUESTION"), str):
            raise PubMedQAFormatError(f"{where}: QUESTION must be a string")
    return data


def read_pubmedqa(path: str | os.PathLike[str]) -> list[Passage]:
    """Read a PubMedQA file as passages, one per non-empty abstract section.

    Args:
        path: a PubMedQA JSON file (for example ``ori_pqal.json`` or ``test_set.json``).

    Returns:
        Passages in file order, then section order: ``passage_id`` is ``"<pmid>:<i>"`` with
        ``i`` the section's index in ``CONTEXTS`` (kept when an empty section before it is
        skipped), ``section`` its label (``None`` when the label is empty), ``year`` the
        publication year as text, ``title`` ``None``, and the text with runs of whitespace
        collapsed to single spaces.

    Raises:
        PubMedQAFormatError: when the file is not JSON or not shaped like PubMedQA.
        OSError: when the file cannot be read.

    Example:
        >>> passages = read_pubmedqa("test_set.json")  # doctest: +SKIP
        >>> passages[0].passage_id, passages[0].section  # doctest: +SKIP
        ('12377809:0', 'AIMS')
    """
    passages: list[Passage] = []
    for pmid, record in _load(path).items():
        year = record.get("YEAR")
        for i, (context, label) in enumerate(
            zip(record["CONTEXTS"], record["LABELS"], strict=True)
        ):
            text = " ".join(context.split())
            if not text:
                continue
            passages.append(
                Passage(
                    passage_id=f"{pmid}:{i}",
                    pmid=pmid,
                    text=text,
                    section=label.strip() or None,
                    year=None if year is None else str(year),
                    title=None,
                )
            )
    return passages


def read_pubmedqa_questions(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Read the evaluation questions of a PubMedQA file with the PMID each was written for.

    Args:
        path: a PubMedQA JSON file.

    Returns:
        ``(pmid, question)`` pairs in file order, the question whitespace-normalised.

    Raises:
        PubMedQAFormatError: when the file is not JSON or not shaped like PubMedQA.
        OSError: when the file cannot be read.
    """
    return [(pmid, " ".join(record["QUESTION"].split())) for pmid, record in _load(path).items()]
