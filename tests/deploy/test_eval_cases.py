"""``medirag eval cases`` on the first 60 NIH images, with the tiny model and a real embedded
PostgreSQL: patient-disjoint rankings, query labels never used, metrics and baselines computed as
documented, reports written, and a second run that embeds nothing."""

import asyncio
import csv
import itertools
import json
import math
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from adapters.store.embedded import EmbeddedPostgres
from core.metrics import average_precision_at_k, precision_at_k
from deploy.eval_cases import (
    METRICS,
    SCRATCH_DATABASE,
    EvalCase,
    Query,
    StoredCase,
    check_patient_disjoint,
    evaluate_cases,
    exact_rankings,
    judgments,
    leg_metrics,
    open_scratch_store,
    prevalence,
    queries_for,
    random_baseline,
    rank_legs,
)
from deploy.eval_commands import eval_app
from deploy.eval_database import scratch_database
from deploy.settings import Settings

LIMIT = 60


def case(case_id, patient, *findings):
    return EvalCase(case_id, Path(f"{case_id}.png"), f"Patient/{patient}", findings)


# Hand example: p1 has two images; "a" and "b" are relevant to each other but the same patient.
HAND = [
    case("a", "p1", "Effusion"),
    case("b", "p1", "Effusion", "Mass"),
    case("c", "p2", "Mass"),
    case("d", "p2", "No Finding"),
    case("e", "p3", "Effusion"),
]


def test_judgments_and_prevalence_leave_out_the_query_patient():
    assert judgments(HAND[0], HAND) == {"e": 1}
    assert judgments(HAND[1], HAND) == {"c": 1, "e": 1}
    assert judgments(HAND[3], HAND) == {}
    # a: 1 of c, d, e; b: 2 of c, d, e; c: 1 (b) of a, b, e; d: 0 of a, b, e; e: 2 of a..d
    expected = (1 / 3 + 2 / 3 + 1 / 3 + 0 / 3 + 2 / 4) / 5
    assert prevalence(HAND, HAND) == pytest.approx(expected)


def test_a_query_with_no_other_patient_is_not_counted():
    alone = [case("a", "p1", "Mass"), case("b", "p1", "Mass")]
    assert math.isnan(prevalence(alone, alone))
    assert all(
        math.isnan(v) for v in leg_metrics({"a": ()}, {c.case_id: c for c in alone}, alone).values()
    )


def test_leg_metrics_hand_example():
    by_id = {c.case_id: c for c in HAND}
    rankings = {"a": ("c", "e", "d"), "b": ("e", "d", "c"), "d": ("a", "b")}
    metrics = leg_metrics(rankings, by_id, HAND)
    # a: relevant {e} at rank 2; b: relevant {c, e} at ranks 1 and 3; d: none relevant.
    assert metrics["P@1"] == pytest.approx((0 + 1 + 0) / 3)
    assert metrics["P@5"] == pytest.approx((1 / 5 + 2 / 5 + 0) / 3)
    assert metrics["P@10"] == pytest.approx((1 / 10 + 2 / 10 + 0) / 3)
    assert metrics["mAP@10"] == pytest.approx((1 / 2 + (1 + 2 / 3) / 2 + 0) / 3)
    assert metrics["prevalence"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)


def test_random_baseline_is_the_mean_over_every_permutation():
    candidates = [*HAND, case("f", "p4", "Effusion"), case("g", "p5", "Hernia")]
    by_id = {c.case_id: c for c in candidates}
    for query in (HAND[0], HAND[1], HAND[3]):
        others = [c.case_id for c in candidates if c.patient_ref != query.patient_ref]
        qrels = judgments(query, candidates)
        orders = list(itertools.permutations(others))
        expected = {
            f"P@{cut}": sum(precision_at_k(o, qrels, cut) for o in orders) / len(orders)
            for cut in (1, 5, 10)
        }
        expected["mAP@10"] = sum(
            average_precision_at_k(o, qrels, 10, denominator="capped") for o in orders
        ) / len(orders)
        expected["prevalence"] = len(qrels) / len(others)
        baseline = random_baseline([by_id[query.case_id]], candidates)
        assert baseline == pytest.approx(expected)


def many_relevant(relevant, irrelevant):
    """A "Mass" query and other patients' cases: ``relevant`` with "Mass", the rest "Edema"."""
    query = case("q", "p0", "Mass")
    others = [case(f"m{i}", f"pm{i}", "Mass") for i in range(relevant)]
    others += [case(f"e{i}", f"pe{i}", "Edema") for i in range(irrelevant)]
    return query, [query, *others]


def test_leg_metrics_divide_ap_by_at_most_k_relevant_cases():
    _, candidates = many_relevant(12, 3)
    by_id = {c.case_id: c for c in candidates}
    perfect = tuple(f"m{i}" for i in range(10))
    assert leg_metrics({"q": perfect}, by_id, candidates)["mAP@10"] == pytest.approx(1.0)
    # Hits at ranks 2 and 4 of 10, 12 relevant: (1/2 + 2/4) / min(10, 12).
    ranking = ("e0", "m0", "e1", "m1", "e2")
    assert leg_metrics({"q": ranking}, by_id, candidates)["mAP@10"] == pytest.approx(1 / 10)


@pytest.mark.parametrize(("relevant", "irrelevant"), [(11, 2), (12, 3), (9, 5), (10, 4)])
def test_random_baseline_is_exact_with_more_relevant_cases_than_k(relevant, irrelevant):
    # Too many cases to permute; AP@10 depends only on which ranks hold the relevant cases,
    # and a uniformly random order puts them on every set of ranks with equal probability.
    query, candidates = many_relevant(relevant, irrelevant)
    qrels = judgments(query, candidates)
    n = relevant + irrelevant
    rel = sorted(qrels)
    irr = [c.case_id for c in candidates[1:] if c.case_id not in qrels]
    total = 0.0
    placements = list(itertools.combinations(range(n), relevant))
    for ranks in placements:
        chosen = set(ranks)
        rel_iter, irr_iter = iter(rel), iter(irr)
        order = [next(rel_iter) if i in chosen else next(irr_iter) for i in range(n)]
        total += average_precision_at_k(order, qrels, 10, denominator="capped")
    baseline = random_baseline([query], candidates)
    assert baseline["mAP@10"] == pytest.approx(total / len(placements))
    assert baseline["prevalence"] == pytest.approx(relevant / n)


def test_exact_rankings_never_return_the_query_patient():
    v = lambda *x: np.array(x, dtype=np.float32)  # noqa: E731
    stored = [
        StoredCase("a", "Patient/1", v(1, 0), v(0, 1)),
        StoredCase("a2", "Patient/1", v(1, 0.01), v(0, 1)),
        StoredCase("b", "Patient/2", v(0.5, 0.5), v(1, 0)),
        StoredCase("c", "Patient/3", v(0, 1), v(1, 1)),
    ]
    query = Query("a", "Patient/1", v(1, 0))
    assert exact_rankings([query], stored, vector="image", k=10) == {"a": ("b", "c")}
    assert exact_rankings([query], stored, vector="fused", k=1) == {"a": ("b",)}


def test_check_patient_disjoint_refuses_an_own_patient_neighbour():
    patients = {"a": "Patient/1", "a2": "Patient/1", "b": "Patient/2"}
    assert check_patient_disjoint({"leg": {"a": ["b"], "b": ["a", "a2"]}}, patients) == 3
    with pytest.raises(RuntimeError, match="leg fused returned case a2 of query a's own patient"):
        check_patient_disjoint({"fused": {"a": ["b", "a2"]}}, patients)


@pytest.fixture(scope="module")
def nih(shared_data):
    return shared_data / "cxr" / "nih1000"


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_dir):
    data_dir = tmp_path_factory.mktemp("eval-data")
    # Held for the module, so that every run joins the one embedded server instead of
    # starting and stopping it.
    with EmbeddedPostgres(data_dir / "eval" / "pg") as server:
        yield {
            "MEDIRAG_DATA_DIR": str(data_dir),
            "MEDIRAG_DSN": "",
            "MEDIRAG_MODELS_DIR": str(tiny_dir.parent),
            "MEDIRAG_IMAGE_MODEL": tiny_dir.name,
            "MEDIRAG_FUSION_IMAGE_WEIGHT": "0.5",
            "MEDIRAG_FUSION_FINDINGS_WEIGHT": "0.5",
            "MEDIRAG_MIN_LABS": "3",
            "scratch_dsn": server.dsn_for(SCRATCH_DATABASE),
        }


def medirag_env(env):
    return {k: v for k, v in env.items() if k.startswith("MEDIRAG_")}


def settings_of(env, **changes):
    values = {k.removeprefix("MEDIRAG_").lower(): v for k, v in medirag_env(env).items()}
    return Settings(**(values | changes))


def nih_rows(nih):
    with (nih / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def cli_args(nih, *extra):
    return ["cases", "--images", str(nih), "--labels", str(nih / "labels.csv"), *extra]


@pytest.fixture(scope="module")
def first(env, nih, shared_data, tmp_path_factory):
    """The first run, through the command: everything is embedded."""
    out = tmp_path_factory.mktemp("eval-out")
    args = cli_args(nih, "--limit", str(LIMIT), "--bundles", str(shared_data / "synthea"))
    result = CliRunner().invoke(
        eval_app, [*args, "--json", "--out", str(out)], env=medirag_env(env)
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


@pytest.fixture(scope="module")
def second(first, env, nih, shared_data):
    """A second run on the same images, called directly to see its rankings."""
    return asyncio.run(
        evaluate_cases(
            settings_of(env),
            images=nih,
            labels=nih / "labels.csv",
            bundles=shared_data / "synthea",
            limit=LIMIT,
            console=Console(stderr=True, quiet=True),
        )
    )


@pytest.mark.slow
def test_first_run_writes_reports_with_metrics_and_baselines(first, nih):
    report, out = first
    name = f"cases-nih1000-first{LIMIT}"
    for suffix in ("json", "md", "png"):
        assert (out / f"{name}.{suffix}").stat().st_size > 0
    assert json.loads((out / f"{name}.json").read_text()) == report
    assert report["details"]["embedded_now"] == LIMIT
    assert report["details"]["queries"] == LIMIT
    constant = "constant: No Finding"
    assert list(report["rows"]) == ["image-only", "fused", "labs", "random (expected)", constant]
    for values in report["rows"].values():
        assert set(values) == set(METRICS)
        assert all(0.0 <= v <= 1.0 for v in values.values())
    prevalences = {values["prevalence"] for values in report["rows"].values()}
    assert len(prevalences) == 1  # every case has paired labs: same candidates for every leg
    counts = Counter(
        label for row in nih_rows(nih)[:LIMIT] for label in row["Finding Labels"].split("|")
    )
    assert [
        (row["finding"], row["queries"]) for row in report["per_finding"]
    ] == counts.most_common(5)
    # The constant baseline: a normal query gets up to 10 normals of other patients.
    rows = nih_rows(nih)[:LIMIT]
    normals = [r for r in rows if r["Finding Labels"] == "No Finding"]
    expected = [
        min(10, sum(n["Patient ID"] != r["Patient ID"] for n in normals)) / 10
        if r["Finding Labels"] == "No Finding"
        else 0.0
        for r in rows
    ]
    assert report["rows"][constant]["P@10"] == pytest.approx(sum(expected) / LIMIT)
    # Its cases are all relevant to a normal query, so that query's AP@10 is 1, however many
    # more normals there are; 0 for the others.
    assert report["rows"][constant]["mAP@10"] == pytest.approx(sum(p > 0 for p in expected) / LIMIT)
    assert max(sum(n["Patient ID"] != r["Patient ID"] for n in normals) for r in normals) > 10
    markdown = (out / f"{name}.md").read_text()
    assert "RANDOM image model, meaningless" in markdown.splitlines()[0]
    assert "SYNTHETIC pairing" in markdown
    assert f"| No Finding | {counts['No Finding']} |" in markdown


@pytest.mark.slow
def test_second_run_embeds_nothing_and_gives_the_same_numbers(first, second):
    report, _ = first
    details = second.report.details
    assert (details["embedded_now"], details["already_indexed"]) == (0, LIMIT)
    assert (details["rows_removed"], details["rows_refreshed"]) == (0, 0)
    assert second.to_json()["rows"] == report["rows"]


@pytest.mark.slow
def test_no_leg_returns_the_query_patient_although_it_would_rank_high(second, nih):
    with (nih / "labels.csv").open(newline="") as handle:
        patient = {
            f"nih-{Path(r['Image Index']).stem}": r["Patient ID"] for r in csv.DictReader(handle)
        }
    assert set(second.rankings) == {"image-only", "fused", "labs"}
    for leg, by_query in second.rankings.items():
        assert len(by_query) == LIMIT
        for query, neighbours in by_query.items():
            assert len(neighbours) == 10, (leg, query)
            assert all(patient[n] != patient[query] for n in neighbours), (leg, query)
    # Without the exclusion, the query patient's other images would be among the top 10.
    free = {
        s.case_id: exact_rankings(
            [Query(s.case_id, "Patient/nobody", s.image)], second.stored, vector="image", k=11
        )[s.case_id][1:]
        for s in second.stored
    }
    own = sum(patient[n] == patient[q] for q, neighbours in free.items() for n in neighbours)
    assert own > LIMIT


@pytest.mark.slow
def test_query_labels_never_change_a_ranking(second, env):
    findings = [c.findings for c in second.cases]
    random.Random(0).shuffle(findings)
    shuffled = [replace(c, findings=f) for c, f in zip(second.cases, findings, strict=True)]
    assert sum(a.findings != b.findings for a, b in zip(second.cases, shuffled, strict=True)) > 30
    stored = {s.case_id: s for s in second.stored}
    model = second.report.models[0]

    async def rank(cases):
        store = await open_scratch_store(
            env["scratch_dsn"],
            image_model=model.model_id,
            image_dim=second.stored[0].image.shape[0],
        )
        async with store:
            return await rank_legs(
                queries_for(cases, stored, second.pairing),
                second.stored,
                index=store,
                k=10,
                min_labs=3,
                with_labs=True,
            )

    assert asyncio.run(rank(shuffled)) == asyncio.run(rank(second.cases)) == second.rankings


@pytest.mark.slow
def test_scratch_database_on_a_server_is_its_own(postgres):
    async def open_it():
        async with scratch_database(Settings(dsn=postgres.dsn), SCRATCH_DATABASE) as dsn:
            return dsn

    dsn = asyncio.run(open_it())
    assert dsn == postgres.dsn_for(SCRATCH_DATABASE)
    assert asyncio.run(open_it()) == dsn  # the second time, it is already there


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--limit", "0"], "--limit must be at least 1"),
        (["--limit", "1"], "fewer than 2 NIH patients"),
        (["--image-model", "/nonexistent/model"], "manifest.json is missing"),
        (["--bundles", "/nonexistent/synthea"], "not a folder of FHIR bundles"),
    ],
)
def test_bad_input_is_one_clear_line(nih, tmp_path, extra, message):
    env = {"MEDIRAG_DATA_DIR": str(tmp_path), "MEDIRAG_DSN": "", "COLUMNS": "200"}
    result = CliRunner().invoke(eval_app, [*cli_args(nih), *extra], env=env)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_labels_or_images_are_named(nih, tmp_path):
    env = {"MEDIRAG_DATA_DIR": str(tmp_path), "COLUMNS": "200"}
    runner = CliRunner()
    args = ["cases", "--images", str(tmp_path), "--labels"]
    labels = tmp_path / "labels.csv"
    for content, message in [
        (None, f"no labels file at {labels}"),
        ("Image Index,Finding Labels\n", f"{labels} lists no images"),
        ("Image Index,Finding Labels\nx.png,Mass\n", "no column 'Follow-up #'"),
        ((nih / "labels.csv").read_text(), f"1000 image(s) listed in {labels} are not in"),
    ]:
        if content is not None:
            labels.write_text(content)
        result = runner.invoke(eval_app, [*args, str(labels)], env=env)
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "Traceback" not in result.output


@pytest.mark.slow
def test_changed_settings_refresh_rows_without_embedding(env, nih, second):
    """Runs that change the scratch index: they come last."""
    image_only = asyncio.run(
        evaluate_cases(
            settings_of(env, fusion_findings_weight=0.0),
            images=nih,
            labels=nih / "labels.csv",
            limit=LIMIT,
            console=Console(stderr=True, quiet=True),
        )
    )
    details = image_only.report.details
    assert (details["embedded_now"], details["rows_refreshed"]) == (0, LIMIT)
    assert "labs" not in image_only.rankings
    assert "not run" in image_only.report.not_run["labs"]
    # Fused with weights (1, 0) is the image itself: the store's search must find what the
    # exact image-only search finds.
    assert image_only.rankings["fused"] == image_only.rankings["image-only"]
    assert image_only.rankings["image-only"] == second.rankings["image-only"]
    fewer = asyncio.run(
        evaluate_cases(
            settings_of(env),
            images=nih,
            labels=nih / "labels.csv",
            limit=40,
            console=Console(stderr=True, quiet=True),
        )
    )
    details = fewer.report.details
    assert (details["embedded_now"], details["rows_removed"], details["indexed"]) == (0, 20, 40)
    assert all(
        n in {c.case_id for c in fewer.cases} for r in fewer.rankings["fused"].values() for n in r
    )
