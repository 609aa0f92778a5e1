"""BEIR datasets: a corpus, its queries and relevance judgements, for indexing and evaluation.

`BEIR <https://github.com/beir-cellar/beir>`_ datasets (NFCorpus, TREC-COVID, SciFact, ...) share
one layout, so that a retriever is evaluated on all of them by the same code::

    <dataset>/corpus.jsonl       {"_id", "title", "text", "metadata"?} per line
    <dataset>/queries.jsonl      {"_id", "text", "metadata"?} per line
    <dataset>/qrels/<split>.tsv  header "query-id  corpus-id  score", then one judgement per line

The readers stream the files line by line, so a corpus of millions of documents is never held
as text, and stop at the first line that is not what the format says, naming the file and the
line: an evaluation on a silently half-read dataset would report numbers that mean nothing.

Each corpus document becomes one :class:`core.types.Passage` whose ``passage_id`` *and*
``pmid`` are the document's ``_id``: a BEIR corpus document is the unit that is judged, and its
id is what the index cites (for the biomedical BEIR sets it is a PubMed, PMC or CORD-19 id, not
always a PMID).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.types import Passage

__all__ = [
    "BeirCorpus",
    "BeirFormatError",
    "read_beir_corpus",
    "read_beir_qrels",
    "read_beir_queries",
]

_QRELS_HEADER = ("query-id", "corpus-id", "score")
_DOI_PREFIXES = ("https://doi.org/", "http://doi.org/", "https://dx.doi.org/", "http://dx.doi.org/")


class BeirFormatError(ValueError):
    """A BEIR file is not shaped as the format says; the message names the file and the line."""


@dataclass(frozen=True, slots=True)
class BeirCorpus:
    """The passages of a BEIR corpus, and the documents that could not be passages.

    Args:
        passages: one per document with text, in file order.
        skipped: ``(document id, reason)`` for each document left out (its text is empty).
    """

    passages: tuple[Passage, ...]
    skipped: tuple[tuple[str, str], ...] = ()


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """The file's lines with their 1-based numbers, read one at a time and decoded as UTF-8
    line by line, so that a bad byte is reported on its own line (a byte order mark at the
    start is dropped)."""
    with path.open("rb") as lines:
        for number, data in enumerate(lines, start=1):
            try:
                line = data.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise BeirFormatError(f"{path}, line {number}: not UTF-8 text") from error
            yield number, line


def _json_lines(path: Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """Each non-blank line of a JSON Lines file as an object, with its line number and where it
    is in words (for errors)."""
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise BeirFormatError(f"{where}: not JSON ({error.msg})") from error
        if not isinstance(item, dict):
            raise BeirFormatError(f"{where}: expected an object, got {type(item).__name__}")
        yield number, where, item


def _id_of(item: dict[str, Any], where: str) -> str:
    # Ids are strings in every published BEIR set; a number is accepted as its decimal text,
    # which is how the qrels file (text) names it.
    value = item.get("_id")
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        raise BeirFormatError(f"{where}: _id must be a non-empty string")
    return str(value).strip()


def _text_of(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise BeirFormatError(f"{where}: {key} must be a string")
    return " ".join(value.split())


def _optional_text(value: Any, name: str, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BeirFormatError(f"{where}: {name} must be a string")
    return " ".join(str(value).split()) or None


def _doi(value: str | None) -> str | None:
    """The DOI without a resolver prefix (``10.1056/...``)."""
    if value is None:
        return None
    for prefix in (*_DOI_PREFIXES, "doi:"):
        if value.lower().startswith(prefix):
            return value[len(prefix) :].strip() or None
    return value


def _check_new(seen: dict[str, int], identifier: str, number: int, where: str) -> None:
    """Remember the line of ``identifier``; refuse it if an earlier line gave it."""
    first = seen.setdefault(identifier, number)
    if first != number:
        raise BeirFormatError(f"{where}: _id {identifier!r} was already given on line {first}")


def read_beir_corpus(folder: str | os.PathLike[str]) -> BeirCorpus:
    """Read a BEIR dataset's ``corpus.jsonl`` as passages.

    Args:
        folder: the dataset folder (it holds ``corpus.jsonl``).

    Returns:
        One passage per document with text, in file order: ``passage_id`` and ``pmid`` are the
        document's ``_id``, ``text`` and ``title`` have runs of whitespace collapsed (an empty
        title is ``None``), ``doi`` and ``year`` come from ``metadata`` when it has them
        (``doi`` without a ``https://doi.org/`` or ``doi:`` prefix), ``section`` is ``None``.
        A document whose text is empty is not a passage: it is listed in ``skipped``.

    Raises:
        BeirFormatError: a line is not a JSON object with a non-empty string ``_id`` and a
            string ``text`` (``title`` and ``metadata.doi``/``metadata.year``, when present,
            strings; ``metadata`` an object), or an ``_id`` repeats.
        OSError: the file cannot be read (``FileNotFoundError`` when the folder has none).

    Example:
        >>> import json, tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> docs = [{"_id": "d1", "title": "Aspirin", "text": "Aspirin  lowers fever.",
        ...          "metadata": {"doi": "https://doi.org/10.1/x"}},
        ...         {"_id": "d2", "title": "Empty", "text": ""}]
        >>> _ = (folder / "corpus.jsonl").write_text("\\n".join(json.dumps(d) for d in docs))
        >>> corpus = read_beir_corpus(folder)
        >>> corpus.passages[0]
        Passage(passage_id='d1', pmid='d1', text='Aspirin lowers fever.', section=None, year=None, title='Aspirin', doi='10.1/x')
        >>> corpus.skipped
        (('d2', 'empty text'),)
        >>> import shutil; shutil.rmtree(folder)
    """  # noqa: E501
    passages: list[Passage] = []
    skipped: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for number, where, item in _json_lines(Path(folder) / "corpus.jsonl"):
        identifier = _id_of(item, where)
        _check_new(seen, identifier, number, where)
        text = _text_of(item, "text", where)
        title = _optional_text(item.get("title"), "title", where)
        metadata = item.get("metadata")
        if metadata is None:
            metadata = {}
        elif not isinstance(metadata, dict):
            raise BeirFormatError(f"{where}: metadata must be an object")
        doi = _doi(_optional_text(metadata.get("doi"), "metadata.doi", where))
        year = _optional_text(metadata.get("year"), "metadata.year", where)
        if not text:
            skipped.append((identifier, "empty text"))
            continue
        passages.append(
            Passage(
                passage_id=identifier, pmid=identifier, text=text, year=year, title=title, doi=doi
            )
        )
    return BeirCorpus(passages=tuple(passages), skipped=tuple(skipped))


def read_beir_queries(folder: str | os.PathLike[str]) -> dict[str, str]:
    """Read a BEIR dataset's ``queries.jsonl``.

    Args:
        folder: the dataset folder (it holds ``queries.jsonl``).

    Returns:
        Each query's text (runs of whitespace collapsed) by its ``_id``, in file order.

    Raises:
        BeirFormatError: a line is not a JSON object with a non-empty string ``_id`` and a
            non-empty string ``text``, or an ``_id`` repeats.
        OSError: the file cannot be read.

    Example:
        >>> read_beir_queries("datasets/nfcorpus")["PLAIN-3"]  # doctest: +SKIP
        'Breast Cancer Cells Feed on Cholesterol'
    """
    queries: dict[str, str] = {}
    seen: dict[str, int] = {}
    for number, where, item in _json_lines(Path(folder) / "queries.jsonl"):
        identifier = _id_of(item, where)
        _check_new(seen, identifier, number, where)
        text = _text_of(item, "text", where)
        if not text:
            raise BeirFormatError(f"{where}: query {identifier!r} has an empty text")
        queries[identifier] = text
    return queries


def read_beir_qrels(
    folder: str | os.PathLike[str],
    split: str = "test",
    *,
    queries: Collection[str] | None = None,
) -> dict[str, dict[str, int]]:
    """Read a BEIR dataset's relevance judgements of one split.

    Only judgements of queries that exist are kept: an evaluation that met a judged query it
    cannot ask would either fail or count it as a miss.

    Args:
        folder: the dataset folder (it holds ``qrels/<split>.tsv``).
        split: ``test``, ``dev`` or ``train``.
        queries: the ids of the queries to keep judgements of; by default those of the
            folder's ``queries.jsonl`` (read for it).

    Returns:
        ``{query id: {document id: score}}``, scores as the file gives them (``0`` is a judged
        non-relevant document; graded sets have ``2`` and more).

    Raises:
        BeirFormatError: the first non-blank line is not the ``query-id corpus-id score``
            header, a line does not have three tab-separated fields with an integer score, or
            a (query, document) pair repeats; or, when ``queries`` is not given,
            ``queries.jsonl`` is malformed.
        OSError: a file cannot be read.

    Example:
        >>> qrels = read_beir_qrels("datasets/scifact", "test")  # doctest: +SKIP
        >>> qrels["1"]  # doctest: +SKIP
        {'31715818': 1}
    """
    keep = set(read_beir_queries(folder) if queries is None else queries)
    path = Path(folder) / "qrels" / f"{split}.tsv"
    qrels: dict[str, dict[str, int]] = {}
    header_seen = False
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        fields = tuple(field.strip() for field in line.rstrip("\r\n").split("\t"))
        if not header_seen:
            if fields != _QRELS_HEADER:
                raise BeirFormatError(
                    f"{where}: expected the header {' '.join(_QRELS_HEADER)!r} (tab-separated)"
                )
            header_seen = True
            continue
        if len(fields) != 3 or not fields[0] or not fields[1]:
            raise BeirFormatError(
                f"{where}: expected query-id, corpus-id and score separated by tabs"
            )
        query_id, document_id, text = fields
        try:
            score = int(text)
        except ValueError:
            raise BeirFormatError(f"{where}: score {text!r} is not an integer") from None
        judged = qrels.setdefault(query_id, {})
        if document_id in judged:
            raise BeirFormatError(
                f"{where}: query {query_id!r} and document {document_id!r} are judged twice"
            )
        judged[document_id] = score
    return {query_id: judged for query_id, judged in qrels.items() if query_id in keep}
