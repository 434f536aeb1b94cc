"""finetune-train: one Hydra entrypoint that fine-tunes, evaluates and records a run.

    finetune-train                                  # embedded SmolLM2-135M, ChnSentiCorp, LoRA
    finetune-train quantization=nf4 lora.r=16       # QLoRA
    finetune-train lora=none                        # full fine-tuning
    finetune-train -m lora.r=8,16                   # a sweep (Hydra multirun)

The command line is checked first (:mod:`finetune.cli.overrides`); Hydra composes the config; the job runs as a
single run, a sweep job or a launched multi-process job (:mod:`finetune.training.launch`) through the stages of
:mod:`finetune.training.stages` (prepare, baseline, adapt, fit, save, score, record).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from finetune.config import CONF_DIR as CONFIG_TREE
from finetune.errors import FinetuneError, print_error, say
from finetune.training.job import run
from finetune.training.launch import objective, run_and_record

__all__ = ["main", "objective", "run", "run_and_record"]

CONF_DIR = str(CONFIG_TREE)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    """One job; returns the objective a sweeper optimises (validation accuracy, or minus the validation loss)."""
    return run_and_record(cfg)


def check_args(argv: list[str]) -> None:
    """What finetune-train checks before anything is written: the overrides composed with the config tree and
    every value validated (each value of a sweep too), the run directory free.

    Raises:
        FinetuneError: the first problem, in one line.
    """
    from finetune.cli.overrides import precheck

    precheck(argv, CONF_DIR, "train")


def main() -> None:
    """finetune-train: the command line is composed and checked first (one ``error:`` line and exit status 2
    for a bad option, key or value, before anything is written), then Hydra runs."""
    try:
        check_args(sys.argv[1:])
        sweep_lock = hold_sweep_dir(sys.argv[1:])
    except FinetuneError as exc:
        print_error(exc)
        sys.exit(2)
    sys.argv[1:] = run_dir_follows_output_dir(sys.argv[1:])
    try:
        hydra_main()
    finally:
        if sweep_lock is not None:
            sweep_lock.release()
    exit_after_sweep()


def hold_sweep_dir(argv: list[str]):
    """A sweep given its folder (``hydra.sweep.dir=D``) owns it while it runs, as a run owns its directory: a second
    sweep started into ``D`` meanwhile stops before Hydra writes anything there. (The default folder has the time
    in its name.) Returns the held lock, or None.

    Raises:
        FinetuneError: another sweep holds the folder (naming its pid and command).
    """
    from finetune.platform.locks import RunDirLock

    given = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.sweep.dir=")]
    sweep = any(a in ("-m", "--multirun") or a.startswith("+sweep=") for a in argv)
    if not (sweep and given and given[-1] and "${" not in given[-1]):
        return None
    lock = RunDirLock(given[-1], busy=f"hydra.sweep.dir={given[-1]} is in use by another sweep right now "
                                      "({holder}); wait for it to end, or give another hydra.sweep.dir")
    lock.acquire()
    return lock


def exit_after_sweep() -> None:
    """After a sweep (Hydra multirun) in which a job failed: one line naming the failed jobs, exit status 1.
    The sweep itself goes on past a failed job and its report lists it; the status tells scripts and schedulers."""
    from finetune.report import hydra_callback

    outcome, hydra_callback.LAST_SWEEP = hydra_callback.LAST_SWEEP, None
    if outcome is not None and outcome.failed:
        say(f"finetune-train: {outcome.summary()}")
        sys.exit(1)


def run_dir_follows_output_dir(argv: list[str]) -> list[str]:
    """``output_dir=<dir>`` on a single run's command line also sets Hydra's run directory to it (unless
    ``hydra.run.dir`` is given): else Hydra would make an empty outputs/<date>/<time> folder the run never uses."""
    if any(a in ("-m", "--multirun") for a in argv) or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    last = max((i for i, a in enumerate(argv) if a.startswith("output_dir=")), default=None)
    if last is None:
        return argv
    value = argv[last].split("=", 1)[1]
    if not value or "${" in value:
        return argv
    # Right after it: overrides are one run of positional arguments to Hydra's parser (flags such as --cfg may follow).
    return [*argv[:last + 1], f"hydra.run.dir={value}", *argv[last + 1:]]


if __name__ == "__main__":
    main()
