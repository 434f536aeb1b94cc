"""The measurement scripts under docs/bench run as their docs say: small sizes, their own checks passing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_attention_variants_agree_and_are_timed(dtype):
    """docs/bench/attention_variants.py checks each formulation against the shared-prefix pass's SDPA call computed in
    fp32 (in bf16 to 2% of each tensor's norm), then times them: small shapes here, so bf16 is quick on any CPU."""
    proc = subprocess.run([sys.executable, str(ROOT / "docs/bench/attention_variants.py"), "--rows", "2", "--heads",
                           "2", "--prefix", "5", "--suffix", "20", "--head-dim", "8", "--dtype", dtype],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"[2, 2, 5 + 20, 8] {dtype}, forward + backward" in proc.stdout
    assert proc.stdout.count(": largest") == 4 and "plain, 4 query blocks: " in proc.stdout
