"""A few steps of train.py's setup and training step with batches the test controls, run by
tests/test_distributed.py under torchrun (and, for the reference, in a single process).

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py MODE[,MODE...] CORPUS OUT_DIR

Every rank takes its rows of one global batch stream, so N ranks see exactly the batches one
process would. MODE "equivalence" trains plainly; "accumulation" the same with every step's
batch in two micro-batches (gradients synced on the second only); "nonfinite" makes rank 1's
loss infinite at one step (its gradients stay finite), which every rank must skip; "main_fails"
fails on rank 0 alone, in work only rank 0 does, as a full disk would; "rank1_killed" has rank
1 killed (SIGKILL) while rank 0 waits in a collective. Several modes run one after the other
in one launch, which spares a launch each; a failing mode ends it. For each training mode, every
rank writes its weights to
OUT_DIR/<MODE>/rank<r>.safetensors, and to OUT_DIR/<MODE>/rank<r>.json the per-step is_finite
flags and how many gradient all-reduces DDP ran.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import BatchSampler  # noqa: E402
from utils import console, distributed  # noqa: E402
from utils.errors import TrainingFailure  # noqa: E402
from utils.setup import setup_from_flags  # noqa: E402
from utils.training import init_state, optimizer_step  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 6
NONFINITE_STEP = 2
BATCH_SEED = 7


class RowsOfGlobalBatch:
    """This rank's rows of a global batch that every rank draws from the same seed."""

    def __init__(self, data: torch.Tensor, block_size: int, rank: int, world_size: int) -> None:
        self.sampler = BatchSampler(data, block_size, GLOBAL_BATCH, BATCH_SEED)
        per_rank = GLOBAL_BATCH // world_size
        self.rows = slice(rank * per_rank, (rank + 1) * per_rank)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.sampler.next_batch()
        return x[self.rows], y[self.rows]


class InfiniteLossOnce(torch.nn.Module):
    """The model, but on `rank` at step `at` its loss gains +inf, a constant without gradient:
    only the loss says the step is bad, the gradients look fine."""

    def __init__(self, model: torch.nn.Module, rank: int, at: int | None) -> None:
        super().__init__()
        self.model, self.rank, self.at, self.step = model, rank, at, 0

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, loss = self.model(x, y)
        if self.step == self.at and distributed.rank() == self.rank:
            loss = loss + float("inf")
        return logits, loss


def run(mode: str, corpus: Path, group: distributed.Group) -> tuple[torch.nn.Module, dict]:
    """Train STEPS steps as this process's rank; returns the plain model, the is_finite flags
    and the number of gradient all-reduces."""
    world_size = distributed.world_size()
    setup = setup_from_flags([
        "--data-path", str(corpus), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
        "--block-size", "16", "--dropout", "0", "--batch-size", str(GLOBAL_BATCH // world_size),
        "--device", "cpu", "--warmup-iters", "2",
        # AdamW: Muon's Newton-Schulz iteration magnifies the last-bit differences of summing
        # gradients in another order (two ranks vs one batch)
        "--optimizer", "adamw",
        "--grad-accum-steps", "2" if mode == "accumulation" else "1",
    ])
    state = init_state(setup)
    state.batches = RowsOfGlobalBatch(setup.splits.train, setup.config.model.block_size,
                                      distributed.rank(), world_size)
    faulty = InfiniteLossOnce(state.model, rank=1, at=NONFINITE_STEP if mode == "nonfinite"
                              else None)
    step_model = group.wrap(faulty, setup.device)  # copies rank 0's weights to all
    state.step_model = step_model
    allreduces = [0]
    if isinstance(step_model, DistributedDataParallel):
        def counting_allreduce(process_group, bucket):
            allreduces[0] += 1
            return allreduce_hook(process_group, bucket)

        step_model.register_comm_hook(None, counting_allreduce)
    flags = []
    for step in range(STEPS):
        faulty.step = step
        result = optimizer_step(state, setup)
        state.scheduler.step()
        flags.append(bool(result.is_finite))
    return state.model, {"is_finite": flags, "allreduces": allreduces[0]}


def fail_on_main() -> None:
    raise TrainingFailure("cannot write checkpoint: No space left on device")


def main(argv: list[str]) -> int:
    modes, corpus, out = argv[0].split(","), Path(argv[1]), Path(argv[2])
    launch = distributed.current_launch()
    with distributed.process_group(launch, torch.device("cpu")) as group:
        for mode in modes:
            if mode == "main_fails":
                distributed.on_main(fail_on_main)
            if mode == "rank1_killed":
                if launch.rank == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
                distributed.max_over_ranks(0, torch.device("cpu"))  # rank 0 waits for rank 1
            model, record = run(mode, corpus, group)
            (out / mode).mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      str(out / mode / f"rank{launch.rank}.safetensors"))
            (out / mode / f"rank{launch.rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    console.exit_process(console.run_main(main, sys.argv[1:]))
