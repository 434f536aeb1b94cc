"""finetune-export: a run's deployment as a real INT8 ONNX model checked against the simulation
(:mod:`finetune.export.int8`), or as a GGUF file for llama.cpp and Ollama read back and checked
(:mod:`finetune.export.gguf`).

    finetune-export run=outputs/<date>/<time> format=int8 out=int8/
    finetune-export run=outputs/<date>/<time> format=gguf quant=q8_0 out=gguf/
"""

from __future__ import annotations

import sys

import torch

from finetune.checks import as_bool, as_choice, as_number, parse_kv
from finetune.cli.common import run_cli
from finetune.errors import FinetuneError, print_error
from finetune.export.int8 import ARGS, FORMATS, ExportCheckFailed, export_run
from finetune.model.load import allow_remote_code


def check_args(argv: list[str]) -> dict:
    """The arguments, typed and checked before any model loads.

    Raises:
        FinetuneError: an unknown or missing key, or a bad value, in one line.
    """
    args, _ = parse_kv(argv, ARGS, ("run", "format", "out"),
                       " (finetune-export run=<run dir> format=int8 out=<new dir>)")
    allow_remote_code(as_bool("trust_remote_code", args["trust_remote_code"]))
    from finetune.export.gguf import QUANTS

    fmt = as_choice("format", args["format"], FORMATS)
    # keys of one format: given with the other, they are refused rather than silently ignored
    only = {"gguf": ("quant",), "int8": ("granularity", "scale", "latency_tokens", "latency_reps", "float_reference",
                                         "kv_cache")}
    named = {arg.partition("=")[0] for arg in argv}
    for other, keys in only.items():
        given = [k for k in keys if k in named]
        if other != fmt and given:
            raise FinetuneError(f"{given[0]}= applies to format={other} only, not format={fmt}")
    return {**args, "format": fmt,
            "quant": as_choice("quant", args["quant"] or "q8_0", QUANTS),
            "threads": as_number("threads", args["threads"], int, 1, optional=True),
            "max_samples": as_number("max_samples", args["max_samples"], int, 1, optional=True),
            "latency_tokens": as_number("latency_tokens", args["latency_tokens"], int, 1),
            "latency_reps": as_number("latency_reps", args["latency_reps"], int, 1),
            "overwrite": as_bool("overwrite", args["overwrite"]),
            "float_reference": as_bool("float_reference", args["float_reference"]),
            "kv_cache": as_bool("kv_cache", args["kv_cache"])}


def _body(argv: list[str]) -> int:
    args = check_args(argv)
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    from finetune.platform.locks import out_lock

    try:
        with out_lock(args["out"]):  # two exports into one out= never both write it
            if args["format"] == "gguf":
                from finetune.export.gguf import export_gguf

                export_gguf(args["run"], args["out"], args["quant"], args["max_samples"], args["overwrite"])
                return 0
            export_run(args["run"], args["format"], args["out"], args["max_samples"], args["latency_tokens"],
                       args["latency_reps"], args["overwrite"], args["granularity"], args["scale"], args["threads"],
                       args["float_reference"], args["kv_cache"])
    except ExportCheckFailed as exc:
        print_error(exc, "; nothing was written")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """finetune-export entry point.

    Args:
        argv: ``key=value`` arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success, 1 when the check against the simulation fails (nothing written), 2 on a user error (one
        ``error:`` line on stderr).
    """
    return run_cli(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
