"""Stop training cleanly when a scheduler or a person asks: SIGTERM (SLURM's time limit or preemption, ``kill``,
torchrun passing on its own SIGTERM), SIGUSR1 (SLURM's advance warning, ``sbatch --signal=USR1@120``) or SIGINT (a
person's Ctrl-C; a second Ctrl-C stops at once, without a checkpoint of the step under way).

Without this, the default SIGTERM ends the process at once and every step since the last checkpoint is lost
(up to ``trainer.save_steps``). With it, the step under way finishes, a checkpoint of that step is written the
usual way (weights, optimizer, scheduler, RNG, the running sums that make a resume exact) and the run stops,
recorded as failed with the checkpoint to resume from; ``trainer.resume_from_checkpoint=auto`` then continues as
if nothing had happened. Under torchrun every rank stops after the same step, whichever rank got the signal.
The handlers are installed only while the Trainer trains, and only in the main thread; the previous ones come
back afterwards. Where another library had a Python handler for the signal (submitit's: SIGUSR2 requeues a SLURM
job that hit its time limit or was preempted), that handler is called once the stop is recorded; and a requeued
SLURM job (``SLURM_RESTART_COUNT`` > 0) resumes from its latest checkpoint without being told
(:func:`finetune.training.checkpoints.requeued_resume`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

from transformers import TrainerCallback

from finetune.errors import RunInterrupted, say
from finetune.training import distributed

log = logging.getLogger("finetune.training.signals")

# SIGINT: a person's Ctrl-C is a stop request too; a second Ctrl-C stops at once (:meth:`StopOnSignal._handle`).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopOnSignal(TrainerCallback):
    """Note a stop signal at once; at the end of the optimizer step under way, save a checkpoint and stop."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopped_at: int | None = None
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            say("Ctrl-C again: stopping now, without a checkpoint of the step under way")
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
            if signum == signal.SIGINT:
                say("Ctrl-C: the step under way finishes and is saved, then the run stops (Ctrl-C again stops now)")

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        """Handle the stop signals while the block runs (a no-op outside the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        # SIGUSR2 too where another library handles it: submitit's requeue on a SLURM time limit or preemption.
        chained = (signal.SIGUSR2,) if callable(signal.getsignal(signal.SIGUSR2)) else ()
        previous = self.previous = {sig: signal.signal(sig, self._handle) for sig in (*STOP_SIGNALS, *chained)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.received is not None and self.stopped_at is None:
                # It came after the last step's end (or training failed): act as if it had never been handled.
                signal.raise_signal(self.received)

    def on_step_end(self, args, state, control, **kwargs):
        # Every rank learns of a signal any rank got, at the same step: they all save and stop together.
        received = distributed.max_over_ranks(self.received or 0)
        if received:
            if self.stopped_at is None:
                log.warning("%s received: saving a checkpoint of step %d and stopping",
                            signal.Signals(received).name, state.global_step)
            self.received = self.received or received
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def interruption(self, checkpoint_dir: str) -> RunInterrupted | None:
        """The error to raise once training returned after a stop, or None when no stop signal came."""
        if self.stopped_at is None:
            return None
        name = signal.Signals(self.received).name
        then = self.previous.get(self.received)
        if then is signal.default_int_handler:  # Python's own Ctrl-C handler, not a library's: it would raise
            then = None                         # KeyboardInterrupt after the clean stop
        return RunInterrupted(
            f"stopped by {name} after step {self.stopped_at}: {checkpoint_dir}/checkpoint-{self.stopped_at} saved; "
            "continue with trainer.resume_from_checkpoint=auto (same run directory)", self.received,
            then if callable(then) else None)
