"""The default test run spreads tests over pytest-xdist workers: each worker, and every process its tests start,
must use only its share of the cores, or two workers' torch threads would oversubscribe the CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import worker_thread_share


def test_each_worker_and_the_processes_it_starts_use_their_share_of_the_cores():
    share = worker_thread_share()
    if share is None:
        pytest.skip("a serial run: torch may use every core")
    if os.environ.get("OMP_NUM_THREADS", str(share)) != str(share):
        pytest.skip("OMP_NUM_THREADS was set by the caller, and the caller's choice is kept")
    assert torch.get_num_threads() == share
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=dict(os.environ),
                         capture_output=True, text=True, timeout=120, check=True)
    assert int(out.stdout.strip()) == share
