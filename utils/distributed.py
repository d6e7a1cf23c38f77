"""Training as one of several processes started by torchrun (DistributedDataParallel).

torchrun tells each process who it is through RANK, LOCAL_RANK, WORLD_SIZE and
LOCAL_WORLD_SIZE. A plain `python train.py` is a world of one: nothing here starts a process
group then, and every collective helper returns its input unchanged, so single-process runs
take exactly the path they always did.

    launch = current_launch()                  # rank 0 of 1 without torchrun
    with process_group(launch, device) as group:   # nccl on CUDA, gloo elsewhere
        model = group.wrap(model, device)          # DistributedDataParallel
        run = on_main(lambda: create_run(...)) # made once, learned by every rank
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from utils.errors import USER_ERRORS, TrainingFailure, UserError

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
# long enough for rank 0 to write a checkpoint or a sample while the others wait for it
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Launch:
    """This process's place among the processes torchrun started (0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    by_torchrun: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 alone creates the run folder, logs, checkpoints and prints progress."""
        return self.rank == 0

    def launcher(self) -> list[str]:
        """The start of a command line that launches the same way again."""
        if not self.by_torchrun:
            return ["python"]
        nodes = self.world_size // self.local_world_size
        where = ["--standalone"] if nodes == 1 else [f"--nnodes={nodes}", "..."]
        return ["torchrun", *where, f"--nproc_per_node={self.local_world_size}"]


@functools.cache
def current_launch() -> Launch:
    """The launch torchrun described in the environment; it is fixed for the process's life."""
    present = [name for name in TORCHRUN_VARIABLES if name in os.environ]
    if not present:
        return Launch()
    if len(present) < len(TORCHRUN_VARIABLES):
        missing = sorted(set(TORCHRUN_VARIABLES) - set(present))
        raise UserError(f"{', '.join(present)} set but {', '.join(missing)} missing: start "
                        "distributed training with torchrun, which sets all of them")
    try:
        values = {name.lower(): int(os.environ[name]) for name in TORCHRUN_VARIABLES}
    except ValueError:
        shown = ", ".join(f"{n}={os.environ[n]!r}" for n in TORCHRUN_VARIABLES)
        raise UserError(f"torchrun variables must be integers ({shown})") from None
    return Launch(**values, by_torchrun=True)


def is_main_process() -> bool:
    return current_launch().is_main


def is_active() -> bool:
    """True once the process group is up: collectives then reach every rank."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return current_launch().rank


def world_size() -> int:
    return current_launch().world_size


def device_for_rank(device: torch.device, launch: Launch) -> torch.device:
    """Each process on a node gets its own GPU, cuda:<LOCAL_RANK>; CPU and MPS are shared."""
    if not launch.by_torchrun or device.type != "cuda":
        return device
    if device.index is not None and launch.local_world_size > 1:
        raise UserError(f"device={device} under torchrun: each process uses "
                        "cuda:<LOCAL_RANK>; pass --device cuda (or auto)")
    # checked against the node's process count, not this rank, so every process on the node
    # (its local rank 0 among them, which shows errors) refuses alike
    if launch.local_world_size > torch.cuda.device_count():
        raise UserError(
            f"torchrun started {launch.local_world_size} processes on this node but it has "
            f"{torch.cuda.device_count()} CUDA device(s); use --nproc_per_node="
            f"{torch.cuda.device_count()} or fewer"
        )
    return torch.device("cuda", launch.local_rank)


def threads_per_process(launch: Launch) -> int | None:
    """CPU threads for one process: the node's cores shared among its processes.

    torchrun sets OMP_NUM_THREADS=1 for several processes per node, which leaves all but one
    core of a CPU run idle. None for a single process: torch's default already uses every core.
    """
    if not launch.by_torchrun or launch.local_world_size == 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // launch.local_world_size)


class Group:
    """The running process group as train.py sees it: it wraps models for data parallelism."""

    def __init__(self) -> None:
        self._wrapped: list[DistributedDataParallel] = []

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The model in DistributedDataParallel when the process group is up; else unchanged.

        DDP copies rank 0's weights to every rank here, then averages gradients in backward."""
        if not is_active():
            return model
        device_ids = [device.index] if device.type == "cuda" else None  # CPU: no device_ids
        wrapped = DistributedDataParallel(model, device_ids=device_ids)
        self._wrapped.append(wrapped)
        return wrapped

    def _release(self) -> None:
        # A DDP reducer that outlives the group would destroy it with the GIL held, joining
        # gloo threads that may need the GIL: a hang at exit. Drop the reducers while the
        # group still holds its own reference, so the group's own teardown does that work.
        for wrapped in self._wrapped:
            del wrapped.reducer
        self._wrapped.clear()


@contextlib.contextmanager
def process_group(launch: Launch, device: torch.device) -> Iterator[Group]:
    """Join the other processes for the body (when started by torchrun): nccl for CUDA, gloo
    otherwise; leave the group on the way out, however the body ends. A collective broken by
    a peer that quit ends the body as a one-line TrainingFailure."""
    group = Group()
    if not launch.by_torchrun:
        yield group
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # device_id binds the group to this GPU at once, rather than at the first collective
        dist.init_process_group("nccl", device_id=device, timeout=COLLECTIVE_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield group
    except RuntimeError as error:
        if not is_peer_failure(error):
            raise
        # this process only lost its connection; the user needs the error of the one that quit
        raise TrainingFailure("another training process quit (its error is above, or in "
                              "torchrun's summary below)") from None
    finally:
        group._release()
        dist.destroy_process_group()


def gradient_sync(model: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Inside this context a DDP backward keeps its gradients local (no all-reduce) unless
    enabled: accumulation micro-steps sync only on the last one."""
    if enabled or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def is_peer_failure(error: BaseException) -> bool:
    """Whether error means another process of this run quit and broke the connection (its own
    error is what the user needs; this one only follows from it)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and "gloo" in text and "peer" in text


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor averaged over all ranks (a NaN or inf on any rank reaches every rank)."""
    if not is_active():
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return total / dist.get_world_size()


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's value; waits for all ranks."""
    if not is_active():
        return value
    tensor = torch.tensor(value, dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


def gather_to_main(value: T) -> list[T] | None:
    """Every rank's value, in rank order, on rank 0 (None elsewhere); [value] alone."""
    if not is_active():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size() if is_main_process() else []
    dist.gather_object(value, gathered if is_main_process() else None, dst=0)
    return gathered if is_main_process() else None


def on_main(action: Callable[[], T]) -> T:
    """Run action on rank 0 only and hand its result to every rank.

    If it fails with a user's error (USER_ERRORS) or a TrainingFailure (a full disk, say),
    every rank raises the same error, so no rank is left waiting for a peer that has quit."""
    result: T | None = None
    failure: Exception | None = None
    if is_main_process():
        try:
            result = action()
        except (*USER_ERRORS, TrainingFailure) as error:
            if not is_active():
                raise
            failure = error
    if is_active():
        shared = [(result, failure)]
        dist.broadcast_object_list(shared, src=0)
        result, failure = shared[0]
    if failure is not None:
        raise failure
    return result  # type: ignore[return-value]
