"""Reading PubMedQA abstracts as passages, on the real file and on small crafted ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapters.corpora.pubmedqa import (
    PubMedQAFormatError,
    read_pubmedqa,
    read_pubmedqa_questions,
)


@pytest.fixture(scope="module")
def pubmedqa(shared_data: Path) -> Path:
    path = shared_data / "literature" / "pubmedqa" / "test_set.json"
    if not path.is_file():
        pytest.skip(f"PubMedQA test set not found at {path}")
    return path


def _record(contexts: list[str], labels: list[str], year: Any = "2004") -> dict[str, Any]:
    return {
        "QUESTION": "Is it  so?",
        "CONTEXTS": contexts,
        "LABELS": labels,
        "MESHES": ["Humans"],
        "YEAR": year,
        "final_decision": "yes",
        "LONG_ANSWER": "It is.",
    }


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "pubmedqa.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_real_file_gives_one_passage_per_non_empty_section(pubmedqa: Path) -> None:
    raw = json.loads(pubmedqa.read_text(encoding="utf-8"))
    passages = read_pubmedqa(pubmedqa)

    expected = sum(1 for r in raw.values() for c in r["CONTEXTS"] if c.strip())
    assert len(passages) == expected
    assert len({p.passage_id for p in passages}) == len(passages)
    assert {p.pmid for p in passages} == set(raw)
    for passage in passages:
        assert isinstance(passage.pmid, str)
        pmid, index = passage.passage_id.split(":")
        assert pmid == passage.pmid
        record = raw[pmid]
        assert passage.text == " ".join(record["CONTEXTS"][int(index)].split())
        assert passage.section == record["LABELS"][int(index)]
        assert passage.year == record["YEAR"]
        assert passage.title is None


def test_real_file_questions_keep_their_pmids(pubmedqa: Path) -> None:
    raw = json.loads(pubmedqa.read_text(encoding="utf-8"))
    questions = read_pubmedqa_questions(pubmedqa)
    assert [pmid for pmid, _ in questions] == list(raw)
    assert all(q == " ".join(raw[pmid]["QUESTION"].split()) for pmid, q in questions)


def test_sections_are_normalised_and_empty_ones_skipped(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "111": _record(["First\n  part.", "   ", "Third\tpart. "], ["AIMS", "METHODS", ""]),
            "222": _record(["Only part."], ["RESULTS"], year=None),
            "333": _record(["Numeric year."], ["RESULTS"], year=1999),
        },
    )
    passages = read_pubmedqa(path)
    assert [(p.passage_id, p.pmid, p.text, p.section, p.year) for p in passages] == [
        ("111:0", "111", "First part.", "AIMS", "2004"),
        ("111:2", "111", "Third part.", None, "2004"),
        ("222:0", "222", "Only part.", "RESULTS", None),
        ("333:0", "333", "Numeric year.", "RESULTS", "1999"),
    ]
    assert all(p.title is None for p in passages)
    assert read_pubmedqa_questions(path)[0] == ("111", "Is it so?")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([_record(["x"], ["A"])], "JSON object of PMID"),
        ({"abc": _record(["x"], ["A"])}, "not a PMID"),
        ({"1": "text"}, "expected an object"),
        ({"1": {k: v for k, v in _record(["x"], ["A"]).items() if k != "CONTEXTS"}}, "CONTEXTS"),
        ({"1": _record(["x", "y"], ["A"])}, "2 CONTEXTS but 1 LABELS"),
        ({"1": _record(["x"], [3])}, "LABELS"),
        ({"1": _record(["x"], ["A"], year=["2001"])}, "YEAR"),
        ({"1": _record(["x"], ["A"]) | {"QUESTION": None}}, "QUESTION"),
    ],
)
def test_files_not_shaped_like_pubmedqa_are_refused(
    tmp_path: Path, data: Any, message: str
) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(PubMedQAFormatError, match=message):
        read_pubmedqa(path)


def test_a_file_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(PubMedQAFormatError, match="not JSON"):
        read_pubmedqa(path)
