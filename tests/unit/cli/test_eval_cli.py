"""finetune-eval argument errors: one line naming the key, exit 2."""

from __future__ import annotations

import pytest

from finetune.cli.evaluate import main


@pytest.mark.parametrize("argv,fragment", [
    (["run=/tmp", "batch_size=abc"], "batch_size=abc"),
    (["run=/tmp", "batch_size=0"], "batch_size=0"),
    (["foo"], "not key=value"),
    (["run=/tmp", "lr=1"], "unknown key 'lr'"),
    (["split=test"], "missing run="),
    (["run=/nonexistent/run"], "no such run directory"),
    (["run=/tmp", "harness=helm"], "harness"),
    (["run=/tmp", "tasks=hellaswag"], "give harness=lm_eval"),
    (["run=/tmp", "harness=lm_eval", "tasks=,"], "at least one"),
    (["run=/tmp", "harness=lm_eval", "limit=0"], "limit=0"),
])
def test_bad_arguments_exit_2_with_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0]
