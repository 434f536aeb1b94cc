"""finetune-merge: fold a run's LoRA/DoRA adapter into its base and write a standalone checkpoint
(:mod:`finetune.export.merge` does the work).

    finetune-merge run=outputs/<date>/<time> out=merged/                 # fp32 safetensors + tokenizer
    finetune-merge run=... out=merged-bf16/ dtype=bfloat16 overwrite=true
"""

from __future__ import annotations

import sys

from finetune.checks import as_bool, as_choice, parse_kv
from finetune.cli.common import run_cli
from finetune.errors import print_error
from finetune.export.merge import ARGS, BASES, MergeCheckError, merge_run
from finetune.model.load import allow_remote_code


def check_args(argv: list[str]) -> dict:
    """The arguments, typed and checked before any model loads.

    Raises:
        FinetuneError: an unknown or missing key, or a bad value, in one line.
    """
    args, _ = parse_kv(argv, ARGS, ("run", "out"), " (finetune-merge run=<run dir> out=<new dir>)")
    allow_remote_code(as_bool("trust_remote_code", args["trust_remote_code"]))
    return {**args, "check": as_bool("check", args["check"]), "overwrite": as_bool("overwrite", args["overwrite"]),
            "base": as_choice("base", args["base"], BASES)}


def _body(argv: list[str]) -> int:
    from finetune.platform.locks import out_lock

    args = check_args(argv)
    try:
        with out_lock(args["out"]):  # two merges into one out= never both write it
            merge_run(args["run"], args["out"], args["dtype"], args["check"], args["overwrite"], args["base"])
    except MergeCheckError as exc:
        print_error(exc)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """finetune-merge entry point.

    Args:
        argv: ``key=value`` arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success, 1 when the logit check fails, 2 on a user error (one ``error:`` line on stderr).
    """
    return run_cli(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
