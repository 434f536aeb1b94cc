"""A plain (non-editable) install carries the Hydra configs: `pip install .` then `finetune-train` from anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import CONF, ROOT


def test_wheel_carries_every_config_and_its_finetune_train_runs_from_another_directory(tmp_path: Path) -> None:
    # Built from a copy, so that the build's own folders (build/, *.egg-info) never land in the working tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "finetune", src / "finetune", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True, text=True)
    (wheel,) = dist.glob("finetune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(f"finetune/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml"))
    assert len(configs) > 30 and "finetune/conf/train.yaml" in configs
    assert [c for c in configs if c not in names] == []

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    which = subprocess.run([sys.executable, "-c", "import finetune; print(finetune.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True)
    assert Path(which.stdout.strip()).is_relative_to(site)  # the installed copy, not the source tree
    proc = subprocess.run([str(site / "bin" / "finetune-train"), "--cfg", "job", "model=tiny", "qat_targets=[ffn]"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name_or_path: random:llama" in proc.stdout and "targets:" in proc.stdout
    # The user's mistakes are still one-line errors from the installed copy (the config tree is found).
    bad = subprocess.run([str(site / "bin" / "finetune-train"), "quantization=nf8"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "nf8" in bad.stderr
    assert list(elsewhere.iterdir()) == []  # --cfg and a refused command write nothing
