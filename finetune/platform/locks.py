"""One owner per run directory at a time: a lock the kernel holds for a process and drops when it dies."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.errors import FinetuneError


class RunDirBusy(FinetuneError):
    """A run was refused because another process is running in its directory right now."""


LOCK_FILE = ".finetune.lock"


class RunDirLock:
    """One owner per run directory at a time: an exclusive ``flock`` on ``<dir>/.finetune.lock``, held for the
    run's lifetime and released by the kernel when the process dies (a crash never leaves a stale lock). The file
    names its holder (pid and command) for the process that is refused; the holder removes it when it is done.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.fd: int | None = None
        self.created_dir = False

    def acquire(self) -> None:
        """Take the lock, or refuse at once (never wait) naming the holder.

        Raises:
            RunDirBusy: another process holds it; nothing of its directory is touched.
        """
        import fcntl
        import sys

        if not self.run_dir.exists():
            self.run_dir.mkdir(parents=True)
            self.created_dir = True
        path = self.run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that has not named itself yet"
            os.close(fd)
            raise RunDirBusy(f"output_dir={self.run_dir} is in use by another run right now ({holder}); wait for it "
                             "to end, or give another hydra.run.dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}".encode())
        self.fd = fd

    def release(self, keep_dir: bool = True) -> None:
        """Remove the lock file and let go (and the directory, when this lock made it and it is empty)."""
        if self.fd is None:
            return
        try:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None
        if not keep_dir and self.created_dir:
            try:
                self.run_dir.rmdir()
            except OSError:
                pass
