"""Reading PubMed XML: a crafted file in the shape efetch and the baseline use (tests/adapters/
corpora/data/pubmed-sample.xml: DOCTYPE, structured and unstructured abstracts, inline markup, a
reference list and comments with their own ids, an article without an abstract, a book, a repeat,
a deletion), gzipped, malformed and hostile variants, and a generated file for memory."""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path

import pytest

from adapters.corpora.pubmed_xml import PubMedXmlFormatError, read_pubmed_xml
from core.types import Passage

SAMPLE = Path(__file__).parent / "data" / "pubmed-sample.xml"

TITLE = "Procalcitonin to guide antibiotics in community-acquired pneumonia."
DOI = "10.1016/j.ajem.2018.01.001"  # PubmedData's; the ELocationID's differs on purpose


def _article(pmid: int, abstract: str) -> str:
    return (
        f"<PubmedArticle><MedlineCitation><PMID>{pmid}</PMID><Article><ArticleTitle>Title "
        f"{pmid}</ArticleTitle><Abstract><AbstractText>{abstract}</AbstractText></Abstract>"
        "<AuthorList>"
        + "".join(
            f"<Author><LastName>Author{i}</LastName><Affiliation>Department of Medicine, "
            f"University Hospital {i}</Affiliation></Author>"
            for i in range(10)
        )
        + "</AuthorList></Article><MeshHeadingList>"
        + "".join(
            f"<MeshHeading><DescriptorName UI='D{i:06d}'>Heading {i}</DescriptorName></MeshHeading>"
            for i in range(15)
        )
        + "</MeshHeadingList></MedlineCitation></PubmedArticle>\n"
    )


def test_sections_become_passages_with_title_year_doi_and_inline_text() -> None:
    corpus = read_pubmed_xml(SAMPLE)

    assert corpus.passages == (
        Passage(
            passage_id="30000001:0",
            pmid="30000001",
            text="Lower respiratory tract infections are a common reason for antibiotic "
            "prescription.",
            section="BACKGROUND",
            year="2018",
            title=TITLE,
            doi=DOI,
        ),
        Passage(
            passage_id="30000001:1",
            pmid="30000001",
            text="Serum procalcitonin above 0.25 ng/mL-1 and CO2 were recorded in n = 120 adults.",
            section="METHODS",
            year="2018",
            title=TITLE,
            doi=DOI,
        ),
        # Section 2 (RESULTS) is empty: no passage, and the next keeps its index.
        Passage(
            passage_id="30000001:3",
            pmid="30000001",
            text="Procalcitonin guidance reduced antibiotic exposure.",
            section="CONCLUSIONS",
            year="2018",
            title=TITLE,
            doi=DOI,
        ),
        # MedlineDate "1998 Dec-1999 Jan"; the DOI from ELocationID; no Label.
        Passage(
            passage_id="9800002:0",
            pmid="9800002",
            text="An unstructured abstract: consolidation was seen in 12% of radiographs.",
            section=None,
            year="1998",
            title="Chest radiograph findings in adults with fever.",
            doi="10.1000/chest.1998.2",
        ),
    )


def test_articles_that_give_no_passage_are_listed_with_the_reason() -> None:
    assert read_pubmed_xml(SAMPLE).skipped == (
        ("12345", "no abstract"),
        ("20301295", "a book (PubmedBookArticle), not read"),
        ("9800002", "repeats an earlier article of the file"),
    )


def test_a_gzipped_file_reads_the_same(tmp_path: Path) -> None:
    packed = tmp_path / "pubmed24n0001.xml.gz"
    packed.write_bytes(gzip.compress(SAMPLE.read_bytes()))
    assert read_pubmed_xml(packed) == read_pubmed_xml(SAMPLE)


def test_a_truncated_gzip_file_is_refused(tmp_path: Path) -> None:
    packed = tmp_path / "cut.xml.gz"
    packed.write_bytes(gzip.compress(SAMPLE.read_bytes())[:400])
    with pytest.raises(PubMedXmlFormatError, match=r"cut\.xml\.gz: not a complete gzip file"):
        read_pubmed_xml(packed)


def test_a_plain_file_named_gz_is_refused(tmp_path: Path) -> None:
    named = tmp_path / "plain.xml.gz"
    named.write_bytes(SAMPLE.read_bytes())
    with pytest.raises(PubMedXmlFormatError, match="not a complete gzip file"):
        read_pubmed_xml(named)


def test_malformed_xml_is_refused_with_its_line_and_column(tmp_path: Path) -> None:
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    assert lines[57].endswith("</ArticleTitle>")
    lines[57] = lines[57].replace("</ArticleTitle>", "</Title>")
    broken = tmp_path / "broken.xml"
    broken.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(PubMedXmlFormatError) as raised:
        read_pubmed_xml(broken)
    assert str(raised.value).startswith(f"{broken}: not well-formed XML at line 58, column ")


def test_entity_declarations_are_refused(tmp_path: Path) -> None:
    hostile = tmp_path / "entities.xml"
    hostile.write_text(
        '<?xml version="1.0"?><!DOCTYPE PubmedArticleSet [<!ENTITY a "aaaaaaaaaa">'
        '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><PubmedArticleSet><PubmedArticle>'
        "<MedlineCitation><PMID>1</PMID><Article><Abstract><AbstractText>&b;</AbstractText>"
        "</Abstract></Article></MedlineCitation></PubmedArticle></PubmedArticleSet>",
        encoding="utf-8",
    )
    with pytest.raises(PubMedXmlFormatError, match=r"entities\.xml: refused: EntitiesForbidden"):
        read_pubmed_xml(hostile)


def test_another_xml_document_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "esearch.xml"
    other.write_text("<eSearchResult><Count>0</Count></eSearchResult>", encoding="utf-8")
    with pytest.raises(PubMedXmlFormatError, match="root element is <eSearchResult>"):
        read_pubmed_xml(other)


def test_an_article_without_a_pmid_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "missing.xml"
    missing.write_text(
        "<PubmedArticleSet>"
        + _article(1, "First.")
        + _article(2, "Second.").replace("<PMID>2</PMID>", "")
        + "</PubmedArticleSet>",
        encoding="utf-8",
    )
    with pytest.raises(PubMedXmlFormatError, match="article 2 has no numeric MedlineCitation/PMID"):
        read_pubmed_xml(missing)


def test_memory_holds_the_passages_not_the_tree(tmp_path: Path) -> None:
    # Each article's authors and MeSH headings make up most of its bytes and are never kept;
    # a reader that kept the parsed tree would peak at several times the file's size.
    big = tmp_path / "big.xml"
    big.write_text(
        "<PubmedArticleSet>\n"
        + "".join(_article(i, f"Abstract {i}: " + "word " * 40) for i in range(1, 401))
        + "</PubmedArticleSet>\n",
        encoding="utf-8",
    )
    tracemalloc.start()
    try:
        corpus = read_pubmed_xml(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [p.pmid for p in corpus.passages] == [str(i) for i in range(1, 401)]
    assert peak < big.stat().st_size / 2, (peak, big.stat().st_size)
