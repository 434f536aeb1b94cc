"""The report's figures as a reader sees them: no title, label or annotation cut off at the figure's edge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from finetune.report import plots
from finetune.report.compare import generate_report
from tests.unit.report.test_report import (  # noqa: F401  (fixtures)
    grid_sweep, methods_sweep, qat_metrics, qat_sweep, write_job, write_seeded_qat_sweep)


@pytest.fixture
def drawn(monkeypatch) -> list[Figure]:
    """Every figure the report saves, as saved (the constrained layout done)."""
    figures: list[Figure] = []
    save = plots._save

    def keep(fig: Figure, path: Path) -> Path:
        out = save(fig, path)
        figures.append(fig)
        return out

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def cut_off(fig: Figure) -> list[str]:
    """The texts of ``fig`` that reach past its edges (by more than a pixel): titles, axis labels, annotations,
    legends; tick labels are left out (those outside the axis limits exist but are not drawn)."""
    renderer = fig.canvas.get_renderer()
    edge = fig.bbox
    ticks = {id(t) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
             for t in axis.get_ticklabels(which="both")}
    out = []
    for text in fig.findobj(Text):
        if not text.get_visible() or not text.get_text().strip() or id(text) in ticks:
            continue
        box = text.get_window_extent(renderer)
        if box.x0 < edge.x0 - 1 or box.x1 > edge.x1 + 1 or box.y0 < edge.y0 - 1 or box.y1 > edge.y1 + 1:
            out.append(text.get_text())
    return out


def qkd_study(root: Path) -> Path:
    """One seed of the QKD study: a plain run with PTQ baselines, a QAT run and a distilled one, two schemes' labels."""
    write_seeded_qat_sweep(root, {1: {"none": (0.829, {"attn": 0.82, "ffn": 0.429, "attn+ffn": 0.40}),
                                      "ffn": (0.697, 0.729)}})
    for job in root.iterdir():
        m = json.loads((job / "metrics.json").read_text())
        if m["qat_targets"] == []:
            m["ptq_baselines"] = {"smoothquant-0.8": {"scale": "tensor", "ffn": {"accuracy_int8": 0.83,
                                                                                 "f1_int8": 0.81}}}
        (job / "metrics.json").write_text(json.dumps(m))
    for num, mode in ((7, "run"), (8, "self")):
        distilled = qat_metrics(["ffn"], 0.823, 0.758, seed=1)
        distilled["distill"] = {"mode": mode, "alpha": 0.5, "temperature": 2.0}
        write_job(root, num, ["qat_targets=[ffn]", "seed=1", f"distill={mode}"], distilled)
    return root


def test_no_text_of_a_report_figure_is_cut_off(drawn, methods_sweep, grid_sweep, qat_sweep, tmp_path) -> None:
    for sweep in (methods_sweep, grid_sweep, qat_sweep, qkd_study(tmp_path / "qkd_regime")):
        generate_report(sweep)
    assert len(drawn) >= 5  # memory, grid, QAT (twice) and QAT against the strongest baseline
    cut = [text for fig in drawn for text in cut_off(fig)]
    assert cut == []
