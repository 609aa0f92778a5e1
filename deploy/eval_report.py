"""Evaluation reports: one result, written as JSON, a markdown table and a bar chart.

Why it exists: every ``medirag eval`` command (literature, cases) measures several retrieval
legs on one dataset with named models, and must leave the same three files behind: JSON for
machines and later comparison, markdown for the README and pull requests, a PNG for a glance.
Keeping the format here means the commands differ only in what they measure.

A report is deliberately generic: a title, the models named (with the precision and providers
that really ran), rows of ``{leg: {metric: value}}``, legs that were not run with the reason,
notes, and free-form JSON-ready details (dataset sizes, timings).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.models.served import ServedModel

__all__ = [
    "EvalReport",
    "ModelInfo",
    "PlotUnavailable",
    "ReportFiles",
    "plot_report",
    "require_plotting",
    "write_report",
]


class PlotUnavailable(Exception):
    """The PNG cannot be drawn because matplotlib is not installed."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model an evaluation ran, as the report names it.

    Args:
        role: what the model did in the evaluation (``"dense"``, ``"sparse"``, ``"reranker"``).
        model_id: the model's identity (its manifest's fp32 identity).
        name: the model card's short name.
        description: the model card's line (says when the model is a random placeholder).
        precision: the precision of the graphs that really ran (``"fp32"``; several joined by
            ``"/"`` when a model's graphs differ).
        providers: the onnxruntime providers the graphs really ran on.

    Example:
        >>> ModelInfo("dense", "minilm@abc", "all-MiniLM-L6-v2", "real weights", "fp32").role
        'dense'
    """

    role: str
    model_id: str
    name: str
    description: str
    precision: str
    providers: tuple[str, ...] = ()

    @classmethod
    def of(cls, role: str, model: ServedModel) -> ModelInfo:
        """The report's entry for a loaded model.

        Args:
            role: what the model does in the evaluation.
            model: a loaded model (its graphs opened, so that what runs is known).

        Returns:
            The model's id, card, and the precision and providers its graphs run with.

        Example:
            >>> ModelInfo.of("dense", OnnxTextEmbedder(minilm_dir))  # doctest: +SKIP
            ModelInfo(role='dense', model_id='all-MiniLM-L6-v2@...', ...)
        """
        graphs = model.runtime.graphs
        precisions = sorted({str(graph.precision) for graph in graphs})
        if not precisions:
            precisions = [model.manifest.precision]
        providers = tuple(dict.fromkeys(p for graph in graphs for p in graph.providers))
        return cls(
            role=role,
            model_id=model.model_id,
            name=model.card.name,
            description=model.card.description,
            precision="/".join(precisions),
            providers=providers,
        )

    def to_json(self) -> dict[str, Any]:
        """The entry as JSON-ready data."""
        return {
            "role": self.role,
            "model_id": self.model_id,
            "name": self.name,
            "description": self.description,
            "precision": self.precision,
            "providers": list(self.providers),
        }


@dataclass(frozen=True, slots=True)
class EvalReport:
    """The result of one evaluation run.

    Args:
        name: the files' stem (``"literature-pubmedqa"`` writes ``literature-pubmedqa.json``,
            ``.md`` and ``.png``); letters, digits, ``-``, ``_`` and ``.`` only.
        title: one line saying what was evaluated on what.
        metrics: the metric names, in column order (``"nDCG@10"``, ...).
        rows: per leg, in row order, its value for each metric of ``metrics``.
        not_run: legs that were not run, with the reason (``"not run: no sparse model
            given"``); shown in the table, never given numbers.
        models: the models the run used.
        notes: lines a reader needs to interpret the numbers (what a placeholder model means).
        details: JSON-ready facts about the run (dataset sizes, timings).

    Raises:
        ValueError: a bad name, or a row lacking a metric.

    Example:
        >>> report = EvalReport("demo", "Demo", ("MRR@10",), {"bm25": {"MRR@10": 0.5}})
        >>> print(report.to_markdown().splitlines()[0])
        # Demo
    """

    name: str
    title: str
    metrics: tuple[str, ...]
    rows: Mapping[str, Mapping[str, float]]
    not_run: Mapping[str, str] = field(default_factory=dict)
    models: tuple[ModelInfo, ...] = ()
    notes: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"report name must be letters, digits, '-', '_', '.': {self.name!r}")
        for leg, values in self.rows.items():
            missing = [metric for metric in self.metrics if metric not in values]
            if missing:
                raise ValueError(f"row {leg!r} lacks {', '.join(missing)}")

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (non-finite values become ``null``)."""
        return {
            "name": self.name,
            "title": self.title,
            "metrics": list(self.metrics),
            "rows": {
                leg: {metric: _finite(values[metric]) for metric in self.metrics}
                for leg, values in self.rows.items()
            },
            "not_run": dict(self.not_run),
            "models": [model.to_json() for model in self.models],
            "notes": list(self.notes),
            "details": dict(self.details),
        }

    def to_markdown(self) -> str:
        """The report as markdown: title, the metrics table, models, notes and details.

        Example:
            >>> report = EvalReport("x", "X", ("P@1",), {"bm25": {"P@1": 1.0}}, {"sparse": "no"})
            >>> print("\\n".join(report.to_markdown().splitlines()[2:6]))
            | leg | P@1 |
            |---|---|
            | bm25 | 1.0000 |
            | sparse | no |
        """
        lines = [f"# {self.title}", ""]
        lines.append("| leg | " + " | ".join(self.metrics) + " |")
        lines.append("|---" * (len(self.metrics) + 1) + "|")
        for leg, values in self.rows.items():
            cells = [_cell(values[metric]) for metric in self.metrics]
            lines.append(f"| {leg} | " + " | ".join(cells) + " |")
        for leg, reason in self.not_run.items():
            lines.append(f"| {leg} | {reason} |" + " |" * (len(self.metrics) - 1))
        if self.models:
            lines += ["", "Models:", ""]
            lines += [
                f"- {m.role}: {m.name} (`{m.model_id}`, {m.precision}"
                + (f", {', '.join(m.providers)}" if m.providers else "")
                + f"): {m.description}"
                for m in self.models
            ]
        if self.notes:
            lines += ["", "Notes:", ""]
            lines += [f"- {note}" for note in self.notes]
        if self.details:
            lines += ["", "Details:", ""]
            lines += [f"- {key}: {_detail(value)}" for key, value in self.details.items()]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class ReportFiles:
    """Where a report was written."""

    json: Path
    markdown: Path
    png: Path


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _cell(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "n/a"


def _detail(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def require_plotting() -> None:
    """Check that the PNG can be drawn, so that a command fails before its long work.

    Raises:
        PlotUnavailable: matplotlib is not installed (``pip install '.[eval]'``).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise PlotUnavailable(
            "the report's PNG needs matplotlib: install the eval extra (pip install '.[eval]')"
        ) from error


def plot_report(report: EvalReport, path: Path) -> Path:
    """Draw the report as a grouped bar chart: one group per metric, one bar per leg.

    Uses matplotlib's Agg canvas directly, so no display and no global backend are touched.

    Args:
        report: the report.
        path: the PNG to write.

    Returns:
        ``path``.

    Raises:
        PlotUnavailable: matplotlib is not installed (``pip install '.[eval]'``).
    """
    require_plotting()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    legs = list(report.rows)
    figure = Figure(figsize=(max(6.0, 2.0 + 0.3 * len(report.metrics) * max(1, len(legs))), 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(legs))
    for i, leg in enumerate(legs):
        values = [report.rows[leg][metric] for metric in report.metrics]
        heights = [v if math.isfinite(v) else 0.0 for v in values]
        offsets = [m + (i - (len(legs) - 1) / 2) * width for m in range(len(report.metrics))]
        bars = axes.bar(offsets, heights, width, label=leg)
        axes.bar_label(bars, labels=[_cell(v) for v in values], fontsize=6, rotation=90, padding=2)
    axes.set_xticks(range(len(report.metrics)), list(report.metrics))
    finite = [v for row in report.rows.values() for v in row.values() if math.isfinite(v)]
    if finite and all(0.0 <= v <= 1.0 for v in finite):
        # Headroom above 1 for the values printed on the bars.
        axes.set_ylim(0.0, 1.15)
        axes.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axes.set_title(report.title, fontsize=9, pad=10)
    if legs:
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)
    return path


def write_report(report: EvalReport, out_dir: Path) -> ReportFiles:
    """Write ``<out_dir>/<name>.json``, ``.md`` and ``.png``, creating ``out_dir``.

    Args:
        report: the report.
        out_dir: the folder to write to.

    Returns:
        The three paths.

    Raises:
        PlotUnavailable: matplotlib is not installed (checked before anything is written).
        OSError: ``out_dir`` cannot be created or written.

    Example:
        >>> files = write_report(report, Path(".medirag/eval"))  # doctest: +SKIP
        >>> files.json.name  # doctest: +SKIP
        'literature-pubmedqa.json'
    """
    require_plotting()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(
        json=out_dir / f"{report.name}.json",
        markdown=out_dir / f"{report.name}.md",
        png=out_dir / f"{report.name}.png",
    )
    files.json.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    files.markdown.write_text(report.to_markdown(), encoding="utf-8")
    plot_report(report, files.png)
    return files
