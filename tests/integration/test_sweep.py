"""A real Hydra multirun on the tiny model: jobs run, a bad job is recorded as failed while the others
complete, the report is written at the end of the sweep and rebuilds identically from the directory."""

from __future__ import annotations

import csv
import json

from tests.conftest import TINY, shared
from tests.integration.test_cli_e2e import cli


def test_multirun_records_failures_and_writes_the_report(tmp_path):
    sweep_dir = tmp_path / "sweep"
    data = shared("chnsenticorp")
    proc = cli(
        "finetune.train", "-m", *[o for o in TINY if not o.startswith("logger=")], "logger=wandb",
        f"dataset.path={data}", "lora.r=4,8,-1", "sweep_name=test_grid", f"hydra.sweep.dir={sweep_dir}",
    )
    assert proc.returncode == 0
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1", "2"]
    metrics = {j.name: json.loads((j / "metrics.json").read_text()) for j in jobs}
    assert metrics["0"]["status"] == metrics["1"]["status"] == "ok"
    assert metrics["1"]["trainable_params"] == 2 * metrics["0"]["trainable_params"]  # r=8 vs r=4
    assert metrics["2"]["status"] == "failed" and "lora.r=-1" in metrics["2"]["error"]
    # every job of the sweep shares one W&B group named after the sweep folder
    config = (jobs[0] / "config.yaml").read_text()
    assert f"group: {sweep_dir.parent.name}/{sweep_dir.name}" in config or f"group: {'/'.join(sweep_dir.parts[-2:])}" in config

    md = (sweep_dir / "comparison.md").read_text()
    assert "failed" in md and "lora.r=-1" in md
    rows = list(csv.DictReader((sweep_dir / "comparison.csv").open()))
    assert len(rows) == 3 and sorted(r["status"] for r in rows) == ["failed", "ok", "ok"]
    assert list(sweep_dir.glob("*.png")), "no plot written"

    first = (sweep_dir / "comparison.csv").read_text()
    cli("finetune.report", str(sweep_dir))
    assert (sweep_dir / "comparison.csv").read_text() == first
