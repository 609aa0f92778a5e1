"""Reading BEIR datasets: a small crafted dataset in the published layout (tests/adapters/corpora/
data/beir-mini), and malformed copies that must fail naming the file and the line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from adapters.corpora.beir import (
    BeirFormatError,
    read_beir_corpus,
    read_beir_qrels,
    read_beir_queries,
)
from core.types import Passage

MINI = Path(__file__).parent / "data" / "beir-mini"


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A writable copy of the mini dataset."""
    return shutil.copytree(MINI, tmp_path / "beir-mini")


def test_corpus_gives_a_passage_per_document_with_text_and_lists_the_empty_one() -> None:
    corpus = read_beir_corpus(MINI)

    assert corpus.passages == (
        Passage(
            passage_id="MED-10",
            pmid="MED-10",
            text="Recent studies have suggested that statins, an established drug group in the "
            "prevention of cardiovascular mortality, could delay or prevent breast cancer "
            "recurrence.",
            title="Statin use and breast cancer survival",
        ),
        Passage(
            passage_id="MED-14",
            pmid="MED-14",
            text="Low-density lipoprotein cholesterol is a risk factor for coronary heart disease.",
            year="2012",
            doi="10.1016/j.example.2012.01.001",
        ),
        Passage(
            passage_id="4025",
            pmid="4025",
            text="A numeric id is read as its decimal text.",
            year="1999",
            doi="10.1093/example/99",
        ),
    )
    assert corpus.skipped == (("MED-118", "empty text"),)


def test_queries_by_id_in_file_order() -> None:
    assert read_beir_queries(MINI) == {
        "PLAIN-3": "Breast Cancer Cells Feed on Cholesterol",
        "PLAIN-4": "Statin Drugs and Cancer",
        "PLAIN-5": "Cholesterol and Heart Disease",
    }


def test_qrels_of_a_split_keep_only_queries_that_exist() -> None:
    # PLAIN-99 is judged in test.tsv but is not in queries.jsonl.
    assert read_beir_qrels(MINI) == {
        "PLAIN-3": {"MED-10": 2, "MED-14": 1},
        "PLAIN-4": {"MED-10": 1, "4025": 0},
    }
    assert read_beir_qrels(MINI, "dev") == {"PLAIN-5": {"MED-14": 1}}
    assert read_beir_qrels(MINI, queries={"PLAIN-4", "PLAIN-99"}) == {
        "PLAIN-4": {"MED-10": 1, "4025": 0},
        "PLAIN-99": {"MED-14": 1},
    }


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ('["_id", "text"]', "expected an object, got list"),
        ('{"title": "t", "text": "x"}', "_id must be a non-empty string"),
        ('{"_id": " ", "text": "x"}', "_id must be a non-empty string"),
        ('{"_id": "d9", "title": "t"}', "text must be a string"),
        ('{"_id": "d9", "text": 3}', "text must be a string"),
        ('{"_id": "d9", "text": "x", "title": ["t"]}', "title must be a string"),
        ('{"_id": "d9", "text": "x", "metadata": "m"}', "metadata must be an object"),
        ('{"_id": "d9", "text": "x", "metadata": {"doi": 1.5}}', "metadata.doi must be a string"),
        ('{"_id": "MED-10", "text": "again"}', "_id 'MED-10' was already given on line 1"),
    ],
)
def test_a_bad_corpus_line_is_refused_naming_file_and_line(
    dataset: Path, line: str, message: str
) -> None:
    corpus = dataset / "corpus.jsonl"
    corpus.write_text(corpus.read_text(encoding="utf-8") + line + "\n", encoding="utf-8")
    with pytest.raises(BeirFormatError) as raised:
        read_beir_corpus(dataset)
    assert str(raised.value).startswith(f"{corpus}, line 6: ")
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"_id": "PLAIN-6"}', "text must be a string"),
        ('{"_id": "PLAIN-6", "text": "  "}', "query 'PLAIN-6' has an empty text"),
        ('{"_id": "PLAIN-3", "text": "again"}', "_id 'PLAIN-3' was already given on line 1"),
    ],
)
def test_a_bad_query_line_is_refused_naming_file_and_line(
    dataset: Path, line: str, message: str
) -> None:
    queries = dataset / "queries.jsonl"
    queries.write_text(queries.read_text(encoding="utf-8") + line + "\n", encoding="utf-8")
    with pytest.raises(BeirFormatError, match=re.escape(f"queries.jsonl, line 5: {message}")):
        read_beir_queries(dataset)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("PLAIN-3\tMED-10\t1\n", "line 1: expected the header 'query-id corpus-id score'"),
        ("query-id corpus-id score\n", "line 1: expected the header"),
        ("query-id\tcorpus-id\tscore\n\nPLAIN-3\tMED-10\n", "line 3: expected query-id, corpus"),
        ("query-id\tcorpus-id\tscore\nPLAIN-3\tMED-10\t0.5\n", "line 2: score '0.5' is not an"),
        (
            "query-id\tcorpus-id\tscore\nPLAIN-3\tMED-10\t1\nPLAIN-3\tMED-10\t2\n",
            "line 3: query 'PLAIN-3' and document 'MED-10' are judged twice",
        ),
    ],
)
def test_a_bad_qrels_line_is_refused_naming_file_and_line(
    dataset: Path, content: str, message: str
) -> None:
    (dataset / "qrels" / "test.tsv").write_text(content, encoding="utf-8")
    with pytest.raises(BeirFormatError) as raised:
        read_beir_qrels(dataset)
    assert str(raised.value).startswith(f"{dataset / 'qrels' / 'test.tsv'}, line ")
    assert message in str(raised.value)


def test_a_line_that_is_not_utf8_is_refused_naming_it(dataset: Path) -> None:
    corpus = dataset / "corpus.jsonl"
    corpus.write_bytes(corpus.read_bytes() + b'{"_id": "d9", "text": "fi\xe8vre"}\n')
    with pytest.raises(BeirFormatError, match=r"corpus\.jsonl, line 6: not UTF-8 text"):
        read_beir_corpus(dataset)


def test_windows_line_ends_a_byte_order_mark_and_utf8_text_read_the_same(dataset: Path) -> None:
    corpus = dataset / "corpus.jsonl"
    lines = corpus.read_text(encoding="utf-8").splitlines()
    lines.append(json.dumps({"_id": "MED-9", "text": "Ibuprofène réduit la fièvre."}))
    corpus.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8"))
    qrels = dataset / "qrels" / "test.tsv"
    qrels.write_bytes(qrels.read_bytes().replace(b"\n", b"\r\n"))

    passages = read_beir_corpus(dataset).passages
    assert passages[:3] == read_beir_corpus(MINI).passages
    assert passages[3].text == "Ibuprofène réduit la fièvre."
    assert read_beir_qrels(dataset) == read_beir_qrels(MINI)


def test_a_folder_without_the_files_says_which_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"corpus\.jsonl"):
        read_beir_corpus(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"queries\.jsonl"):
        read_beir_qrels(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train\.tsv"):
        read_beir_qrels(MINI, "train")
