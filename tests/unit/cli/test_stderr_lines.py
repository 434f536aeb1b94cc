"""A line a command prints on stderr reaches it in one write, newline included: processes that share a stderr
(the ranks under torchrun, the jobs of a parallel sweep) cannot split it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from finetune.errors import FinetuneError, print_error, say


class Writes:
    def __init__(self):
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("emit, expected", [
    (lambda: say("finetune-train: stopped by SIGTERM after step 2"), "finetune-train: stopped by SIGTERM after step 2\n"),
    (lambda: print_error(FinetuneError("trainer.lr='abc' must be a number\nmore")),
     "error: trainer.lr='abc' must be a number\n"),
])
def test_a_line_is_one_write(monkeypatch, emit, expected):
    stream = Writes()
    monkeypatch.setattr(sys, "stderr", stream)
    emit()
    assert stream.calls == [expected]


def test_two_processes_writing_lines_to_one_pipe_never_share_a_line():
    """Both processes print 3,000 lines to the same pipe from the same moment on; every line arrives whole."""
    script = ("import sys, time; from finetune.errors import say\n"
              "while time.time() < float(sys.argv[2]): pass\n"
              "for i in range(3000): say(f'{sys.argv[1]}-{i}-' + 'x' * 150)\n")
    start = time.time() + 2.0
    read, write = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", script, name, str(start)], stderr=write) for name in "ab"]
    os.close(write)
    with open(read) as pipe:
        lines = pipe.read().splitlines()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert len(lines) == 6000
    assert all(line.count("-") == 2 and line.endswith("x" * 150) and line[0] in "ab" for line in lines)
