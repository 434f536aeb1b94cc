"""The run-folder contract: opening a finished run (config, tokenizer, base model + adapter or full model),
what a run directory holds, atomic writes, and the guards that keep finished work.

Rules (docs/runs.md, "Nothing lost"):

* a run refuses a directory that already holds a run unless it resumes it or ``overwrite_run=true``;
* a run that fails never replaces a finished run's artifacts or config;
* every artifact is written under a temporary name and renamed into place, so an interrupted write never
  leaves a half-file where a good one was;
* ``out=`` of the after-training commands never deletes what the command did not create, never writes into a
  run directory's own artifacts, and refuses the current directory or any parent of it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from finetune.errors import FinetuneError
from finetune.platform.locks import LOCK_FILE, RunDirBusy, RunDirLock

log = logging.getLogger("finetune.runs")


def run_config(run_dir: str | Path) -> tuple[Path, DictConfig]:
    """The run directory and its resolved config.

    Raises:
        FinetuneError: the directory or its config.yaml is missing.
    """
    path = Path(str(run_dir)).expanduser()
    if not path.is_dir():
        raise FinetuneError(f"run={run_dir}: no such run directory")
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        raise FinetuneError(f"run={run_dir}: no config.yaml (not a finetune-train run directory)")
    return path, OmegaConf.load(cfg_file)


def run_metrics(run_dir: Path) -> dict:
    file = run_dir / "metrics.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def run_kind(run_dir: Path) -> str:
    """``adapter`` (PEFT), ``model`` (full fine-tune), raising when the run saved neither."""
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return "adapter"
    if (run_dir / "model" / "config.json").is_file():
        return "model"
    status = run_metrics(run_dir).get("status")
    hint = f" (the run's status is '{status}')" if status and status != "ok" else ""
    raise FinetuneError(f"run={run_dir}: no adapter/ or model/ directory: the run did not finish training{hint}")


# Entries a finetune-train run writes; an ``out=`` path may not land on (or inside) any of them.
ARTIFACTS = ("config.yaml", "metrics.json", "adapter", "model", "tokenizer", "checkpoints", "qat_state.json",
             "train.log", ".hydra", "wandb")
# Entries whose presence means "this directory already holds a run".
RUN_MARKERS = ("config.yaml", "metrics.json", "adapter", "model", "checkpoints")
# Written by merge / export into their ``out`` directory: overwrite=true replaces only a directory holding it.
OUT_MARKER = ".finetune-out.json"


# ---------------------------------------------------------------------------------------------------------
# Atomic writes


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


PATH_KEYS = ("dataset.path", "trainer.resume_from_checkpoint")


def resolved_config(cfg: DictConfig) -> DictConfig:
    """The config a run directory records (config.yaml): every local path made absolute (against the directory
    the command ran from), so the run works from any current directory (``finetune-eval run=R`` finds its data)."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in PATH_KEYS:
        value = OmegaConf.select(out, key)
        if isinstance(value, str) and value not in ("auto",):
            OmegaConf.update(out, key, os.path.abspath(os.path.expanduser(value)))
    name = out.model.name_or_path
    if isinstance(name, str) and (name.startswith((".", "/", "~")) or Path(name).expanduser().is_dir()):
        out.model.name_or_path = os.path.abspath(os.path.expanduser(name))
    return out


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def replace_path(new: Path, dst: Path) -> None:
    """Move the finished ``new`` (file or folder) to ``dst``, replacing what was there with two renames.

    The old entry is renamed aside first and removed only once the new one is in place: a crash in between
    leaves either the old or the new entry under ``dst`` (plus a ``.old-*`` leftover), never a half one.
    """
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(dst, old)
    os.replace(new, dst)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


# ---------------------------------------------------------------------------------------------------------
# What a directory holds


def read_status(run_dir: Path) -> str | None:
    """``status`` of ``run_dir/metrics.json`` (None when absent or unreadable)."""
    try:
        return json.loads((Path(run_dir) / "metrics.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def holds_run(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in RUN_MARKERS)


def find_run_root(path: Path) -> Path | None:
    """The nearest of ``path`` and its parents that holds a run (see :data:`RUN_MARKERS`), or None."""
    for candidate in (path, *path.parents):
        if (candidate / "config.yaml").is_file() and any(
                (candidate / name).exists() for name in ("metrics.json", "adapter", "model", "checkpoints", ".hydra")):
            return candidate
    return None


class RunDirHeld(FinetuneError):
    """A run was refused because its directory already holds a run (which is left exactly as it was)."""


# A run refused because its directory is another run's (held, or in use now): nothing of it is written there.
REFUSED = (RunDirHeld, RunDirBusy)


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a run in a directory that already holds one, unless resuming or overwriting it.

    Raises:
        FinetuneError: naming the directory, what it holds and the three ways forward.
    """
    if resume or overwrite or not holds_run(run_dir):
        return
    status = read_status(run_dir)
    held = f"a run (metrics.json status '{status}')" if status else "a run"
    raise RunDirHeld(
        f"output_dir={run_dir} already holds {held}; give a new hydra.run.dir, resume it with "
        "trainer.resume_from_checkpoint=auto, or pass overwrite_run=true to replace it")


# ---------------------------------------------------------------------------------------------------------
# Output paths of the after-training commands


def check_out_path(out: str, *, key: str = "out", kind: str = "dir", command: str, overwrite: bool = False,
                   run_dir: Path | None = None, owned_file=None) -> Path:
    """Check, before any work, that ``out`` may be written by ``command``.

    Args:
        out: the path as the user typed it.
        key: the argument's name, for messages.
        kind: ``dir`` (merge, export) or ``file`` (eval, chat).
        command: the command's name; a directory it wrote holds :data:`OUT_MARKER` naming it.
        overwrite: ``dir`` only: replace a directory this command wrote earlier.
        run_dir: the run being read: ``out`` may neither be it nor contain it.
        owned_file: ``file`` only: a predicate telling whether an existing file was written by ``command``
            (only such a file is replaced).

    Returns:
        The absolute path.

    Raises:
        FinetuneError: the current directory or a parent of it, a run directory or one of its artifacts, a
            folder containing the run, a non-empty directory not written by ``command`` (or without
            ``overwrite=true``), a file where a folder is expected or the reverse.
    """
    path = Path(os.path.abspath(Path(out).expanduser()))
    real = path.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise FinetuneError(f"{key}={out} is the current directory or one of its parents; give a new path")
    root = find_run_root(real)
    if root is not None:
        rel = real.relative_to(root)
        if not rel.parts:
            raise FinetuneError(f"{key}={out} is a run directory; give a path outside it")
        if rel.parts[0] in ARTIFACTS:
            raise FinetuneError(f"{key}={out} is inside {root}'s own {rel.parts[0]}; give a path outside the run's "
                                f"artifacts ({', '.join(ARTIFACTS)})")
    if run_dir is not None and real in Path(run_dir).resolve().parents:
        raise FinetuneError(f"{key}={out} contains the run directory {run_dir}; give a new path")
    if kind == "file":
        if path.is_dir():
            raise FinetuneError(f"{key}={out} is a directory; give a file path")
        if path.exists() and not (owned_file is not None and owned_file(path)):
            raise FinetuneError(f"{key}={out} exists and was not written by {command}; give a new file path")
        return path
    if path.exists() and not path.is_dir():
        raise FinetuneError(f"{key}={out} exists and is a file; give a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FinetuneError(f"{key}={out} exists and is not empty; pass overwrite=true to replace an earlier "
                                f"{command} output, or give a new directory")
        if _marker_command(path) != command:
            raise FinetuneError(f"{key}={out} was not written by {command} (no {OUT_MARKER}); overwrite=true "
                                f"replaces only a directory that {command} created; give a new directory")
    return path


def _marker_command(folder: Path) -> str | None:
    try:
        return json.loads((folder / OUT_MARKER).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def staging_dir(target: Path) -> Path:
    """A fresh temporary folder beside ``target`` to build an output in before :func:`commit_dir`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, target: Path, command: str, info: dict | None = None) -> None:
    """Mark ``tmp`` as written by ``command`` and move it to ``target`` (replacing an earlier output of
    ``command``, which :func:`check_out_path` has verified)."""
    atomic_write_json(tmp / OUT_MARKER, {"command": command, **(info or {})})
    replace_path(tmp, target)


# ---------------------------------------------------------------------------------------------------------
# Writing a run


class RunWriter:
    """How one finetune-train invocation writes into its run directory without losing a finished run.

    * :meth:`begin` is the first write, called once the config and the data are known to be good: with
      ``overwrite_run`` the run already there is moved into ``.replaced-<stamp>/``; the final artifacts are
      built in ``.staging-<stamp>/``; config.yaml and .hydra/ are committed at once unless the directory holds
      a finished run being resumed (then they wait for success like everything else).
    * :meth:`commit` renames every staged artifact into place, then writes metrics.json; a replaced run is
      deleted only now (the user asked for it, and the new run has succeeded).
    * :meth:`fail` keeps what was finished: a finished run being resumed keeps its artifacts and the failed
      attempt goes to ``failed-<stamp>/``; an overwritten run is put back and the failed attempt moved to
      ``failed-<stamp>/``; otherwise the staged artifacts are kept in place with ``status: failed``.
    """

    EARLY = ("config.yaml", ".hydra")

    def __init__(self, run_dir: Path, *, resume: bool, overwrite: bool):
        self.run_dir = Path(run_dir)
        self.resume, self.overwrite = resume, overwrite and not resume
        self.stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        self.finished_before = read_status(self.run_dir) == "ok"
        self.aside: Path | None = None
        self.stage: Path | None = None

    def check(self) -> None:
        """Own the directory (:class:`RunDirLock`), then refuse one that holds a run (unless resumed / replaced).

        Raises:
            RunDirBusy: another process runs in it right now. RunDirHeld: it holds a run.
        """
        self.lock = RunDirLock(self.run_dir)
        self.lock.acquire()
        try:
            check_run_dir(self.run_dir, resume=self.resume, overwrite=self.overwrite)
        except FinetuneError:
            self.release()
            raise

    def release(self) -> None:
        """Let go of the directory (its lock file removed; a directory the lock made and nothing used, too)."""
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release(keep_dir=self.stage is not None)

    @property
    def started(self) -> bool:
        return self.stage is not None

    def begin(self, early: dict[str, str]) -> None:
        """Start writing; ``early`` maps relative paths (under config.yaml / .hydra) to their text."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.overwrite and holds_run(self.run_dir):
            self.aside = self.run_dir / f".replaced-{self.stamp}"
            self.aside.mkdir()
            for entry in list(self.run_dir.iterdir()):
                if entry != self.aside and not entry.name.startswith((".replaced-", "failed-", LOCK_FILE)):
                    os.replace(entry, self.aside / entry.name)
            self.finished_before = False
        self.stage = self.run_dir / f".staging-{self.stamp}"
        self.stage.mkdir()
        for rel, text in early.items():
            atomic_write_text(self.stage / rel, text)
        if not (self.resume and self.finished_before):
            self._move_in(self.EARLY)

    def path(self, name: str) -> Path:
        """Where to write the artifact ``name`` (inside the staging folder)."""
        assert self.stage is not None, "begin() first"
        return self.stage / name

    def _move_in(self, names=None) -> None:
        for entry in sorted(self.stage.iterdir()):
            if names is None or entry.name in names:
                replace_path(entry, self.run_dir / entry.name)

    def commit(self, metrics: dict) -> None:
        from finetune.metrics import problems

        for problem in problems(metrics):  # a writer's mistake: reported, never a reason to lose the finished run
            log.warning("metrics.json: %s", problem)
        self._move_in()
        self.stage.rmdir()
        atomic_write_json(self.run_dir / "metrics.json", metrics)
        if self.aside is not None:
            shutil.rmtree(self.aside)

    def fail(self, failure: dict) -> Path | None:
        """Record a failure; returns the folder holding the failed attempt when it is not the run directory."""
        if self.stage is None:  # nothing was written yet
            return None
        if self.aside is None and not (self.resume and self.finished_before):
            self._move_in()
            self.stage.rmdir()
            atomic_write_json(self.run_dir / "metrics.json", failure)
            return None
        failed = self.run_dir / f"failed-{self.stamp}"
        os.replace(self.stage, failed)
        if self.aside is not None:  # the new attempt's own entries go with it; the replaced run comes back
            for entry in list(self.run_dir.iterdir()):
                if entry not in (self.aside, failed) and not entry.name.startswith((".replaced-", "failed-", LOCK_FILE)):
                    os.replace(entry, failed / entry.name)
            for entry in list(self.aside.iterdir()):
                os.replace(entry, self.run_dir / entry.name)
            self.aside.rmdir()
        atomic_write_json(failed / "metrics.json", failure)
        return failed
