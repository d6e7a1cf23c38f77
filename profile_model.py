"""Show where training time goes: profile N steps of the training step train.py runs.

Prints the share of each phase (data, forward, backward, optimizer, other), the top operators by
self time, peak memory, FLOPs and MFU, and writes trace.json (open it in https://ui.perfetto.dev
or chrome://tracing) with the tables into runs/<id>/profile/.

Usage: python profile_model.py --steps 10 [any train.py config flag] [--run runs/<id>] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from utils import console
from utils.checkpoint import CheckpointError
from utils.config_loader import ConfigLoader
from utils.device import measure_matmul_flops, synchronize
from utils.errors import UserError
from utils.output_paths import check_output_folder
from utils.runs import command_line, create_run, write_metadata
from utils.setup import Setup, build_setup
from utils.training import init_state, optimizer_step

PHASES = ("data", "forward", "backward", "optimizer")


def build_parser(loader: ConfigLoader) -> argparse.ArgumentParser:
    parser = loader.build_parser(__doc__)
    parser.add_argument("--steps", type=int, default=10, help="steps to profile (default: 10)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="steps run first and not profiled (default: 3)")
    parser.add_argument("--run", type=Path, help="profile the saved config of this run folder")
    parser.add_argument("--out", type=Path, help="folder for trace.json and the tables "
                                                  "(default: <run>/profile)")
    return parser


def load_config(loader: ConfigLoader, args: argparse.Namespace):
    if args.run is None:
        return loader.load(args)
    saved = args.run / "meta" / "full_config.json"
    if not saved.is_file():
        raise UserError(f"{args.run} has no meta/full_config.json; pass a run folder made by "
                        "train.py")
    try:
        values = json.loads(saved.read_text())
    except ValueError as error:
        raise CheckpointError(f"cannot read {saved}: {error}") from None
    # the run's config is the base; flags given here still apply on top of it
    return loader.load_for_resume(values, args, only_resumable_changes=False)


def profile_steps(args: argparse.Namespace, setup: Setup, state):
    """Warm up, then profile args.steps steps; returns (profiler, wall seconds per step)."""
    for _ in range(args.warmup):
        optimizer_step(state, setup)
    activities = [ProfilerActivity.CPU]
    if setup.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.reset_peak_memory_stats(setup.device)
    synchronize(setup.device)
    with profile(activities=activities, profile_memory=True, record_shapes=False) as profiler:
        start = time.perf_counter()
        for _ in range(args.steps):
            optimizer_step(state, setup)
        synchronize(setup.device)
        step_s = (time.perf_counter() - start) / args.steps
    return profiler, step_s


def phase_table(profiler, steps: int, step_s: float) -> tuple[str, dict[str, float]]:
    """Milliseconds per step and share of the step for each phase; 'other' is the rest.

    The phases are optimizer_step's record_function ranges. On CPU their host time is the work;
    on CUDA the host only queues kernels, so the share is taken from the time the device spent
    inside each range (the profiler's GPU-side copy of the annotation). Backward kernels are
    launched by autograd's engine thread, outside the range, so backward's device time is all
    device work that falls in no other phase; 'other' is then the device's idle time."""
    host = dict.fromkeys(PHASES, 0.0)
    device = dict.fromkeys(PHASES, 0.0)
    for event in profiler.events():
        if event.name in host:
            times = host if event.device_type == DeviceType.CPU else device
            times[event.name] += event.time_range.elapsed_us() / 1e3 / steps
    # every kernel counts once as the self device time of the op that launched it
    device_work = sum(e.self_device_time_total for e in profiler.key_averages()) / 1e3 / steps
    on_device = any(device.values())
    if on_device:
        inside_ranges = sum(v for name, v in device.items() if name != "backward")
        device["backward"] = max(0.0, device_work - inside_ranges)
    phase_ms = device if on_device else host
    step_ms = step_s * 1e3
    phase_ms["other"] = max(0.0, step_ms - sum(phase_ms.values()))
    if on_device:
        lines = ["| phase | device ms/step | host ms/step | share |", "|---|---|---|---|"]
        lines += [f"| {name} | {ms:.2f} | {host.get(name, 0.0):.2f} | {100 * ms / step_ms:.1f}% |"
                  for name, ms in phase_ms.items()]
        lines.append(f"| step | {step_ms:.2f} | | 100.0% |")
    else:
        lines = ["| phase | ms/step | share |", "|---|---|---|"]
        lines += [f"| {name} | {ms:.2f} | {100 * ms / step_ms:.1f}% |"
                  for name, ms in phase_ms.items()]
        lines.append(f"| step | {step_ms:.2f} | 100.0% |")
    return "\n".join(lines), phase_ms


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in kilobytes on Linux: the process's peak resident memory
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def output_folder(args: argparse.Namespace, setup: Setup, argv: Sequence[str]) -> Path:
    """--out, or the profiled run's profile/ folder, or a new run folder's."""
    if args.out is not None:
        out = args.out
    elif args.run is not None:
        out = args.run / "profile"
    else:
        cfg = setup.config.train
        run = create_run(Path(cfg.runs_dir), f"{cfg.run_tag}-profile")
        write_metadata(run, setup.config.to_dict(), command_line("profile_model.py", argv))
        out = run.root / "profile"
    out.mkdir(parents=True, exist_ok=True)
    return out


def profile_model(argv: Sequence[str]) -> int:
    loader = ConfigLoader()
    args = build_parser(loader).parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be at least 1 and --warmup at least 0")
    if args.out is not None:
        check_output_folder(args.out, "--out")
    setup = build_setup(load_config(loader, args))
    out = output_folder(args, setup, argv)
    state = init_state(setup)
    profiler, step_s = profile_steps(args, setup, state)
    phases, _ = phase_table(profiler, args.steps, step_s)
    device = setup.device
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    operators = profiler.key_averages().table(sort_by=sort_key, row_limit=15)
    tokens_per_step = setup.tokens_per_step()
    flops_per_step = state.model.flops_per_token() * tokens_per_step
    achieved = flops_per_step / step_s
    peak = measure_matmul_flops(device, setup.dtype)
    summary = "\n".join([
        f"parameters: {state.model.num_parameters():,} (without position embeddings)",
        f"tokens per step: {tokens_per_step:,}; {tokens_per_step / step_s:,.0f} tokens/s",
        f"FLOPs per step: {flops_per_step / 1e9:.2f} GFLOP; achieved {achieved / 1e9:.1f} GFLOP/s",
        f"MFU: {100 * achieved / peak:.1f}% of a measured {setup.dtype_name} matmul "
        f"ceiling of {peak / 1e9:.1f} GFLOP/s",
        f"peak memory: {peak_memory_mb(device):,.0f} MiB "
        f"({'CUDA allocated' if device.type == 'cuda' else 'process resident'})",
    ])
    profiler.export_chrome_trace(str(out / "trace.json"))
    report = f"## Phases\n{phases}\n\n## Top operators\n{operators}\n\n## Summary\n{summary}\n"
    (out / "profile.md").write_text(report)
    print(report)
    print(f"trace and tables written to {out}")
    console.info(f"profiled {args.steps} steps after {args.warmup} warm-up steps on {device}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return console.run_main(profile_model, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
