"""One job across processes (torchrun / accelerate launch): who writes, the shared run directory, gathered figures.

Every rank trains (the Trainer's DDP / FSDP / DeepSpeed); rank 0 alone checks and writes the run directory
(config, checkpoints, adapter, metrics.json, train.log), starts the W&B run and evaluates, while the other
ranks stop after training. Decisions rank 0 takes (the run directory, a refusal) are broadcast, so every rank
follows the same path and none waits forever on a collective that never comes.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from finetune.errors import FinetuneError

# Rank 0 evaluates alone after training; the others may wait that long at the final barrier.
TIMEOUT = datetime.timedelta(hours=3)


def adopt_slurm_tasks() -> None:
    """A SLURM job of several tasks started by submitit (``hydra/launcher=slurm`` with ``tasks_per_node`` > 1):
    export torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from SLURM's, so the
    tasks form one job as under torchrun."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    if "SUBMITIT_EXECUTOR" not in os.environ and "SUBMITIT_FOLDER" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True under a multi-process launcher (torchrun, accelerate launch) with more than one process."""
    return world_size() > 1


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init() -> None:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA) if not done yet: the Trainer's accelerate
    state adopts it. A no-op outside a multi-process launch."""
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=TIMEOUT)


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable objects)."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """``[value of rank 0, value of rank 1, ...]`` on every rank."""
    if not active():
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def max_over_ranks(value: int) -> int:
    """The largest of every rank's ``value`` (every rank gets the same answer; one small all-reduce)."""
    if not active():
        return value
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    box = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())


def agree(check) -> Any:
    """Run ``check()`` on rank 0 and make every rank share its outcome: its return value, or its
    :class:`FinetuneError` raised on every rank (so a refusal never leaves the other ranks waiting)."""
    outcome: tuple[str, Any] = ("ok", None)
    error: FinetuneError | None = None
    if is_main():
        try:
            outcome = ("ok", check())
        except FinetuneError as exc:
            outcome, error = ("error", str(exc)), exc
    outcome = broadcast(outcome)
    if outcome[0] == "error":
        raise error if error is not None else FinetuneError(outcome[1])  # rank 0 keeps the error's own kind
    return outcome[1]


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def finish() -> None:
    """Leave the process group (end of the job on every rank)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def describe(strategy: str) -> dict:
    """``metrics.json["distributed"]``: how the job ran."""
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    return {"strategy": strategy, "world_size": world_size(), "backend": backend}


@contextlib.contextmanager
def gpu_lease(folder: Path, per_job: int, poll_s: float = 1.0) -> Iterator[list[int] | None]:
    """GPUs for one sweep job while it runs, none shared with another job of the sweep that holds a lease.

    The visible GPUs are cut into slots of ``per_job``; a job holds one slot through an exclusive lock on a file in
    ``folder`` (the sweep directory, shared by every job of the sweep, also across the parallel launcher's
    worker processes) and waits while every slot is taken. The lock goes with the process, so a killed job frees
    its slot. Yields the slot's device indices (as seen by this process), or None without CUDA.

    Raises:
        FinetuneError: ``per_job`` is larger than the number of visible GPUs.
    """
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 or per_job <= 0:
        yield None
        return
    if per_job > count:
        raise FinetuneError(f"gpus_per_job={per_job} but only {count} GPUs are visible")
    slots = count // per_job
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for slot in range(slots):
            handle = open(folder / f"gpu-slot-{slot}.lock", "a+")  # noqa: SIM115 - held for the lease
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield list(range(slot * per_job, (slot + 1) * per_job))
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(poll_s)


def visible_devices(indices: list[int]) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a child process that should see only ``indices`` of this process's GPUs."""
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [n.strip() for n in current.split(",")] if current else [str(i) for i in range(max(indices) + 1)]
    return ",".join(names[i] for i in indices)
