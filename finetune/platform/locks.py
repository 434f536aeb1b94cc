"""One writer per place at a time: a lock the kernel holds for a process and drops when it dies (a crash never
leaves a stale lock). A run owns its directory (:class:`RunDirLock`); finetune-merge / -export / -eval / -chat own
the ``out=`` they write (:func:`out_lock`)."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from finetune.errors import FinetuneError


class RunDirBusy(FinetuneError):
    """Refused because another process is writing the same place right now; nothing of it was touched."""


LOCK_FILE = ".finetune.lock"


class FileLock:
    """An exclusive ``flock`` on ``lock_file``, taken at once or refused (never waited for). The file names its
    holder (pid and command) for the process that is refused; the holder removes it when it lets go.

    Args:
        lock_file: the lock's file (created; its folder must exist).
        busy: the refusal, with ``{holder}`` where the holder goes.
    """

    def __init__(self, lock_file: Path, busy: str):
        self.lock_file, self.busy = Path(lock_file), busy
        self.fd: int | None = None

    def acquire(self) -> None:
        """Raises:
            RunDirBusy: another process holds the lock."""
        import fcntl
        import sys

        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that has not named itself yet"
            os.close(fd)
            raise RunDirBusy(self.busy.format(holder=holder)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}".encode())
        self.fd = fd

    def release(self) -> None:
        """Remove the lock file and let go."""
        if self.fd is None:
            return
        try:
            self.lock_file.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None


def holder(lock_file: Path) -> int | None:
    """The pid of the process holding ``lock_file``'s lock right now, read from the kernel's table of locks
    (``/proc/locks``) without taking it: taking it, even for an instant, could refuse a run starting then. None when
    nobody holds it (the file may outlive a crashed holder), where the table cannot be read (not Linux), and for a
    holder on another machine of a shared file system (another kernel's table)."""
    try:
        st = os.stat(lock_file)
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():  # "1: FLOCK  ADVISORY  WRITE 29233 fe:00:5923298 0 EOF"
        found = re.match(r"\d+:\s+FLOCK\s+\S+\s+\S+\s+(\d+)\s+(\S+)\s", line)
        if found and found.group(2) == where:
            return int(found.group(1))
    return None


class RunDirLock(FileLock):
    """One owner per run directory: ``<dir>/.finetune.lock``, held for the run's lifetime."""

    def __init__(self, run_dir: Path, busy: str | None = None):
        self.run_dir = Path(run_dir)
        self.created_dir = False
        super().__init__(self.run_dir / LOCK_FILE, busy or f"output_dir={self.run_dir} is in use by another run right "
                                                           "now ({holder}); wait for it to end, or give another "
                                                           "hydra.run.dir")

    def acquire(self) -> None:
        if not self.run_dir.exists():
            self.run_dir.mkdir(parents=True)
            self.created_dir = True
        super().acquire()

    def release(self, keep_dir: bool = True) -> None:
        """Let go (and remove the directory when this lock made it and nothing was written there)."""
        if self.fd is None:
            return
        super().release()
        if not keep_dir and self.created_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()


@contextlib.contextmanager
def out_lock(out: str | Path, key: str | None = "out") -> Iterator[None]:
    """Hold ``out`` (a file or folder a command writes) for the block: a lock file beside it,
    ``.<name>.finetune.lock``, so two commands given one ``out=`` never both write it (the second is refused at once).
    ``key`` names the argument in the refusal (None: a path the person did not give, named as it is).

    Raises:
        RunDirBusy: another command is writing ``out`` right now.
    """
    target = Path(out).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(target.parent / f".{target.name}.finetune.lock",
                    f"{f'{key}=' if key else ''}{out} is being written by another command right now ({{holder}}); "
                    f"wait for it to end, or give {'another path' if key else 'out=<another file>'}")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
