"""finetune-report: compare the jobs of a sweep; writes comparison.md, comparison.csv and a PNG plot beside them.

    finetune-report multirun_sweeps/<sweep>/<time> [--kind qat_targets] [--metric f1]
"""

from __future__ import annotations

import sys

from finetune.cli.common import ArgumentParser, run_cli
from finetune.report.compare import generate_report, markdown_table
from finetune.report.tables import KINDS


def _metric_joined(argv: list[str]) -> list[str]:
    """``--metric -eval_loss`` as ``--metric=-eval_loss``: argparse would take the leading '-' (lower is better)
    for an option of its own."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--metric" and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] != "--help":
            out.append(f"--metric={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def check_args(argv: list[str]):
    """The parsed arguments (argparse's namespace), checked before any run is read.

    Raises:
        FinetuneError: an unknown option or a bad value, in one line.
    """
    parser = ArgumentParser(
        prog="finetune-report",
        description="Compare the jobs of a sweep: writes comparison.md, comparison.csv and a PNG plot beside them.",
    )
    parser.add_argument("sweep_dir", metavar="DIR", help="sweep directory, e.g. multirun_sweeps/<sweep>/<time>")
    parser.add_argument("--kind", choices=KINDS, default=None, help="comparison kind (default: detected)")
    parser.add_argument("--metric", default=None,
                        help="column to rank on, e.g. f1 or -eval_loss (leading '-': lower is better)")
    return parser.parse_args(_metric_joined(argv))


def _body(argv: list[str]) -> int:
    args = check_args(argv)
    report = generate_report(args.sweep_dir, args.kind, args.metric)
    print(f"Takeaway: {report.comparison.takeaway}\n")
    if report.comparison.summary is not None:
        print(markdown_table(report.comparison.summary) + "\n")
    print(markdown_table(report.comparison.table))
    for note in report.comparison.notes:
        print(note)
    print()
    for path in report.paths.values():
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """finetune-report entry point: prints the takeaway, the markdown table and the written paths.

    Returns:
        0 on success, 2 on a user error (one ``error:`` line on stderr).
    """
    return run_cli(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
