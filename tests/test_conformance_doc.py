"""docs/conformance.md stays true: it maps every service-side requirement of CDS Hooks 2.0 to
how the service meets it, and every test it cites exists."""

from __future__ import annotations

import csv
import re

import pytest

from tests.conftest import REPO

DOC = REPO / "docs" / "conformance.md"
ROW = re.compile(r"^\|\s*(\d+)\s*\|(.*)\|\s*$")
CITED = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def doc_rows():
    rows = {}
    for line in DOC.read_text().splitlines():
        match = ROW.match(line)
        if match:
            rows[int(match.group(1))] = match.group(2)
    return rows


def test_every_service_requirement_is_listed_once(shared_data):
    with (shared_data / "specs" / "cds-hooks-2.0-requirements.csv").open() as f:
        service = {int(r["id"]) for r in csv.DictReader(f) if "Service" in r["actors"]}
    listed = [int(m.group(1)) for line in DOC.read_text().splitlines() if (m := ROW.match(line))]
    assert sorted(listed) == sorted(set(listed)), "a requirement is listed twice"
    assert set(listed) == service


def test_every_cited_test_exists():
    cited = [m.groups() for text in doc_rows().values() for m in CITED.finditer(text)]
    assert cited, "the document cites no test"
    for path, name in cited:
        source = (REPO / path).read_text()
        assert re.search(rf"^(async )?def {name}\(", source, re.M), f"{path}::{name} not found"


@pytest.mark.parametrize("level", ["SHALL", "SHALL NOT"])
def test_every_shall_is_met_by_a_test_or_says_why_not(level):
    for number, text in doc_rows().items():
        cells = [c.strip() for c in text.split("|")]
        if cells[0] == level:
            evidence = cells[-1]
            assert CITED.search(evidence) or evidence.startswith("n/a"), (number, evidence)
