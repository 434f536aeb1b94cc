"""Tests of finetune.report.compare: collecting runs, detecting the sweep kind, tables, files, plots, CLI, callback."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from finetune.errors import FinetuneError
from finetune.cli.report import main
from finetune.report.compare import build_report, collect_runs, detect_kind, generate_report, markdown_table
from finetune.report.hydra_callback import ReportCallback, log_table_to_wandb

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOTAL = 134_515_008


def write_job(root: Path, num: int | str, overrides: list[str], metrics: dict | None) -> Path:
    """A Hydra job dir: .hydra/overrides.yaml and (unless None) metrics.json."""
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / ".hydra" / "config.yaml").write_text("seed: 42\n")
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps({"job": str(num), "overrides": overrides, **metrics}, indent=2))
    return job


def cls_metrics(method: str, quant: str, peak: float, tps: float, acc: float, trainable: int, **extra) -> dict:
    metrics = {
        "status": "ok", "method": method, "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "dataset": "chnsenticorp", "data_source": "embedded", "task": "classification",
        "quantization": quant, "qat_targets": [], "seed": 42,
        "trainable_params": trainable, "total_params": TOTAL, "trainable_pct": 100 * trainable / TOTAL,
        "peak_memory_mb": peak, "memory_device": "cuda", "model_memory_mb": peak / 3,
        "train_runtime_s": 120_000 / tps, "train_tokens_per_s": tps, "train_steps": 150,
        "train_loss": 0.41, "eval_loss": 0.35, "accuracy": acc, "f1": acc - 0.01,
        "zero_shot_accuracy": 0.52, "zero_shot_f1": 0.40,
    }
    if method != "full":
        metrics["lora"] = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    metrics.update(extra)
    return metrics


@pytest.fixture
def methods_sweep(tmp_path: Path) -> Path:
    """4 finished methods (deliberately out of display order) + a failed dora job."""
    root = tmp_path / "lora_vs_qlora" / "2025-01-01_12-00-00"
    write_job(root, 0, ["quantization=nf4"], cls_metrics("qlora-nf4", "nf4", 1100.0, 800.0, 0.888, 811_008))
    write_job(root, 1, [], cls_metrics("lora", "none", 2000.0, 1000.0, 0.900, 811_008))
    write_job(root, 2, ["lora=none"], cls_metrics("full", "none", 5400.0, 1250.0, 0.915, TOTAL))
    write_job(root, 3, ["quantization=int8"], cls_metrics("qlora-int8", "int8", 1500.0, 600.0, 0.897, 811_008))
    write_job(root, 4, ["lora=dora"], {"status": "failed", "method": "dora",
                                       "error": "CUDA out of memory. Tried to allocate 2.00 GiB"})
    return root


def grid_accuracy(r: int, alpha: int, dropout: float) -> float:
    return round(0.80 + 0.01 * r / 4 + 0.02 * (alpha == 16) - 0.05 * dropout, 4)


@pytest.fixture
def grid_sweep(tmp_path: Path) -> Path:
    """A 2 x 2 x 2 grid over r, alpha, dropout plus one job that died without metrics.json."""
    root = tmp_path / "grid" / "2025-01-02_08-00-00"
    num = 0
    for r in (4, 8):
        for alpha in (8, 16):
            for dropout in (0.0, 0.1):
                overrides = [f"lora.r={r}", f"lora.alpha={alpha}", f"lora.dropout={dropout}"]
                write_job(root, num, overrides, cls_metrics(
                    "lora", "none", 2000.0, 1000.0, grid_accuracy(r, alpha, dropout), 811_008 * r // 8,
                    lora={"r": r, "alpha": alpha, "dropout": dropout, "target_modules": ["q_proj", "v_proj"]},
                    eval_loss=1.0 - grid_accuracy(r, alpha, dropout)))
                num += 1
    write_job(root, num, ["lora.r=16", "lora.alpha=32", "lora.dropout=0.1"], None)
    return root


def qat_metrics(targets: list[str], acc: float, acc_int8: float, seed: int = 42) -> dict:
    extra = {"qat_targets": targets, "accuracy_int8": acc_int8, "f1_int8": acc_int8 - 0.01, "seed": seed}
    if targets:
        extra["qat"] = {"bits": 8, "scale": "tensor", "granularity": "sublayer", "weight_bits": None,
                        "num_quantized_modules": {"total": 30 * len(targets), "attn": 30 * ("attn" in targets),
                                                  "ffn": 30 * ("ffn" in targets)},
                        "snr_db": {"attn": 31.5, "ffn": 28.25}}
    return cls_metrics("lora", "none", 2100.0, 900.0, acc, 811_008, **extra)


@pytest.fixture
def qat_sweep(tmp_path: Path) -> Path:
    root = tmp_path / "qat" / "2025-01-03_09-00-00"
    ptq = qat_metrics([], 0.900, 0.849)
    ptq.update(int8_eval="ptq", accuracy_int8_attn=0.870, f1_int8_attn=0.86, accuracy_int8_ffn=0.880, f1_int8_ffn=0.87)
    write_job(root, 0, ["qat_targets=[]"], ptq)
    write_job(root, 1, ["qat_targets=[attn]"], qat_metrics(["attn"], 0.898, 0.880))
    write_job(root, 2, ["qat_targets=[ffn]"], qat_metrics(["ffn"], 0.897, 0.875))
    write_job(root, 3, ["qat_targets=[attn,ffn]"], qat_metrics(["ffn", "attn"], 0.896, 0.893))
    return root


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000  # a real chart, not an empty canvas


def table_rows(md: str) -> list[list[str]]:
    """Cells of the markdown table in comparison.md (header first)."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines if not set(ln) <= set("|-: ")]


# --- collect_runs -------------------------------------------------------------------------------

def test_collect_flattens_and_marks_hard_died_jobs(grid_sweep: Path) -> None:
    (grid_sweep / "0" / "checkpoint-50").mkdir()
    (grid_sweep / "0" / "checkpoint-50" / "metrics.json").write_text('{"status": "ok"}')
    (grid_sweep / "0" / "wandb" / "run-1").mkdir(parents=True)
    (grid_sweep / "0" / "wandb" / "run-1" / "metrics.json").write_text('{"status": "ok"}')
    df = collect_runs(grid_sweep)
    assert len(df) == 9
    assert list(df["job"]) == [str(i) for i in range(9)]
    assert {"lora.r", "lora.alpha", "lora.dropout", "lora.target_modules"} <= set(df.columns)
    assert df.loc[0, "lora.target_modules"] == "q_proj,v_proj"
    dead = df.iloc[-1]
    assert dead["status"] == "failed" and dead["error"] == "no metrics.json (job did not finish)"
    assert dead["lora.r"] == 16 and dead["overrides"] == "lora.r=16 lora.alpha=32 lora.dropout=0.1"


def test_a_job_under_way_is_reported_running_not_failed(grid_sweep: Path) -> None:
    """A job without metrics.json whose run still holds its directory (another process, as a sweep's job is) is
    under way: the report says so, and counts it apart from the failures. Once that process is gone, the lock file
    it may leave behind (a kill -9) does not make the job look alive."""
    job = grid_sweep / "8"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from finetune.platform.locks import "
         "RunDirLock; RunDirLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(120)", str(job)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        row = collect_runs(grid_sweep).iloc[-1]
        assert row["status"] == "running" and row["error"] == f"running now (pid {holder.pid}), no metrics.json yet"
        md = build_report(grid_sweep)["markdown"].read_text()
        assert "(9 jobs: 8 ok, 0 failed, 1 running;" in md
        assert f"| running now (pid {holder.pid}), no metrics.json yet" in md and "failed: no metrics.json" not in md
    finally:
        holder.kill()
        holder.wait()
    assert (job / ".finetune.lock").is_file()  # killed: its lock file stays, its lock does not
    row = collect_runs(grid_sweep).iloc[-1]
    assert row["status"] == "failed" and row["error"] == "no metrics.json (job did not finish)"


@pytest.mark.parametrize("overrides, method", [
    (["+method=qlora_nf4", "+sweep=lora_vs_qlora"], "qlora-nf4"),
    (["+method=full"], "full"),
    (["lora=dora", "quantization=int8"], "qdora-int8"),
    (["lora=none"], "full"),
])
def test_a_job_killed_before_its_metrics_is_named_by_its_overrides(tmp_path: Path, overrides, method) -> None:
    """A job process killed hard (SIGTERM, OOM killer) leaves only its overrides: the report still names it."""
    root = tmp_path / "sweep"
    write_job(root, 0, [], cls_metrics("lora", "none", 2000.0, 1000.0, 0.9, 811_008))
    write_job(root, 1, overrides, {"status": "failed", "error": "job process killed by SIGTERM"})
    df = collect_runs(root)
    assert df.loc[1, "method"] == method and df.loc[1, "status"] == "failed"


def test_collect_qat_columns(qat_sweep: Path) -> None:
    df = collect_runs(qat_sweep).set_index("job")
    assert list(df["qat_targets"]) == ["none", "attn", "ffn", "attn+ffn"]
    assert df.loc["3", "qat.snr_db.attn"] == 31.5 and df.loc["3", "qat.num_quantized_modules.total"] == 60
    assert pd.isna(df.loc["0", "qat.snr_db.ffn"])


def test_collect_errors(tmp_path: Path) -> None:
    with pytest.raises(FinetuneError, match="not found"):
        collect_runs(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FinetuneError, match="no runs found"):
        collect_runs(tmp_path / "empty")


# --- detect_kind -------------------------------------------------------------------------------

def test_detect_kind(methods_sweep: Path, grid_sweep: Path, qat_sweep: Path, tmp_path: Path) -> None:
    assert detect_kind(collect_runs(methods_sweep)) == "lora_vs_qlora"
    assert detect_kind(collect_runs(grid_sweep)) == "lora_grid"
    assert detect_kind(collect_runs(qat_sweep)) == "qat_targets"
    one = tmp_path / "one"
    write_job(one, 0, [], cls_metrics("lora", "none", 2000.0, 1000.0, 0.9, 811_008))
    write_job(one, 1, ["seed=1"], cls_metrics("lora", "none", 2010.0, 990.0, 0.91, 811_008, seed=1))
    assert detect_kind(collect_runs(one)) == "generic"
    single_qat = tmp_path / "single_qat"  # one target set re-run at other bits: the QAT table, PTQ n/a
    write_job(single_qat, 0, ["qat_targets=[attn,ffn]", "qat.bits=6"], qat_metrics(["attn", "ffn"], 0.69, 0.665))
    assert detect_kind(collect_runs(single_qat)) == "qat_targets"
    assert detect_kind(collect_runs(grid_sweep), "generic") == "generic"
    with pytest.raises(FinetuneError, match="unknown report kind 'bogus'"):
        detect_kind(collect_runs(grid_sweep), "bogus")


# --- lora_vs_qlora ------------------------------------------------------------------------------

def test_lora_vs_qlora_report(methods_sweep: Path) -> None:
    paths = build_report(methods_sweep)
    md = paths["markdown"].read_text()
    rows = table_rows(md)
    header, body = rows[0], rows[1:]
    # Runs without peak_in_use_mb (from before it existed) compare on peak_memory_mb.
    assert header[:4] == ["Method", "Peak memory (MB)", "Peak in use (MB)", "Memory vs lora (x)"]
    assert [r[0] for r in body] == ["full", "lora", "dora", "qlora-int8", "qlora-nf4"]
    by = {r[0]: dict(zip(header, r)) for r in body}
    assert by["lora"]["Memory vs lora (x)"] == "1.00x"
    assert by["full"]["Memory vs lora (x)"] == "2.70x"
    assert by["qlora-nf4"]["Memory vs lora (x)"] == "0.55x"
    assert by["qlora-int8"]["Tokens/s vs lora (x)"] == "0.60x"
    assert by["qlora-nf4"]["Accuracy (%)"] == "88.8"
    assert by["lora"]["Trainable params"] == "811.0K / 134.5M"
    assert by["full"]["Weights (MB)"] == "1,800"  # model_memory_mb 5400 / 3
    assert by["full"]["Trainable %"] == "100.00%"
    assert by["dora"]["Peak memory (MB)"] == "failed: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "**Takeaway:** qlora-nf4 uses 0.55x the peak memory of lora at -1.2 pts accuracy" in md
    assert "- Device: cuda" in md and "SmolLM2-135M-Instruct" in md and "chnsenticorp" in md
    assert "![lora_vs_qlora](memory_by_method.png)" in md
    assert_png(paths["plot"])


def test_cpu_memory_ratios_compare_the_memory_in_use_not_the_resident_peak(methods_sweep: Path) -> None:
    """On a CPU the resident peak counts the free memory glibc keeps, which differs between identical runs: with
    every run reporting its peak in use, the ratios, the takeaway and the plot compare that instead."""
    import json

    # Resident peaks that order the methods wrongly (a high-RSS-mode LoRA run), peaks in use that do not.
    in_use = {"qlora-nf4": 900.0, "lora": 1000.0, "full": 2500.0, "qlora-int8": 950.0}
    rss = {"qlora-nf4": 1800.0, "lora": 1700.0, "full": 3300.0, "qlora-int8": 2000.0}
    for job in methods_sweep.iterdir():
        path = job / "metrics.json"
        if not path.exists():
            continue
        m = json.loads(path.read_text())
        if m["status"] == "ok":
            m.update(peak_memory_mb=rss[m["method"]], peak_in_use_mb=in_use[m["method"]], memory_device="cpu")
            path.write_text(json.dumps(m))
    paths = build_report(methods_sweep)
    md = paths["markdown"].read_text()
    rows = table_rows(md)
    header = rows[0]
    by = {r[0]: dict(zip(header, r)) for r in rows[1:]}
    assert header[:4] == ["Method", "Peak memory (MB)", "Peak in use (MB)", "In use vs lora (x)"]
    assert by["qlora-nf4"]["In use vs lora (x)"] == "0.90x"  # on the resident peaks it would read 1.06x
    assert by["full"]["In use vs lora (x)"] == "2.50x"
    assert by["qlora-nf4"]["Peak memory (MB)"] == "1,800" and by["qlora-nf4"]["Peak in use (MB)"] == "900"
    assert "**Takeaway:** qlora-nf4 uses 0.90x the peak memory in use of lora" in md
    assert "Memory ratios compare the peak memory in use" in md
    assert_png(paths["plot"])
    report = generate_report(methods_sweep)
    assert report.comparison.memory_column == "peak_in_use_mb"
    # One run without the figure: every ratio falls back to the resident peak, so all rows compare alike.
    lora = methods_sweep / "1" / "metrics.json"
    m = json.loads(lora.read_text())
    del m["peak_in_use_mb"]
    lora.write_text(json.dumps(m))
    report = generate_report(methods_sweep)
    assert report.comparison.memory_column == "peak_memory_mb"
    assert report.comparison.table.set_index("Method").loc["qlora-nf4", "Memory vs lora (x)"] == f"{1800 / 1700:.2f}x"


def test_ratios_fall_back_to_first_ok_row(methods_sweep: Path) -> None:
    import shutil
    shutil.rmtree(methods_sweep / "1")  # drop the lora job
    report = generate_report(methods_sweep)
    assert report.comparison.baseline == "full"
    assert "Memory vs full (x)" in report.comparison.table.columns
    nf4 = report.comparison.table.set_index("Method").loc["qlora-nf4"]
    assert nf4["Memory vs full (x)"] == f"{1100 / 5400:.2f}x"
    assert "No finished lora run: ratios are relative to full" in report.markdown


def test_csv_has_all_rows_and_is_reproducible(methods_sweep: Path) -> None:
    first = build_report(methods_sweep)["csv"].read_text()
    second = build_report(methods_sweep)["csv"].read_text()
    assert first == second
    df = pd.read_csv(methods_sweep / "comparison.csv")
    assert len(df) == 5 and {"peak_memory_mb", "lora.r", "error", "overrides"} <= set(df.columns)
    assert df.set_index("method").loc["dora", "status"] == "failed"


# --- qat_targets --------------------------------------------------------------------------------

def test_qat_report(qat_sweep: Path) -> None:
    report = generate_report(qat_sweep)
    table = report.comparison.table
    assert list(table["Targets"]) == ["none", "attn", "ffn", "attn+ffn"]
    row = table.set_index("Targets").loc["attn+ffn"]
    assert row["INT8 drop (pts)"] == "0.3" and row["SNR attn (dB)"] == "31.5" and row["Modules quantized"] == "60"
    assert table.set_index("Targets").loc["none", "INT8 drop (pts)"] == "5.1"
    assert table.set_index("Targets").loc["none", "SNR ffn (dB)"] == "n/a"
    # Each QAT row is set against the no-QAT run quantized on the same targets (post-training quantization).
    by = table.set_index("Targets")
    assert list(by["PTQ INT8 accuracy (%)"]) == ["n/a", "87.0", "88.0", "84.9"]
    assert list(by["QAT vs PTQ (pts)"]) == ["n/a", "+1.0", "-0.5", "+4.4"]
    assert report.comparison.takeaway == (
        "attn+ffn QAT has the highest INT8 accuracy: 89.3% vs 84.9% for the run without QAT on the same targets "
        "(90.0% in full precision); in INT8, QAT matches or beats PTQ of the same targets on 2 of 3 target sets (attn +1.0, ffn -0.5, "
        "attn+ffn +4.4 pts)")
    assert_png(report.paths["plot"])
    # the arms are compared in a fixed order, not ranked: no row's test score is a selected one
    assert "- Compared on: accuracy on the test split, arm by arm in a fixed order" in report.markdown
    assert "Ranked on" not in report.markdown and "selected, optimistic" not in report.markdown


def test_qat_generation_uses_perplexity(tmp_path: Path) -> None:
    root = tmp_path / "qat_gen"
    for num, (targets, ppl, ppl8) in enumerate([([], 12.0, 15.5), (["attn", "ffn"], 12.2, 12.6)]):
        metrics = qat_metrics(targets, 0.0, 0.0)
        for key in ("accuracy", "f1", "accuracy_int8", "f1_int8", "zero_shot_accuracy", "zero_shot_f1"):
            metrics.pop(key)
        metrics.update(task="generation", dataset="alpaca", perplexity=ppl, perplexity_int8=ppl8)
        write_job(root, num, [], metrics)
    report = generate_report(root)
    assert report.comparison.kind == "qat_targets"
    assert list(report.comparison.table.columns[:4]) == [
        "Targets", "Perplexity", "INT8 perplexity", "INT8 increase (ppl)"]
    assert list(report.comparison.table["INT8 increase (ppl)"]) == ["3.50", "0.40"]
    assert report.comparison.takeaway.startswith(
        "attn+ffn QAT has the lowest INT8 perplexity: 12.60 vs 15.50 for the run without QAT on the same targets "
        "(12.00 in full precision)")
    assert list(report.comparison.table["QAT vs PTQ (ppl)"]) == ["n/a", "-2.90"]
    assert "QAT matches or beats PTQ of the same targets on 1 of 1 target sets (attn+ffn -2.90 ppl)" \
        in report.comparison.takeaway
    assert_png(report.paths["plot"])


def test_qat_report_names_the_simulated_bit_width(qat_sweep: Path) -> None:
    for job in qat_sweep.iterdir():
        if (job / "metrics.json").is_file():
            m = json.loads((job / "metrics.json").read_text())
            (job / "metrics.json").write_text(json.dumps({**m, "int8_eval_bits": 4}))
    report = generate_report(qat_sweep)
    assert {"INT4 accuracy (%)", "PTQ INT4 accuracy (%)", "INT4 drop (pts)"} <= set(report.comparison.table.columns)
    assert "in INT4, QAT matches or beats PTQ" in report.comparison.takeaway
    assert_png(report.paths["plot"])


def write_seeded_qat_sweep(root: Path, runs: dict[int, dict]) -> None:
    """One job per (seed, targets): ``runs[seed]`` maps a target list (as "attn+ffn") to its scores, the no-QAT
    entry ``"none"`` to (fp, {PTQ target set: INT8 accuracy}); F1 is always accuracy - 0.02."""
    num = 0
    for seed, by_target in runs.items():
        for label, scores in by_target.items():
            targets = [] if label == "none" else label.split("+")
            if label == "none":
                fp, ptq = scores
                m = qat_metrics([], fp, ptq["attn+ffn"], seed=seed)
                m.update(int8_eval="ptq", f1_int8=ptq["attn+ffn"] - 0.02,
                         **{f"{k}_{t}": ptq[t] - 0.02 * (k == "f1_int8") for t in ("attn", "ffn")
                            for k in ("accuracy_int8", "f1_int8")})
            else:
                m = qat_metrics(targets, *scores, seed=seed)
                m["f1_int8"] = scores[1] - 0.02
            m["f1"] = m["accuracy"] - 0.02
            write_job(root, num, [f"qat_targets=[{','.join(targets)}]", f"seed={seed}"], m)
            num += 1


def test_qat_report_over_seeds_pairs_each_run_with_the_ptq_run_of_its_own_seed(tmp_path: Path) -> None:
    root = tmp_path / "qat_seeds" / "2025-01-04_10-00-00"
    ptq1 = {"attn": 0.70, "ffn": 0.74, "attn+ffn": 0.60}   # seed 1: the no-QAT run is weak in INT8
    ptq2 = {"attn": 0.86, "ffn": 0.85, "attn+ffn": 0.80}   # seed 2: strong
    write_seeded_qat_sweep(root, {
        1: {"none": (0.80, ptq1), "attn": (0.81, 0.78), "attn+ffn": (0.79, 0.75)},
        2: {"none": (0.90, ptq2), "attn": (0.88, 0.84), "attn+ffn": (0.89, 0.87)},
    })
    report = generate_report(root)
    comp = report.comparison
    runs = comp.table
    assert list(runs["Targets"]) == ["none", "none", "attn", "attn", "attn+ffn", "attn+ffn"]
    assert list(runs["Seed"]) == ["1", "2"] * 3
    # Paired by seed: seed 1's attn run against seed 1's PTQ (70.0), seed 2's against seed 2's (86.0).
    assert list(runs["PTQ INT8 accuracy (%)"]) == ["n/a", "n/a", "70.0", "86.0", "60.0", "80.0"]
    assert list(runs["QAT vs PTQ (pts)"]) == ["n/a", "n/a", "+8.0", "-2.0", "+15.0", "+7.0"]
    assert list(runs["PTQ INT8 F1 (%)"]) == ["n/a", "n/a", "68.0", "84.0", "58.0", "78.0"]
    summary = comp.summary.set_index("Targets")
    assert list(summary.index) == ["none", "attn", "attn+ffn"]
    assert summary.loc["attn", "Runs"] == "2"
    assert summary.loc["attn", "Accuracy (%)"] == "84.5" and summary.loc["attn", "PTQ INT8 accuracy (%)"] == "78.0"
    # mean (+8 - 2) / 2 = +3.0; standard error = sd / sqrt(2) = 7.07 / 1.41 = 5.0
    assert summary.loc["attn", "QAT vs PTQ (pts, mean ± SE)"] == "+3.0 ± 5.0"
    assert summary.loc["attn", "QAT ≥ PTQ (runs)"] == "1/2"
    assert summary.loc["attn+ffn", "QAT vs PTQ (pts, mean ± SE)"] == "+11.0 ± 4.0"
    assert summary.loc["attn+ffn", "QAT ≥ PTQ (runs)"] == "2/2"
    assert summary.loc["none", "QAT vs PTQ (pts, mean ± SE)"] == "n/a"
    assert summary.loc["none", "INT8 accuracy (%)"] == "70.0"
    # attn and attn+ffn both deploy at 81.0% on average: a tie is named as one
    assert comp.takeaway.startswith("Over 2 seeds (mean ± standard error of the paired difference): attn and "
                                    "attn+ffn QAT have the highest mean INT8 accuracy: 81.0% (the run without QAT: "
                                    "85.0% in full precision)")
    assert ("QAT matches or beats PTQ of the same targets on average on 2 of 2 target sets (attn +3.0 ± 5.0, "
            "attn+ffn +11.0 ± 4.0 pts); F1 attn +3.0 ± 5.0, attn+ffn +11.0 ± 4.0 pts") in comp.takeaway
    md = report.markdown
    assert md.index("## Mean over seeds") < md.index("## Every run")
    rows = table_rows(md)
    assert [r[:2] for r in rows if r[0] == "Targets"] == [["Targets", "Runs"], ["Targets", "Seed"]]
    assert ["attn+ffn", "2", "84.0"] in [r[:3] for r in rows]   # 2 runs, mean accuracy (79 + 89) / 2
    assert_png(report.paths["plot"])
    assert "plot_vs_best_ptq" not in report.paths  # no qat.baselines scored: round-to-nearest is the QAT plot's


def test_qat_report_pairs_each_run_with_the_strongest_ptq_baseline_of_its_seed(tmp_path: Path) -> None:
    """Where the no-QAT runs scored qat.baselines, the summary adds the best baseline on the same targets (by
    accuracy, round-to-nearest included) and QAT's paired difference to it."""
    root = tmp_path / "qkd_regime"
    write_seeded_qat_sweep(root, {
        1: {"none": (0.80, {"attn": 0.70, "ffn": 0.50, "attn+ffn": 0.45}), "ffn": (0.76, 0.72)},
        2: {"none": (0.82, {"attn": 0.80, "ffn": 0.55, "attn+ffn": 0.52}), "ffn": (0.78, 0.74)},
    })
    best = {1: {"token": 0.60, "smoothquant-0.5": 0.78}, 2: {"token": 0.70, "smoothquant-0.5": 0.69}}
    # round-off ranges: seed 1's QAT and best baseline lie apart, seed 2's overlap (QAT 73-75, token 69-74.5)
    spreads = {(1, "qat"): [0.71, 0.73], (1, "smoothquant-0.5"): [0.77, 0.79], (2, "qat"): [0.73, 0.75],
               (2, "token"): [0.69, 0.745]}
    for job in root.iterdir():
        m = json.loads((job / "metrics.json").read_text())
        m.update(majority_accuracy=0.686, majority_f1=0.407)
        if m["qat_targets"] == []:
            m["ptq_baselines"] = {name: {"scale": "tensor", "ffn": {
                "accuracy_int8": acc, "f1_int8": acc - 0.02,
                **({"accuracy_int8_spread": spreads[m["seed"], name]} if (m["seed"], name) in spreads else {})}}
                for name, acc in best[m["seed"]].items()}
        else:
            m["accuracy_int8_spread"] = spreads[m["seed"], "qat"]
        (job / "metrics.json").write_text(json.dumps(m))
    report = generate_report(root)
    summary = report.comparison.summary.set_index("Targets")
    # seed 1: smoothquant-0.5 (78.0) beats QAT (72.0) by 6 points; seed 2: token (70.0) loses to QAT (74.0) by 4
    assert summary.loc["ffn", "Best PTQ INT8 (baseline)"] == "74.0 (smoothquant-0.5/token)"
    assert any("best test score" in note and "flatters PTQ" in note for note in report.comparison.notes)
    assert summary.loc["ffn", "QAT vs best PTQ (pts, mean ± SE)"] == "-1.0 ± 5.0"
    assert summary.loc["ffn", "Beyond round-off (runs)"] == "1/2"  # seed 2's +4 points lie within round-off
    assert report.comparison.takeaway.endswith(
        "against the strongest PTQ baseline: ffn -1.0 ± 5.0 pts (smoothquant-0.5/token, 74.0; beyond round-off on 1 of "
        "2 seeds)")
    by_seed = report.comparison.table.set_index(["Targets", "Seed"])
    assert by_seed.loc[("ffn", "1"), "QAT vs best PTQ (pts)"] == "-6.0"
    assert by_seed.loc[("ffn", "2"), "QAT vs best PTQ (pts)"] == "+4.0 (within round-off)"
    assert summary.loc["none", "Beyond round-off (runs)"] == "n/a"
    assert summary.loc["ffn", "QAT vs PTQ (pts, mean ± SE)"] == "+20.5 ± 1.5"  # round-to-nearest alone
    assert summary.loc["none", "Best PTQ INT8 (baseline)"] == "n/a"
    heading, baselines = report.comparison.extra[0]
    assert heading.startswith("PTQ baselines")
    by_name = baselines.set_index("PTQ baseline")
    assert by_name.loc["rtn", "Per run accuracy (%)"] == "50.0, 55.0" and by_name.loc["rtn", "Targets"] == "ffn"
    assert by_name.loc["smoothquant-0.5", "Mean accuracy (%)"] == "73.5"  # (78 + 69) / 2
    assert by_name.loc["token", "Mean F1 (%)"] == "63.0" and by_name.loc["token", "Runs"] == "2"
    assert "## PTQ baselines" in report.markdown and "| smoothquant-0.5 |" in report.markdown
    assert ("Always answering the majority label scores 68.6% accuracy (macro-F1 40.7%) on these test rows"
            in report.markdown)
    # the paired differences to the strongest baseline as a figure, beside the QAT plot
    assert_png(report.paths["plot_vs_best_ptq"])
    assert report.paths["plot_vs_best_ptq"].name in report.markdown


def test_the_strongest_ptq_baseline_is_chosen_on_validation_and_compared_on_test(tmp_path: Path) -> None:
    """Where the no-QAT runs scored round-to-nearest and their baselines on the validation split too
    (ptq_validation), the strongest is the best there and its test score is the one QAT is compared with: the test
    split is not searched over. The report says how it chose."""
    root = tmp_path / "qkd_regime"
    write_seeded_qat_sweep(root, {
        1: {"none": (0.80, {"attn": 0.70, "ffn": 0.50, "attn+ffn": 0.45}), "ffn": (0.76, 0.72)},
        2: {"none": (0.82, {"attn": 0.80, "ffn": 0.55, "attn+ffn": 0.52}), "ffn": (0.78, 0.74)},
    })
    test = {1: {"token": 0.60, "smoothquant-0.5": 0.78}, 2: {"token": 0.70, "smoothquant-0.5": 0.69}}
    # on validation token leads on seed 1 (where smoothquant-0.5 leads on test), round-to-nearest on seed 2
    validation = {1: {"rtn": 0.50, "token": 0.81, "smoothquant-0.5": 0.79},
                  2: {"rtn": 0.84, "token": 0.70, "smoothquant-0.5": 0.83}}
    for job in root.iterdir():
        m = json.loads((job / "metrics.json").read_text())
        if m["qat_targets"] == []:
            m["ptq_baselines"] = {name: {"scale": "tensor", "ffn": {"accuracy_int8": acc, "f1_int8": acc - 0.02}}
                                  for name, acc in test[m["seed"]].items()}
            m["ptq_validation"] = {"ffn": {name: {"accuracy_int8": acc, "f1_int8": acc}
                                           for name, acc in validation[m["seed"]].items()}}
        (job / "metrics.json").write_text(json.dumps(m))
    report = generate_report(root)
    summary = report.comparison.summary.set_index("Targets")
    # seed 1: token's test 60.0 (not smoothquant-0.5's 78.0); seed 2: round-to-nearest's test 55.0
    assert summary.loc["ffn", "Best PTQ INT8 (baseline)"] == "57.5 (rtn/token)"
    assert summary.loc["ffn", "QAT vs best PTQ (pts, mean ± SE)"] == "+15.5 ± 3.5"   # (72 - 60, 74 - 55)
    assert any("best validation score" in note for note in report.comparison.notes)
    by_name = report.comparison.extra[0][1].set_index("PTQ baseline")
    assert by_name.loc["token", "Mean validation accuracy (%)"] == "75.5"   # (81 + 70) / 2
    assert by_name.loc["rtn", "Mean validation accuracy (%)"] == "67.0"
    # the takeaway names both comparisons: round-to-nearest, then the strongest baseline of each seed
    takeaway = report.comparison.takeaway
    assert "QAT matches or beats round-to-nearest PTQ of the same targets on average" in takeaway
    assert takeaway.endswith("; against the strongest PTQ baseline: ffn +15.5 ± 3.5 pts (rtn/token, 57.5)")


def test_one_seeds_qat_run_is_set_against_the_strongest_ptq_baseline_in_the_table_and_the_takeaway(
        tmp_path: Path) -> None:
    """A single seed (the study under way): each QAT row shows the strongest baseline of its plain run beside
    round-to-nearest, and the takeaway says where QAT loses to it, not only that it beats round-to-nearest."""
    root = tmp_path / "qkd_regime"
    write_seeded_qat_sweep(root, {1: {"none": (0.83, {"attn": 0.82, "ffn": 0.43, "attn+ffn": 0.45}),
                                      "ffn": (0.70, 0.73)}})
    for job in root.iterdir():
        m = json.loads((job / "metrics.json").read_text())
        if m["qat_targets"] == []:
            m["ptq_baselines"] = {name: {"scale": "tensor", "ffn": {"accuracy_int8": acc, "f1_int8": acc}}
                                  for name, acc in (("token", 0.835), ("smoothquant-0.8", 0.83))}
            m["ptq_validation"] = {"ffn": {"rtn": {"accuracy_int8": 0.41}, "token": {"accuracy_int8": 0.82},
                                           "smoothquant-0.8": {"accuracy_int8": 0.845}}}
        (job / "metrics.json").write_text(json.dumps(m))
    comparison = generate_report(root).comparison
    row = comparison.table.set_index("Targets").loc["ffn"]
    assert row["Best PTQ INT8 (accuracy, %)"] == "83.0 (smoothquant-0.8)"   # the best on validation, its test score
    assert row["QAT vs best PTQ (pts)"] == "-10.0" and row["QAT vs PTQ (pts)"] == "+30.0"
    assert "QAT matches or beats round-to-nearest PTQ of the same targets on 1 of 1" in comparison.takeaway
    assert comparison.takeaway.endswith("; against the strongest PTQ baseline: ffn -10.0 pts (smoothquant-0.8, 83.0)")
    assert any("best validation score" in note for note in comparison.notes)


def test_one_seeds_difference_to_the_strongest_baseline_says_when_it_is_within_round_off(tmp_path: Path) -> None:
    """A single seed's QAT run 0.8 points above its strongest baseline, their round-off ranges overlapping: the table
    and the takeaway say the difference is within round-off, not a win; a run whose range lies apart is beyond it."""
    root = tmp_path / "qkd_regime"
    write_seeded_qat_sweep(root, {1: {"none": (0.83, {"attn": 0.82, "ffn": 0.43, "attn+ffn": 0.73}),
                                      "attn+ffn": (0.59, 0.818)}})
    distilled = qat_metrics(["attn", "ffn"], 0.634, 0.786, seed=1)
    distilled.update(distill={"mode": "self"}, accuracy_int8_spread=[0.774, 0.787])
    write_job(root, 7, ["qat_targets=[attn,ffn]", "seed=1", "distill=self"], distilled)
    for job in root.iterdir():
        m = json.loads((job / "metrics.json").read_text())
        if m["qat_targets"] == []:
            m["ptq_baselines"] = {"smoothquant-0.5": {"scale": "tensor", "attn+ffn": {
                "accuracy_int8": 0.811, "f1_int8": 0.786, "accuracy_int8_spread": [0.811, 0.816]}}}
        elif "distill" not in m:
            m["accuracy_int8_spread"] = [0.796, 0.818]
        (job / "metrics.json").write_text(json.dumps(m))
    comparison = generate_report(root).comparison
    by = comparison.table.set_index("Targets")["QAT vs best PTQ (pts)"]
    assert by["attn+ffn"] == "+0.7 (within round-off)" and by["attn+ffn QKD-self"] == "-2.5"
    assert comparison.takeaway.endswith(
        "against the strongest PTQ baseline: attn+ffn +0.7 pts (smoothquant-0.5, 81.1; within round-off), "
        "attn+ffn QKD-self -2.5 pts (smoothquant-0.5, 81.1; beyond round-off)")


def test_the_takeaway_leads_with_the_best_deployment_not_with_a_collapsed_runs_small_drop(tmp_path: Path) -> None:
    """A QAT run whose full precision collapsed to the majority class loses nothing to quantization (its INT8
    score is above its own full precision): the takeaway must not name it as the best because its drop is the
    smallest, but the arm with the highest deployed score."""
    root = tmp_path / "qkd_regime"
    write_seeded_qat_sweep(root, {1: {"none": (0.829, {"attn": 0.82, "ffn": 0.429, "attn+ffn": 0.40}),
                                      "ffn": (0.697, 0.729)}})
    distilled = qat_metrics(["ffn"], 0.823, 0.758, seed=1)
    distilled["distill"] = {"mode": "run", "alpha": 0.5, "temperature": 2.0}
    write_job(root, 7, ["qat_targets=[ffn]", "seed=1", "distill=run"], distilled)
    comparison = generate_report(root).comparison
    drops = comparison.table.set_index("Targets")["INT8 drop (pts)"]
    assert drops["ffn"] == "-3.2" and drops["ffn QKD-run"] == "6.5"   # the collapsed run loses least
    assert comparison.takeaway.startswith(
        "ffn QKD-run QAT has the highest INT8 accuracy: 75.8% vs 42.9% for the run without QAT on the same targets "
        "(82.9% in full precision); in INT8, QAT matches or beats PTQ of the same targets on 2 of 2 target sets")
    assert "smallest" not in comparison.takeaway


def test_a_qat_sweep_whose_qat_runs_have_not_finished_does_not_say_qat_does_not_help(tmp_path: Path) -> None:
    root = tmp_path / "qkd_regime"
    write_seeded_qat_sweep(root, {1: {"none": (0.80, {"attn": 0.70, "ffn": 0.50, "attn+ffn": 0.45})}})
    write_job(root, 1, ["qat_targets=[ffn]", "seed=1"], {"status": "failed", "error": "stopped by SIGTERM"})
    takeaway = generate_report(root).comparison.takeaway
    assert takeaway.startswith("No QAT run has finished: the run without QAT alone") and "does not help" not in takeaway


def test_qat_report_over_seeds_without_a_baseline_for_a_seed(tmp_path: Path) -> None:
    """A seed whose no-QAT run failed: its QAT runs have no PTQ pair and are left out of the paired mean."""
    root = tmp_path / "qat_seeds"
    write_seeded_qat_sweep(root, {1: {"none": (0.80, {"attn": 0.70, "ffn": 0.74, "attn+ffn": 0.60}),
                                      "ffn": (0.81, 0.77)},
                                  2: {"ffn": (0.88, 0.84)}})
    write_job(root, 9, ["qat_targets=[]", "seed=2"], {"status": "failed", "error": "killed", "seed": 2})
    comp = generate_report(root).comparison
    by = comp.table.set_index(["Targets", "Seed"])
    assert by.loc[("ffn", "2"), "PTQ INT8 accuracy (%)"] == "n/a"
    assert by.loc[("none", "2"), "Accuracy (%)"] == "failed: killed"
    summary = comp.summary.set_index("Targets")
    assert summary.loc["ffn", "Runs"] == "2" and summary.loc["ffn", "QAT ≥ PTQ (runs)"] == "1/1"
    assert summary.loc["ffn", "QAT vs PTQ (pts, mean ± SE)"] == "+3.0"   # one pair: no standard error


def test_qat_report_over_seeds_for_generation_counts_lower_perplexity_as_the_win(tmp_path: Path) -> None:
    root = tmp_path / "qat_gen_seeds"
    runs = [(1, [], 12.0, 15.0, {"perplexity_int8_attn": 13.0}), (1, ["attn"], 12.1, 12.5, {}),
            (2, [], 11.0, 14.0, {"perplexity_int8_attn": 11.5}), (2, ["attn"], 11.2, 12.0, {})]
    for num, (seed, targets, ppl, ppl8, extra) in enumerate(runs):
        metrics = qat_metrics(targets, 0.0, 0.0, seed=seed)
        for key in ("accuracy", "f1", "accuracy_int8", "f1_int8", "zero_shot_accuracy", "zero_shot_f1"):
            metrics.pop(key)
        metrics.update(task="generation", dataset="alpaca", perplexity=ppl, perplexity_int8=ppl8, **extra)
        write_job(root, num, [f"seed={seed}"], metrics)
    comp = generate_report(root).comparison
    assert list(comp.table["PTQ INT8 perplexity"]) == ["n/a", "n/a", "13.00", "11.50"]   # seed 1, then seed 2
    attn = comp.summary.set_index("Targets").loc["attn"]
    # QAT - PTQ: 12.5 - 13.0 = -0.5 (better), 12.0 - 11.5 = +0.5 (worse): mean 0.00, SE 0.50, one win of two
    assert attn["QAT vs PTQ (ppl, mean ± SE)"] == "+0.00 ± 0.50" and attn["QAT ≤ PTQ (runs)"] == "1/2"
    assert "F1" not in comp.takeaway and "(attn +0.00 ± 0.50 ppl)" in comp.takeaway


def test_qat_runs_repeated_without_other_seeds_are_not_averaged(qat_sweep: Path) -> None:
    """Two jobs of the same targets and seed (say, two learning rates) are listed, never averaged as seeds."""
    write_job(qat_sweep, 4, ["qat_targets=[attn]", "trainer.lr=1e-4"], qat_metrics(["attn"], 0.85, 0.84))
    comp = generate_report(qat_sweep).comparison
    assert comp.summary is None and "Seed" not in comp.table.columns
    assert list(comp.table["Targets"]) == ["none", "attn #1", "attn #4", "ffn", "attn+ffn"]


# --- lora_grid ----------------------------------------------------------------------------------

def test_grid_report_sorted_best_first(grid_sweep: Path) -> None:
    report = generate_report(grid_sweep)
    table = report.comparison.table
    assert list(table.columns) == ["r", "alpha", "dropout", "Accuracy (%)", "Eval loss", "Train time (s)"]
    expected = sorted(((r, a, d) for r in (4, 8) for a in (8, 16) for d in (0.0, 0.1)),
                      key=lambda k: -grid_accuracy(*k))
    assert [(int(r), int(a), float(d)) for r, a, d in table.iloc[:8, :3].to_numpy()] == expected
    assert table.iloc[0]["Accuracy (%)"] == "84.0"
    assert table.iloc[-1].tolist()[:4] == ["16", "32", "0.1", "failed: no metrics.json (job did not finish)"]
    assert report.comparison.takeaway == (
        "Best: r=8, alpha=16, dropout=0 -> accuracy 84.0% (+3.5 pts vs the worst, r=4, alpha=8, dropout=0.1)")
    assert_png(report.paths["plot"])


def test_grid_explicit_metric(grid_sweep: Path) -> None:
    report = generate_report(grid_sweep, metric="eval_loss")
    assert report.comparison.metric == "eval_loss" and not report.comparison.higher_is_better
    losses = [float(v) for v in report.comparison.table["Eval loss"].iloc[:8]]
    assert losses == sorted(losses)
    with pytest.raises(FinetuneError, match="metric 'bleu' not found"):
        generate_report(grid_sweep, metric="bleu")


def test_grid_selects_on_validation_and_shows_test_beside(tmp_path: Path) -> None:
    """Runs that record a validation score are ranked on it; the test score is shown, never used to pick."""
    root = tmp_path / "grid" / "2025-01-03_08-00-00"
    # validation and test disagree on which rank is best
    for num, (r, val, test) in enumerate(((4, 0.80, 0.86), (8, 0.84, 0.81), (16, 0.82, 0.83))):
        write_job(root, num, [f"lora.r={r}"], cls_metrics(
            "lora", "none", 2000.0, 1000.0, test, 811_008, val_accuracy=val, val_f1=val - 0.01,
            lora={"r": r, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}))
    report = generate_report(root)
    comp = report.comparison
    assert comp.metric == "val_accuracy" and comp.higher_is_better
    assert list(comp.table["r"]) == ["8", "16", "4"]
    assert "Validation accuracy (%)" in comp.table.columns and "Accuracy (%)" in comp.table.columns
    assert comp.table.iloc[0]["Accuracy (%)"] == "81.0"  # the selected run's test score, not the best test score
    assert "validation accuracy 84.0%" in comp.takeaway
    assert "Selected on the validation split" in report.markdown
    # ranked on test when asked: a selected number, and the report does not claim the runs lack a validation score
    asked = generate_report(root, metric="accuracy").markdown
    assert "Ranked on the test split (accuracy): as asked (`metric=`), though the runs have a validation score" in asked
    assert "have no validation score" not in asked


def test_objective_is_the_validation_score() -> None:
    from finetune.cli.train import objective

    assert objective({"accuracy": 0.9, "val_accuracy": 0.7, "eval_loss": 0.3}) == 0.7
    assert objective({"eval_loss": 0.3, "perplexity": 1.2, "test_loss": 0.1}) == -0.3


# --- formatting, CLI, callback ------------------------------------------------------------------

def test_markdown_table_alignment_and_escaping() -> None:
    text = markdown_table(pd.DataFrame([["a|b", "1.5"], ["c", "10.25"]], columns=["name", "value"]))
    lines = text.splitlines()
    assert lines[0] == "| name | value |"
    assert lines[1] == "|------|------:|"
    assert lines[2] == "| a\\|b |   1.5 |"


def test_cli_prints_table_and_paths(methods_sweep: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(methods_sweep), "--metric", "f1"]) == 0
    out = capsys.readouterr().out
    assert "| qlora-nf4" in out and "F1 (%)" in out
    assert f"wrote {methods_sweep / 'comparison.md'}" in out


def test_cli_metric_with_a_leading_minus_as_its_help_shows(grid_sweep: Path, capsys: pytest.CaptureFixture) -> None:
    """``--metric -eval_loss`` (lower is better), written as the help writes it, not only ``--metric=-eval_loss``."""
    assert main([str(grid_sweep), "--metric", "-eval_loss"]) == 0
    out = capsys.readouterr().out
    assert "Takeaway: Best: r=8, alpha=16, dropout=0 -> eval loss 0.160" in out


def test_cli_usage_mistakes_are_one_error_line_and_exit_2(grid_sweep: Path, capsys: pytest.CaptureFixture) -> None:
    for argv, needle in (([], "the following arguments are required: DIR"),
                         ([str(grid_sweep), "--kind", "foo"], "argument --kind: invalid choice: 'foo'"),
                         ([str(grid_sweep), "--metric"], "argument --metric: expected one argument")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
        assert err[0].endswith("(see finetune-report --help)")


def test_cli_missing_dir_exits_2_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_sweep"
    proc = subprocess.run([sys.executable, "-m", "finetune.cli.report", str(missing)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: sweep directory not found: {missing}"
    assert proc.stdout == ""


def test_callback_builds_report_and_never_raises(qat_sweep: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(qat_sweep)}}, "logger": {"backend": "none"}})
    ReportCallback().on_multirun_end(config, config_name="train")
    assert (qat_sweep / "comparison.md").is_file() and (qat_sweep / "qat_int8.png").is_file()
    bad = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "gone")}}})
    with caplog.at_level(logging.WARNING):
        ReportCallback().on_multirun_end(bad)
    assert "comparison report not built: sweep directory not found" in caplog.text


def test_log_table_to_wandb_is_best_effort(methods_sweep: Path) -> None:
    df = collect_runs(methods_sweep)
    assert log_table_to_wandb(df, {"logger": {"backend": "none"}}) is False
    assert log_table_to_wandb(df, {"logger": {"backend": "wandb", "mode": "disabled"}}) is False
    assert log_table_to_wandb(df, None) is False


def test_hydra_multirun_calls_the_callback(tmp_path: Path) -> None:
    """A real Hydra sweep registers the callback and gets comparison.md in its sweep dir."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(textwrap.dedent("""
        lora: {r: 8, alpha: 16, dropout: 0.05}
        logger: {backend: none}
        hydra:
          sweep: {dir: "sweeps/${now:%H-%M-%S}", subdir: "${hydra.job.num}"}
          callbacks:
            report: {_target_: finetune.report.hydra_callback.ReportCallback}
    """))
    (tmp_path / "app.py").write_text(textwrap.dedent("""
        import json, hydra
        from hydra.core.hydra_config import HydraConfig
        @hydra.main(version_base=None, config_path="conf", config_name="config")
        def run(cfg):
            out = HydraConfig.get().runtime.output_dir
            acc = 0.8 + cfg.lora.r / 100
            json.dump({"status": "ok", "method": "lora", "task": "classification", "accuracy": acc,
                       "lora": {"r": cfg.lora.r, "alpha": 16, "dropout": 0.05}},
                      open(out + "/metrics.json", "w"))
        run()
    """))
    proc = subprocess.run([sys.executable, "app.py", "-m", "lora.r=4,8"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    reports = list((tmp_path / "sweeps").glob("*/comparison.md"))
    assert len(reports) == 1, proc.stderr
    assert "Best: r=8, alpha=16, dropout=0.05 -> accuracy 88.0%" in reports[0].read_text()


def test_generation_methods_report_ranks_on_validation_loss_and_shows_perplexity(tmp_path: Path) -> None:
    root = tmp_path / "gen"
    runs = [("lora", "none", 3000.0, 8.10, 2.10), ("qlora-nf4", "nf4", 1500.0, 8.45, 2.14)]
    for num, (method, quant, peak, ppl, loss) in enumerate(runs):
        metrics = cls_metrics(method, quant, peak, 500.0, 0.0, 811_008, task="generation", dataset="alpaca",
                              perplexity=ppl, eval_loss=loss)
        for key in ("accuracy", "f1", "zero_shot_accuracy", "zero_shot_f1"):
            metrics.pop(key)
        write_job(root, num, [f"quantization={quant}"], metrics)
    report = generate_report(root)
    assert report.comparison.kind == "lora_vs_qlora" and report.comparison.metric == "eval_loss"
    assert "Perplexity" in report.comparison.table.columns and "Accuracy (%)" not in report.comparison.table.columns
    assert report.comparison.takeaway == (
        "qlora-nf4 uses 0.50x the peak memory of lora at +0.040 eval loss and 1.00x its tokens/s")
    assert "Selected on the validation split" in report.markdown


def test_log_table_to_wandb_offline_run(methods_sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials -> an offline W&B run holding the tables, written inside the sweep dir."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for var, sub in (("HOME", "home"), ("NETRC", "home/.netrc"), ("WANDB_CONFIG_DIR", "wbconf"),
                     ("WANDB_CACHE_DIR", "wbcache"), ("WANDB_DATA_DIR", "wbdata")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    (tmp_path / "home").mkdir()
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(methods_sweep)}},
                               "logger": {"backend": "wandb", "mode": "auto", "project": "finetune-test",
                                          "entity": None, "group": None}})
    ReportCallback().on_multirun_end(config)
    runs = list((methods_sweep / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert "WANDB_MODE" not in os.environ  # restored
    assert len(collect_runs(methods_sweep)) == 5  # the wandb folder is not mistaken for jobs


def test_qat_runs_pair_only_with_ptq_simulated_the_same_way(tmp_path: Path) -> None:
    """A static-scale QAT run is never compared with a dynamic (uncalibrated) PTQ baseline, nor a linear-granularity
    one with a sublayer baseline: the simulation's granularity and scale mode are part of the pairing."""
    from finetune.report.collect import collect_runs
    from finetune.report.ptq import ptq_baseline

    root = tmp_path / "qat" / "2025-01-04_09-00-00"
    num = 0
    for scale in ("tensor", "static"):
        for granularity in ("sublayer", "linear"):
            how = {"int8_scale": scale, "int8_granularity": granularity}
            ptq = qat_metrics([], 0.90, 0.85)
            ptq.update(int8_eval="ptq", accuracy_int8_attn=0.80 + num / 100, **how)
            write_job(root, num, ["qat_targets=[]", f"qat.scale={scale}", f"qat.granularity={granularity}"], ptq)
            write_job(root, num + 1, ["qat_targets=[attn]", f"qat.scale={scale}", f"qat.granularity={granularity}"],
                      {**qat_metrics(["attn"], 0.89, 0.88), **how})
            num += 2
    df = collect_runs(root)
    for _, row in df[df["qat_targets"].astype(str) == "attn"].iterrows():
        base = ptq_baseline(df, row)
        assert base is not None
        assert (base["int8_scale"], base["int8_granularity"]) == (row["int8_scale"], row["int8_granularity"])


def test_qat_report_over_schemes_never_pools_them(tmp_path: Path) -> None:
    """A sweep over qat.scheme (the qat_regime preset): means, pairs, plot bars and takeaways are per scheme. Pooled,
    W8A8's broken PTQ (40%) and W4A8's mild one (80%) would average into a number neither scheme has."""
    root = tmp_path / "qat_regime" / "2025-01-05_09-00-00"
    num = 0
    for seed in (1, 2):
        for scheme, ptq_acc, qat_acc in (("w8a8", 0.40, 0.78), ("w4a8", 0.80, 0.82)):
            how = {"int8_scheme": scheme, "int8_granularity": "linear"}
            ptq = qat_metrics([], 0.85, ptq_acc, seed=seed)
            ptq.update(int8_eval="ptq", accuracy_int8_attn=0.84, accuracy_int8_ffn=ptq_acc + 0.01 * seed,
                       f1_int8_attn=0.83, f1_int8_ffn=ptq_acc, **how)
            write_job(root, num, ["qat_targets=[]", f"qat.scheme={scheme}", f"seed={seed}"], ptq)
            write_job(root, num + 1, ["qat_targets=[ffn]", f"qat.scheme={scheme}", f"seed={seed}"],
                      {**qat_metrics(["ffn"], 0.80, qat_acc, seed=seed), **how})
            num += 2
    report = generate_report(root)
    comp = report.comparison
    summary = comp.summary.set_index("Targets")
    assert list(summary.index) == ["W4A8 none", "W4A8 ffn", "W8A8 none", "W8A8 ffn"]
    # Each scheme's ffn run against its own scheme's and seed's PTQ: W8A8 (41, 42) -> +37.0 and +36.0, mean 36.5.
    assert summary.loc["W8A8 ffn", "QAT vs PTQ (pts, mean ± SE)"] == "+36.5 ± 0.5"
    assert summary.loc["W4A8 ffn", "QAT vs PTQ (pts, mean ± SE)"] == "+0.5 ± 0.5"
    assert summary.loc["W8A8 ffn", "Runs"] == "2" and summary.loc["W8A8 none", "low-bit accuracy (%)"] == "40.0"
    runs = comp.table
    assert list(runs["Scheme"]) == ["W4A8"] * 4 + ["W8A8"] * 4
    assert list(runs["Targets"]) == ["none", "none", "ffn", "ffn"] * 2
    assert "W4A8: ffn QAT" in comp.takeaway and "W8A8: ffn QAT" in comp.takeaway
    assert "in W4A8, QAT matches or beats PTQ" in comp.takeaway and "in INT8, QAT matches" in comp.takeaway
    assert "own seed and scheme" in " ".join(comp.notes)
    assert_png(report.paths["plot"])


def test_sweep_outcome_names_every_job_that_did_not_finish(tmp_path: Path) -> None:
    from finetune.report import hydra_callback
    from finetune.report.hydra_callback import SweepOutcomeCallback

    root = tmp_path / "sweep"
    write_job(root, 0, ["lora.r=4"], cls_metrics("lora", "none", 3000.0, 500.0, 0.8, 100))
    write_job(root, 1, ["lora.r=8"], {"status": "failed", "error": "out of memory"})
    write_job(root, 2, ["lora.r=16"], None)  # killed: no metrics.json
    callback = SweepOutcomeCallback()
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(root)}}})
    callback.on_multirun_start(config)
    assert hydra_callback.LAST_SWEEP is None
    callback.on_multirun_end(config)
    outcome = hydra_callback.LAST_SWEEP
    assert (outcome.jobs, outcome.failed) == (3, [("1", "out of memory"), ("2", "no metrics.json (job did not finish)")])
    assert outcome.summary() == (f"2 of 3 jobs of the sweep failed: job 1 (out of memory), job 2 (no metrics.json "
                                 f"(job did not finish)); every job's metrics.json and the report are in {root}")
    # A sweep directory without any job is a failure too; one where every job finished is not.
    (tmp_path / "empty").mkdir()
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "empty")}}}))
    assert len(hydra_callback.LAST_SWEEP.failed) == 1
    ok = tmp_path / "ok"
    write_job(ok, 0, ["lora.r=4"], cls_metrics("lora", "none", 3000.0, 500.0, 0.8, 100))
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(ok)}}}))
    assert hydra_callback.LAST_SWEEP.failed == []


def test_a_generic_report_names_each_job_by_what_sets_it_apart(tmp_path: Path) -> None:
    """Overrides every job shares (the sweep's common settings) say nothing about which job won: the takeaway and the
    plot's labels keep only those that differ, and say so where none does."""
    from finetune.report.tables import varying_overrides

    common = ["model=tiny", "trainer.max_steps=2", "dataset.path=/data/x"]
    sweep = tmp_path / "sweep"
    write_job(sweep, 0, [*common, "seed=0"], cls_metrics("lora", "none", 2000.0, 1000.0, 0.80, 811_008))
    write_job(sweep, 1, [*common, "seed=1"], cls_metrics("lora", "none", 2000.0, 1000.0, 0.85, 811_008, seed=1))
    report = generate_report(sweep, "generic")
    assert report.comparison.takeaway.startswith("Best of 2 runs: job 1 (seed=1) with ")
    assert "model=tiny" not in report.comparison.takeaway and report.paths["plot"].is_file()
    assert varying_overrides(pd.Series(["a=1 b=2", "a=1 b=2"])) == ["same overrides", "same overrides"]
    assert varying_overrides(pd.Series(["", "a=1"])) == ["defaults", "a=1"]
    assert varying_overrides(pd.Series(["a=1 b=2"])) == ["a=1 b=2"]


def test_the_callbacks_every_job_loads_leave_the_report_and_its_plotting_for_a_sweeps_end() -> None:
    """Hydra builds the sweep callbacks in every finetune-train process, single runs included: their module imports
    neither matplotlib nor the report (about 0.5 s of each process's start), which a sweep's end imports itself."""
    import subprocess
    import sys

    probe = ("import sys, finetune.report.hydra_callback; "
             "print(sorted(m for m in ('matplotlib', 'finetune.report.compare', 'finetune.report.plots') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
