"""PubMed XML (E-utilities ``efetch`` answers, annual baseline and daily update files) as passages.

PubMed distributes its citations as ``PubmedArticleSet`` XML: ``efetch.fcgi?db=pubmed&
retmode=xml`` answers with it, and the baseline is about 1,200 gzipped files of 30,000 articles
(about 100 MB of XML each). Each abstract section (``AbstractText``, labelled ``BACKGROUND``,
``METHODS``, ... in structured abstracts) becomes one :class:`core.types.Passage` with the id
``<pmid>:<section index>``, as :mod:`adapters.corpora.pubmedqa` gives its sections, so that a
passage is cited by PMID and section whichever corpus it came from.

A file is parsed incrementally with defusedxml (a file from elsewhere cannot expand entities or
fetch external ones), and each article is dropped from the tree once read, so a baseline file
is never held in memory as a tree: only its passages are kept.

What is read, and from where (paths under ``PubmedArticle``):

* PMID: ``MedlineCitation/PMID`` (not the PMIDs of comments and corrections).
* title: ``MedlineCitation/Article/ArticleTitle``.
* sections: ``MedlineCitation/Article/Abstract/AbstractText``, their ``Label`` as the section;
  inline markup (``<i>``, ``<sup>``, MathML) keeps its text. ``OtherAbstract`` (translations,
  publisher abstracts) is not read.
* year: ``Article/Journal/JournalIssue/PubDate/Year``, else the first year in its
  ``MedlineDate`` (``1998 Dec-1999 Jan``).
* DOI: ``PubmedData/ArticleIdList/ArticleId[@IdType="doi"]``, else the article's
  ``ELocationID[@EIdType="doi"]`` (never the DOIs of its reference list).

Articles without an abstract, book articles (``PubmedBookArticle``) and an article repeated in
the same file are skipped with the reason; ``DeleteCitation`` entries of update files are not
applied (the index keeps what it has).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import iterparse

from core.types import Passage

__all__ = ["PubMedCorpus", "PubMedXmlFormatError", "read_pubmed_xml"]

_ROOT = "PubmedArticleSet"
_YEAR = re.compile(r"\d{4}")


class PubMedXmlFormatError(ValueError):
    """The file is not well-formed PubMed XML; the message names the file and where."""


@dataclass(frozen=True, slots=True)
class PubMedCorpus:
    """The passages of a PubMed XML file, and the articles that gave none.

    Args:
        passages: one per non-empty abstract section, in file order, then section order.
        skipped: ``(PMID, reason)`` for each article left out.
    """

    passages: tuple[Passage, ...]
    skipped: tuple[tuple[str, str], ...] = ()


def _text(element: Element | None) -> str:
    """The element's text with its inline markup's, runs of whitespace collapsed."""
    return "" if element is None else " ".join("".join(element.itertext()).split())


def _year(article: Element) -> str | None:
    date = article.find("Journal/JournalIssue/PubDate")
    if date is None:
        return None
    year = _text(date.find("Year"))
    if year:
        return year
    found = _YEAR.search(_text(date.find("MedlineDate")))
    return found.group() if found else None


def _doi(entry: Element, article: Element) -> str | None:
    for element in (
        entry.find("PubmedData/ArticleIdList/ArticleId[@IdType='doi']"),
        article.find("ELocationID[@EIdType='doi']"),
    ):
        doi = _text(element)
        if doi:
            return doi
    return None


def _passages(entry: Element, pmid: str) -> list[Passage]:
    """The article's passages (empty when it has no abstract text)."""
    article = entry.find("MedlineCitation/Article")
    if article is None:
        return []
    title = _text(article.find("ArticleTitle")) or None
    year, doi = _year(article), _doi(entry, article)
    passages = []
    for i, section in enumerate(article.findall("Abstract/AbstractText")):
        text = _text(section)
        if not text:
            continue
        passages.append(
            Passage(
                passage_id=f"{pmid}:{i}",
                pmid=pmid,
                text=text,
                section=(section.get("Label") or "").strip() or None,
                year=year,
                title=title,
                doi=doi,
            )
        )
    return passages


@contextmanager
def _opened(path: Path) -> Iterator[io.BufferedIOBase]:
    """The file's bytes, decompressed when its name ends in ``.gz``."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as stream:
        yield stream


def _entries(path: Path, stream: io.BufferedIOBase) -> Iterator[tuple[int, Element]]:
    """Each child of the root with its 1-based position, complete, then dropped from the tree
    so that memory stays flat over a large file."""
    root: Element | None = None
    depth = 0
    position = 0
    for event, element in iterparse(stream, events=("start", "end")):
        if event == "start":
            if root is None:
                if element.tag != _ROOT:
                    raise PubMedXmlFormatError(
                        f"{path}: not PubMed XML (the root element is <{element.tag}>, "
                        f"expected <{_ROOT}>)"
                    )
                root = element
            depth += 1
            continue
        depth -= 1
        if depth == 1 and root is not None:
            position += 1
            yield position, element
            root.clear()


def read_pubmed_xml(path: str | os.PathLike[str]) -> PubMedCorpus:
    """Read a PubMed XML file (``.xml``, or gzipped ``.xml.gz``) as passages.

    Args:
        path: a ``PubmedArticleSet`` file (an ``efetch`` answer, a baseline or update file).

    Returns:
        The passages: ``passage_id`` is ``"<pmid>:<i>"`` with ``i`` the section's index among
        the article's ``AbstractText`` elements (kept when an empty section before it is
        left out), ``section`` its ``Label`` (``None`` when unlabelled), and ``title``,
        ``year`` and ``doi`` the article's (see the module docstring); texts have runs of
        whitespace collapsed. And the articles skipped, with why.

    Raises:
        PubMedXmlFormatError: the file is not well-formed XML (the message gives the line and
            column), not compressed as its name says, declares entities (refused: see the
            module docstring), is not a ``PubmedArticleSet``, or has an article without a
            numeric PMID.
        OSError: the file cannot be read.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "efetch.xml"
        >>> _ = path.write_text(
        ...     "<PubmedArticleSet><PubmedArticle><MedlineCitation><PMID>1</PMID><Article>"
        ...     "<ArticleTitle>T</ArticleTitle><Abstract><AbstractText Label='AIMS'>"
        ...     "Test <i>in vivo</i>.</AbstractText></Abstract></Article></MedlineCitation>"
        ...     "</PubmedArticle></PubmedArticleSet>")
        >>> read_pubmed_xml(path).passages[0]
        Passage(passage_id='1:0', pmid='1', text='Test in vivo.', section='AIMS', year=None, title='T', doi=None)
        >>> import shutil; shutil.rmtree(path.parent)
    """  # noqa: E501
    source = Path(path)
    passages: list[Passage] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    try:
        with _opened(source) as stream:
            for position, entry in _entries(source, stream):
                if entry.tag == "PubmedBookArticle":
                    pmid = _text(entry.find("BookDocument/PMID")) or f"article {position}"
                    skipped.append((pmid, "a book (PubmedBookArticle), not read"))
                    continue
                if entry.tag != "PubmedArticle":
                    continue  # DeleteCitation and DeleteDocument: not applied (see above)
                pmid = _text(entry.find("MedlineCitation/PMID"))
                if not pmid.isdigit():
                    raise PubMedXmlFormatError(
                        f"{source}: article {position} has no numeric MedlineCitation/PMID"
                    )
                if pmid in seen:
                    skipped.append((pmid, "repeats an earlier article of the file"))
                    continue
                seen.add(pmid)
                found = _passages(entry, pmid)
                if not found:
                    skipped.append((pmid, "no abstract"))
                passages.extend(found)
    except ParseError as error:
        line, column = error.position
        raise PubMedXmlFormatError(
            f"{source}: not well-formed XML at line {line}, column {column + 1}"
        ) from error
    except DefusedXmlException as error:
        raise PubMedXmlFormatError(f"{source}: refused: {error}") from error
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise PubMedXmlFormatError(f"{source}: not a complete gzip file ({error})") from error
    return PubMedCorpus(passages=tuple(passages), skipped=tuple(skipped))
