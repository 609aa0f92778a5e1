"""``medirag eval literature`` runs every leg end to end on real models and a real PostgreSQL,
writes its report, reuses its scratch index, and refuses bad input in one line."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from adapters.store.embedded import EmbeddedPostgres
from deploy.eval_commands import eval_app
from deploy.eval_literature import LEGS, load_dataset, run_literature_eval
from deploy.settings import Settings

pytestmark = pytest.mark.slow

METRICS = ["nDCG@10", "Recall@100", "MAP@100", "MRR@10"]
SUBSET = 30

# Each query shares words with its relevant documents only (stopwords aside), so BM25 must rank
# every relevant document first: q2's grade-2 document above its grade-1 one.
CORPUS = [
    {"_id": "d1", "title": "Antibiotics", "text": "Amoxicillin treats community pneumonia."},
    {"_id": "d2", "title": "Effusion", "text": "Pleural effusion is fluid between pleural layers."},
    {"_id": "d3", "title": "Heart", "text": "Cardiomegaly means an enlarged heart on radiographs."},
    {"_id": "d4", "title": "Diabetes", "text": "Metformin lowers blood glucose in diabetes."},
    {"_id": "d5", "title": "Pneumothorax", "text": "Air in the pleural space after trauma."},
    {"_id": "d6", "title": "Empty", "text": ""},
]
QUERIES = [
    {"_id": "q1", "text": "Which antibiotic treats pneumonia?"},
    {"_id": "q2", "text": "fluid in the pleural layers"},
    {"_id": "q3", "text": "enlarged heart"},
    {"_id": "q4", "text": "glucose lowering drug"},
    {"_id": "q5", "text": "a query nobody judged"},
]
QRELS = [("q1", "d1", 1), ("q2", "d2", 2), ("q2", "d5", 1), ("q3", "d3", 1), ("q4", "d4", 1)]


@pytest.fixture(scope="module")
def bge_m3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny (random) BGE-M3, seed 0: the sparse leg's model."""
    from adapters.models.export.tiny_bge_m3 import build_tiny_bge_m3

    return build_tiny_bge_m3(tmp_path_factory.mktemp("eval-models") / "tiny-bge-m3", seed=0)


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny (random) cross-encoder, seed 0."""
    from adapters.models.export.tiny_reranker import build_tiny_reranker

    return build_tiny_reranker(tmp_path_factory.mktemp("eval-models") / "tiny-reranker", seed=0)


@pytest.fixture(scope="module")
def pubmedqa_subset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 30 abstracts of PubMedQA's test set, with their questions."""
    records = json.loads((shared_data / "literature/pubmedqa/test_set.json").read_text())
    path = tmp_path_factory.mktemp("pubmedqa") / "subset.json"
    path.write_text(json.dumps(dict(list(records.items())[:SUBSET])))
    return path


@pytest.fixture
def beir_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "toy-beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps(doc) for doc in CORPUS) + "\n")
    (folder / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in QUERIES) + "\n")
    rows = ["query-id\tcorpus-id\tscore", *(f"{q}\t{d}\t{s}" for q, d, s in QRELS)]
    (folder / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    return folder


def env(data_dir: Path, **extra: str | None) -> dict[str, str | None]:
    return {"MEDIRAG_DATA_DIR": str(data_dir), "MEDIRAG_DSN": None, **extra}


def invoke(args: list[str], environment: dict[str, str | None]) -> Any:
    return CliRunner().invoke(eval_app, ["literature", *args], env=environment)


def test_every_leg_on_pubmedqa_and_a_second_run_embeds_nothing(
    pubmedqa_subset: Path, minilm_dir: Path, bge_m3_dir: Path, reranker_dir: Path, tmp_path: Path
) -> None:
    args = [
        "--dataset",
        f"pubmedqa:{pubmedqa_subset}",
        "--text-model",
        str(minilm_dir),
        "--sparse-model",
        str(bge_m3_dir),
        "--reranker",
        str(reranker_dir),
        # Few passages per query keep the random cross-encoder's share of the test short.
        "--rerank-top-n",
        "5",
        "--out",
        str(tmp_path / "reports"),
    ]
    first = invoke(args, env(tmp_path / "data"))
    assert first.exit_code == 0, first.output
    for leg in LEGS:
        assert f"| {leg} |" in first.stdout
    stem = tmp_path / "reports" / "literature-pubmedqa-subset"
    report = json.loads(stem.with_suffix(".json").read_text())
    assert list(report["rows"]) == list(LEGS)
    assert report["not_run"] == {}
    assert report["metrics"] == METRICS
    markdown = stem.with_suffix(".md").read_text()
    assert all(f"| {leg} |" in markdown for leg in LEGS)
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {m["role"] for m in report["models"]} == {"dense", "sparse", "reranker"}
    details = report["details"]
    assert details["queries"] == details["articles"] == SUBSET
    assert details["indexed_now"] == details["passages"] > SUBSET
    assert (tmp_path / "data" / "eval" / "pg" / "PG_VERSION").is_file()
    for values in report["rows"].values():
        assert all(0.0 <= values[metric] <= 1.0 for metric in METRICS)
    # Among 30 abstracts, a random ranking puts the question's own abstract in the top 10 a
    # third of the time (nDCG@10 about 0.15); MiniLM and BM25 find it almost always.
    assert report["rows"]["dense"]["nDCG@10"] >= 0.8
    assert report["rows"]["dense"]["MRR@10"] >= 0.8
    assert report["rows"]["bm25"]["nDCG@10"] >= 0.8

    second = invoke([*args, "--json"], env(tmp_path / "data"))
    assert second.exit_code == 0, second.output
    again = json.loads(second.stdout)
    assert again["details"]["indexed_now"] == 0
    assert again["details"]["already_indexed"] == details["passages"]
    assert again["details"]["database"] == details["database"]
    assert again["rows"] == report["rows"]


def test_beir_on_the_configured_server_without_sparse_model_or_reranker(
    beir_folder: Path, minilm_dir: Path, postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", dsn=postgres.dsn, reranker=None)
    result = asyncio.run(
        run_literature_eval(f"beir:{beir_folder}", settings=settings, text_model=minilm_dir)
    )
    try:
        assert (result.queries, result.documents, result.passages) == (4, 5, 5)
        assert set(result.metrics) == {"bm25", "dense", "dense+bm25 (RRF)"}
        assert result.not_run == {
            "sparse": "not run: no sparse model given",
            "hybrid": "not run: no sparse model given",
            "hybrid+rerank": "not run: no sparse model given",
        }
        assert result.metrics["bm25"] == {metric: pytest.approx(1.0) for metric in METRICS}
        assert result.metrics["dense"]["MRR@10"] >= 0.75
        assert result.ingest.indexed == 5
        # The scratch database lives on the configured server, not under the data directory.
        assert not (tmp_path / "data" / "eval" / "pg").exists()
        assert result.files is not None
        assert result.files.json == tmp_path / "data" / "eval" / "literature-beir-toy-beir.json"
        markdown = result.files.markdown.read_text()
        assert "| hybrid+rerank | not run: no sparse model given |" in markdown
    finally:
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{result.database}" WITH (FORCE)')


def test_pubmedqa_questions_are_judged_against_their_own_abstract(pubmedqa_subset: Path) -> None:
    dataset = load_dataset(f"pubmedqa:{pubmedqa_subset}")
    assert len(dataset.queries) == SUBSET
    assert all(dataset.qrels[pmid] == {pmid: 1} for pmid in dataset.queries)
    assert {p.pmid for p in dataset.passages} == set(dataset.queries)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("trec:runs", "expected pubmedqa:FILE or beir:DIR"),
        ("pubmedqa:", "expected pubmedqa:FILE or beir:DIR"),
        ("pubmedqa:{tmp}/missing.json", "no such file"),
        ("beir:{tmp}/missing", "no such folder"),
        ("pubmedqa:{tmp}/broken.json", "is not JSON"),
        ("beir:{tmp}", "corpus.jsonl"),
    ],
)
def test_a_bad_dataset_is_one_line_and_status_2(spec: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    result = invoke(["--dataset", spec.format(tmp=tmp_path)], env(tmp_path / "data"))
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_a_missing_default_model_says_how_to_get_it(beir_folder: Path, tmp_path: Path) -> None:
    result = invoke(
        ["--dataset", f"beir:{beir_folder}"],
        env(tmp_path / "data", MEDIRAG_MODELS_DIR=str(tmp_path / "no-models")),
    )
    assert result.exit_code == 2
    assert "manifest.json is missing" in result.stderr
    assert "medirag demo" in result.stderr
    assert "Traceback" not in result.output


def test_an_unwritable_report_folder_fails_before_the_work(
    beir_folder: Path, tmp_path: Path
) -> None:
    (tmp_path / "taken").write_text("a file where the folder should be")
    result = invoke(
        ["--dataset", f"beir:{beir_folder}", "--out", str(tmp_path / "taken")],
        env(tmp_path / "data", MEDIRAG_MODELS_DIR=str(tmp_path / "no-models")),
    )
    assert result.exit_code == 2
    assert "cannot write" in result.stderr
    assert str(tmp_path / "taken") in result.stderr
    assert "Traceback" not in result.output
