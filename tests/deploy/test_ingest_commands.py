"""``medirag ingest cases|literature`` through the command, on the real embedded PostgreSQL and
real ONNX sessions (the tiny BiomedCLIP and MiniLM exports of the session).

The cases are five of the synthetic fixture cases (Synthea patients paired with NIH radiographs,
:mod:`fixtures.synthetic_cases`), found the way an EHR's are: their ImagingStudy and radiology
report in a bundle beside the 40 Synthea bundles. Two have their DICOM file, one a truncated
copy, one none, and the fifth's report is not final, so each way a case is left out shows in the
summary. The literature is the crafted BEIR and PubMed XML files of the corpus reader tests.
"""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
import pydicom
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from dicomweb_client import DICOMwebClient
from jwt.algorithms import ECAlgorithm
from psycopg import sql
from typer.testing import CliRunner, Result

from adapters.fhir.bundle_folder import folder_resources
from adapters.imaging.stow import store_datasets
from deploy.ingest_commands import ingest_app
from fixtures.imaging_records import IMAGING_BUNDLE_FILE, fixture_study_dates, imaging_bundle
from fixtures.synthetic_cases import SyntheticCase, synthetic_cases
from tests.peers.medplum import Medplum, MedplumMissing, running_medplum
from tests.peers.orthanc import OrthancMissing, running_orthanc

pytestmark = pytest.mark.slow

CORPORA = Path(__file__).parents[1] / "adapters" / "corpora" / "data"
DECODE_FAILED = "series 1 (DX), instance 1: pixel data could not be decoded (ValueError)"


@pytest.fixture(scope="module")
def env(
    database: str,
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    minilm_dir: Path,
    tiny_dir: Path,
) -> dict[str, str]:
    return {
        "MEDIRAG_DSN": database,
        "MEDIRAG_DATA_DIR": str(tmp_path_factory.mktemp("medirag-data")),
        "MEDIRAG_MODELS_DIR": str(models_dir),
        "MEDIRAG_TEXT_MODEL": minilm_dir.name,
        "MEDIRAG_IMAGE_MODEL": tiny_dir.name,
        "MEDIRAG_DICOMWEB_URL": "",
    }


@pytest.fixture(scope="module")
def fixture_cases(
    shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, tuple[SyntheticCase, ...]]:
    out = tmp_path_factory.mktemp("fixture-cases")
    return out, synthetic_cases(shared_data / "synthea", shared_data / "cxr" / "nih1000", out)


@pytest.fixture(scope="module")
def sources(
    fixture_cases: tuple[Path, tuple[SyntheticCase, ...]],
    shared_data: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """A bundle folder with five cases' imaging records, and a DICOM folder in which the first
    two are intact, the third truncated and the fourth missing (the fifth is not final)."""
    out, cases = fixture_cases
    chosen = cases[:5]
    root = tmp_path_factory.mktemp("sources")
    bundles = root / "bundles"
    bundles.mkdir()
    for path in sorted((shared_data / "synthea").glob("*.json")):
        (bundles / path.name).symlink_to(path)
    bundle = imaging_bundle(chosen, fixture_study_dates(out, chosen))
    (last_report,) = [
        e["resource"]
        for e in bundle["entry"][-2:]
        if e["resource"]["resourceType"] == "DiagnosticReport"
    ]
    last_report["status"] = "preliminary"
    (bundles / IMAGING_BUNDLE_FILE).write_text(json.dumps(bundle), encoding="utf-8")
    dicom = root / "dicom"
    for case in chosen[:2]:
        target = dicom / case.dicom_file
        target.parent.mkdir(parents=True)
        shutil.copyfile(out / case.dicom_file, target)
    truncated = dicom / chosen[2].dicom_file
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes((out / chosen[2].dicom_file).read_bytes()[:-1000])
    return {
        "bundles": bundles,
        "dicom": dicom,
        "indexed": sorted(c.source.record.case_id for c in chosen[:2]),
        "truncated": chosen[2].source.record.case_id,
        "missing": chosen[3].source.record.case_id,
        "preliminary": f"DiagnosticReport/{last_report['id']}",
    }


def invoke(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(ingest_app, list(args), env=env)


def rows(env: dict[str, str], query: str) -> list[tuple[Any, ...]]:
    """What the index database holds, read with SQL rather than through the store."""
    with psycopg.connect(env["MEDIRAG_DSN"]) as conn:
        return conn.execute(query).fetchall()


def case_ids(env: dict[str, str]) -> list[str]:
    return sorted(case_id for (case_id,) in rows(env, "SELECT case_id FROM cases"))


@pytest.fixture(scope="module")
def first_cases(env: dict[str, str], sources: dict[str, Any]) -> Result:
    return invoke(
        env,
        "cases",
        "--bundles",
        str(sources["bundles"]),
        "--dicom",
        str(sources["dicom"]),
        "--json",
    )


def test_cases_are_indexed_and_each_left_out_case_says_why(
    first_cases: Result, sources: dict[str, Any], env: dict[str, str]
) -> None:
    assert first_cases.exit_code == 0, first_cases.output
    summary = json.loads(first_cases.stdout)
    assert (summary["what"], summary["indexed"], summary["already_indexed"]) == ("cases", 2, 0)
    assert summary["skipped"] == 3
    reasons = {r["reason"]: (r["count"], r["examples"]) for r in summary["skipped_reasons"]}
    assert reasons == {
        DECODE_FAILED: (1, [sources["truncated"]]),
        "no such study for this patient": (1, [sources["missing"]]),
        "not final (status preliminary)": (1, [sources["preliminary"]]),
    }
    assert case_ids(env) == sources["indexed"]


def test_a_second_run_indexes_nothing_and_says_so(
    first_cases: Result, sources: dict[str, Any], env: dict[str, str]
) -> None:
    assert first_cases.exit_code == 0, first_cases.output
    again = invoke(
        env, "cases", "--bundles", str(sources["bundles"]), "--dicom", str(sources["dicom"])
    )
    assert again.exit_code == 0, again.output
    lines = again.stdout.splitlines()
    assert lines[0] == "cases: 0 indexed, 2 already indexed, 3 skipped"
    assert f"  1 skipped: no such study for this patient (e.g. {sources['missing']})" in lines
    assert case_ids(env) == sources["indexed"]


@pytest.fixture(scope="module")
def new_database(database_server: Any) -> Iterator[Callable[[], str]]:
    """Makes fresh databases on the server of :func:`database` (dropped after the module), for
    other sources of the same cases."""
    names: list[str] = []

    def make() -> str:
        names.append(f"ingest_{uuid.uuid4().hex[:8]}")
        with psycopg.connect(database_server.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(names[-1])))
        return str(database_server.dsn_for(names[-1]))

    yield make
    with psycopg.connect(database_server.dsn, autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


CASE_ROWS = "SELECT case_id, patient_ref, study_uid, labs::text, labs_measured FROM cases"


def test_a_bulk_export_gives_the_same_cases_and_labs(
    first_cases: Result,
    sources: dict[str, Any],
    env: dict[str, str],
    new_database: Callable[[], str],
    tmp_path: Path,
) -> None:
    assert first_cases.exit_code == 0, first_cases.output
    export = tmp_path / "export"
    export.mkdir()
    by_type: dict[str, list[str]] = {}
    for resource in folder_resources(
        sources["bundles"], {"Patient", "Observation", "ImagingStudy", "DiagnosticReport"}
    ):
        by_type.setdefault(resource["resourceType"], []).append(json.dumps(resource))
    for kind, lines in by_type.items():
        (export / f"{kind}.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")
    other = {**env, "MEDIRAG_DSN": new_database()}

    result = invoke(
        other, "cases", "--ndjson", str(export), "--dicom", str(sources["dicom"]), "--json"
    )

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["indexed"], summary["skipped"]) == (2, 3)
    from_bundles = sorted(rows(env, CASE_ROWS))
    assert sorted(rows(other, CASE_ROWS)) == from_bundles
    assert all(labs_measured > 0 for *_, labs_measured in from_bundles)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bundles", "/no/such/folder", "--dicom", "."], "--bundles: /no/such/folder is not a"),
        (["--ndjson", "/no/such/folder", "--dicom", "."], "--ndjson: /no/such/folder is not a"),
        (["--bundles", ".", "--dicom", "/no/such/dicom"], "--dicom: /no/such/dicom is not a fo"),
        (["--dicom", "."], "give exactly one of --bundles, --fhir-url, --ndjson"),
        (
            ["--bundles", ".", "--ndjson", ".", "--dicom", "."],
            "give exactly one of --bundles, --fhir-url, --ndjson (got --bundles, --ndjson)",
        ),
        (["--bundles", "."], "give exactly one of --dicom, --dicomweb"),
        (["--fhir-url", "ehr.example/fhir", "--dicom", "."], "--fhir-url: 'ehr.example/fhir' is"),
        (["--fhir-url", "http://[::1", "--dicom", "."], "--fhir-url: 'http://[::1' is not a URL"),
        (["--bundles", ".", "--dicomweb", "ftp://pacs"], "--dicomweb: 'ftp://pacs' is not an h"),
        (
            ["--bundles", ".", "--dicom", ".", "--smart-client-id", "c"],
            "--smart-client-id is for --fhir-url",
        ),
        (
            ["--fhir-url", "http://x", "--dicom", ".", "--smart-client-id", "c"],
            "--smart-client-id needs --smart-key",
        ),
        (
            [
                "--fhir-url",
                "http://x",
                "--dicom",
                ".",
                "--smart-client-id",
                "c",
                "--smart-key",
                ".",
            ],
            "--smart-key: . is not a file",
        ),
        (
            ["--fhir-url", "http://x", "--dicom", ".", "--smart-key", "k.pem"],
            "--smart-key and --smart-key-id need --smart-client-id",
        ),
    ],
)
def test_wrong_arguments_exit_2_with_one_line(
    env: dict[str, str], args: list[str], message: str
) -> None:
    result = invoke(env, "cases", *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: {message}")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_an_unreachable_fhir_server_exits_2_before_loading_anything(
    env: dict[str, str], sources: dict[str, Any]
) -> None:
    url = f"http://127.0.0.1:{free_port()}/fhir"
    result = invoke(env, "cases", "--fhir-url", url, "--dicom", str(sources["dicom"]))
    assert result.exit_code == 2
    assert result.stderr.startswith("error: FHIR server unavailable: ")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as opened:
        yield opened


@pytest.fixture(scope="module")
def smart_fhir(
    sources: dict[str, Any], shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Medplum, Path]]:
    """The FHIR engine loaded with the Synthea bundles and the five cases' imaging records, and
    a private key (a JWK file with its kid) of the SMART client it registers."""
    root = tmp_path_factory.mktemp("smart")
    key = ec.generate_private_key(ec.SECP384R1())
    public = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    clients = root / "clients.json"
    client = {"client_id": "medirag-ingest", "jwks": {"keys": [{**public, "kid": "k1"}]}}
    clients.write_text(json.dumps({"clients": [client]}), encoding="utf-8")
    key_file = root / "key.jwk"
    key_file.write_text(
        json.dumps({**json.loads(ECAlgorithm.to_jwk(key)), "kid": "k1"}), encoding="utf-8"
    )
    try:
        with running_medplum(
            shared_data / "synthea",
            bundles=[sources["bundles"] / IMAGING_BUNDLE_FILE],
            clients_file=clients,
        ) as medplum:
            yield medplum, key_file
    except MedplumMissing as missing:
        pytest.skip(str(missing))


def test_a_fhir_server_with_smart_and_a_dicomweb_pacs_give_the_same_cases(
    stack: ExitStack,
    first_cases: Result,
    smart_fhir: tuple[Medplum, Path],
    sources: dict[str, Any],
    env: dict[str, str],
    new_database: Callable[[], str],
) -> None:
    assert first_cases.exit_code == 0, first_cases.output
    medplum, key_file = smart_fhir
    try:
        pacs = stack.enter_context(running_orthanc())
    except OrthancMissing as missing:
        pytest.skip(str(missing))
    client = DICOMwebClient(pacs.dicomweb_url, session=pacs.session())
    stored = store_datasets(
        client, [pydicom.dcmread(path) for path in sorted(sources["dicom"].rglob("*.dcm"))]
    )
    assert (len(stored.stored), stored.failed) == (3, ())
    other = {
        **env,
        "MEDIRAG_DSN": new_database(),
        "MEDIRAG_DICOMWEB_USERNAME": pacs.username,
        "MEDIRAG_DICOMWEB_PASSWORD": pacs.password,
    }
    dicom = ["--dicomweb", pacs.dicomweb_url]

    refused = invoke(other, "cases", "--fhir-url", medplum.secure_base_url, *dicom)
    assert refused.exit_code == 2
    assert refused.stderr == "error: FHIR server unavailable: refused the credentials (HTTP 401)\n"

    smart = ["--smart-client-id", "medirag-ingest", "--smart-key", str(key_file)]
    result = invoke(
        other,
        "cases",
        "--fhir-url",
        medplum.secure_base_url,
        *smart,
        "--smart-algorithm",
        "ES384",
        *dicom,
        "--json",
    )

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == json.loads(first_cases.stdout)
    assert sorted(rows(other, CASE_ROWS)) == sorted(rows(env, CASE_ROWS))


# ---- literature --------------------------------------------------------------------------------

PASSAGE_ROWS = "SELECT passage_id, pmid, section, year, title, doi FROM passages"


def passages(env: dict[str, str], prefix: str) -> list[tuple[Any, ...]]:
    return sorted(r for r in rows(env, PASSAGE_ROWS) if str(r[0]).startswith(prefix))


def test_a_beir_corpus_is_indexed_once_and_the_empty_document_reported(
    env: dict[str, str],
) -> None:
    first = invoke(env, "literature", "--beir", str(CORPORA / "beir-mini"), "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout) == {
        "what": "passages",
        "indexed": 3,
        "already_indexed": 0,
        "skipped": 1,
        "skipped_reasons": [{"reason": "empty text", "count": 1, "examples": ["MED-118"]}],
    }
    assert passages(env, "MED-") == [
        ("MED-10", "MED-10", None, None, "Statin use and breast cancer survival", None),
        ("MED-14", "MED-14", None, "2012", None, "10.1016/j.example.2012.01.001"),
    ]
    again = invoke(env, "literature", "--beir", str(CORPORA / "beir-mini"))
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines() == [
        "passages: 0 indexed, 3 already indexed, 1 skipped",
        "  1 skipped: empty text (e.g. MED-118)",
    ]


def test_pubmed_xml_files_resume_after_the_part_already_indexed(
    env: dict[str, str], tmp_path: Path
) -> None:
    sample = CORPORA / "pubmed-sample.xml"
    first = invoke(env, "literature", "--pubmed-xml", str(sample), "--json")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert (summary["indexed"], summary["already_indexed"], summary["skipped"]) == (4, 0, 3)
    # As if a run over a folder had stopped after its first file: the rest is indexed, the
    # first file's passages are not embedded again.
    folder = tmp_path / "baseline"
    folder.mkdir()
    shutil.copyfile(sample, folder / "pubmed-sample.xml")
    more = "".join(
        f"<PubmedArticle><MedlineCitation><PMID>{pmid}</PMID><Article><ArticleTitle>Article "
        f"{pmid}</ArticleTitle><Abstract><AbstractText Label='RESULTS'>Finding {pmid}."
        "</AbstractText></Abstract></Article></MedlineCitation></PubmedArticle>"
        for pmid in (40000001, 40000002)
    )
    (folder / "pubmed-more.xml.gz").write_bytes(
        gzip.compress(f"<PubmedArticleSet>{more}</PubmedArticleSet>".encode())
    )
    (folder / "notes.txt").write_text("not XML: not read", encoding="utf-8")

    rest = invoke(env, "literature", "--pubmed-xml", str(folder), "--json")

    assert rest.exit_code == 0, rest.output
    summary = json.loads(rest.stdout)
    assert (summary["indexed"], summary["already_indexed"]) == (2, 4)
    assert passages(env, "4000000") == [
        ("40000001:0", "40000001", "RESULTS", None, "Article 40000001", None),
        ("40000002:0", "40000002", "RESULTS", None, "Article 40000002", None),
    ]
    assert passages(env, "30000001")[0][:4] == ("30000001:0", "30000001", "BACKGROUND", "2018")


def test_a_pubmedqa_file_is_indexed(env: dict[str, str], tmp_path: Path) -> None:
    record = {"QUESTION": "Q?", "LABELS": ["AIMS", "RESULTS"], "YEAR": "2004", "MESHES": []}
    path = tmp_path / "pubmedqa.json"
    path.write_text(
        json.dumps(
            {
                "50000001": {**record, "CONTEXTS": ["Aims of the study.", "It worked."]},
                "50000002": {**record, "CONTEXTS": ["Another aim.", ""]},
            }
        ),
        encoding="utf-8",
    )
    result = invoke(env, "literature", "--pubmedqa", str(path), "--batch-size", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["indexed"] == 3
    assert [r[:4] for r in passages(env, "5000000")] == [
        ("50000001:0", "50000001", "AIMS", "2004"),
        ("50000001:1", "50000001", "RESULTS", "2004"),
        ("50000002:0", "50000002", "AIMS", "2004"),
    ]


def test_a_malformed_corpus_exits_2_naming_the_line_and_indexes_nothing(
    env: dict[str, str], tmp_path: Path
) -> None:
    beir = shutil.copytree(CORPORA / "beir-mini", tmp_path / "beir-bad")
    corpus = beir / "corpus.jsonl"
    corpus.write_text(
        '{"_id": "BAD-1", "text": "fine"}\n{"_id": "BAD-2", "text": ', encoding="utf-8"
    )
    result = invoke(env, "literature", "--beir", str(beir))
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: {corpus}, line 2: not JSON")
    assert "Traceback" not in result.output
    assert passages(env, "BAD-") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give exactly one of --pubmedqa, --beir, --pubmed-xml"),
        (["--beir", "/no/such/beir"], "--beir: /no/such/beir is not a folder"),
        (["--pubmedqa", "/no/such.json"], "--pubmedqa: /no/such.json is not a file"),
        (["--pubmed-xml", "/no/such.xml"], "--pubmed-xml: /no/such.xml is not a file"),
        (["--pubmed-xml", str(CORPORA / "beir-mini")], "holds no *.xml or *.xml.gz file"),
        (["--beir", str(CORPORA)], "corpus.jsonl"),
    ],
)
def test_wrong_literature_arguments_exit_2_with_one_line(
    env: dict[str, str], args: list[str], message: str
) -> None:
    result = invoke(env, "literature", *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_a_bge_m3_text_model_indexes_sparse_weights_too(
    env: dict[str, str],
    tiny_dir: Path,
    new_database: Callable[[], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from adapters.models.export.tiny_bge_m3 import build_tiny_bge_m3

    models = tmp_path_factory.mktemp("hybrid-models")
    (models / tiny_dir.name).symlink_to(tiny_dir)
    build_tiny_bge_m3(models / "tiny-bge-m3", seed=0)
    hybrid = {
        **env,
        "MEDIRAG_DSN": new_database(),
        "MEDIRAG_MODELS_DIR": str(models),
        "MEDIRAG_TEXT_MODEL": "tiny-bge-m3",
    }

    first = invoke(hybrid, "literature", "--beir", str(CORPORA / "beir-mini"), "--json")

    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["indexed"] == 3
    postings = rows(hybrid, "SELECT DISTINCT passage_id FROM passage_terms")
    assert sorted(passage_id for (passage_id,) in postings) == ["4025", "MED-10", "MED-14"]
    again = invoke(hybrid, "literature", "--beir", str(CORPORA / "beir-mini"), "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["already_indexed"] == 3
