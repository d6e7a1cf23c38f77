"""One Tracker the training loop logs through; TensorBoard always, Aim and Weights & Biases
when asked for.

    tracker = Tracker.open(run, config, metadata)     # builds only the enabled backends
    tracker.log({"train/loss": 1.9, "lr": 3e-4}, step=100)
    tracker.close()
    print(*tracker.closing_notes)                      # e.g. how to upload an offline W&B run

Metric names are TensorBoard's ("train/loss", "val/perplexity", "lr"), and W&B's too; the Aim
backend files a "subset/name" metric as `name` with context {"subset": subset}, so train and val
losses share one chart there.
"""

from __future__ import annotations

import html
import importlib
import json
import netrc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from utils import console, distributed
from utils.aim_server_run import AimServer, AimServerError, AimServerRun, aim_value
from utils.config import PROJECT_ROOT, Config, is_aim_server
from utils.errors import UserError
from utils.runs import RunPaths

HISTOGRAM_BINS = 64


@dataclass(frozen=True)
class Histogram:
    """A tensor's value distribution: equal-width bins between its min and max, plus moments."""

    min: float
    max: float
    count: int
    sum: float
    sum_squares: float
    bin_counts: list[float]

    @property
    def bin_edges(self) -> list[float]:
        """Right edge of each bin."""
        width = (self.max - self.min) / len(self.bin_counts)
        return [self.min + width * (i + 1) for i in range(len(self.bin_counts))]


def histograms(tensors: Mapping[str, torch.Tensor],
               bins: int = HISTOGRAM_BINS) -> dict[str, Histogram]:
    """Bin every tensor where it lives and copy only the bins: two small transfers in all,
    instead of every parameter and gradient crossing to the host."""
    flat = {name: t.detach().float().flatten() for name, t in tensors.items()}
    stats = torch.stack([torch.stack([f.min(), f.max(), f.sum(), f.square().sum()])
                         for f in flat.values()]).tolist()
    counts = torch.stack([torch.histc(f, bins, min=lo, max=hi if hi > lo else lo + 1.0)
                          for f, (lo, hi, _, _) in zip(flat.values(), stats, strict=True)])
    return {
        name: Histogram(lo, hi if hi > lo else lo + 1.0, f.numel(), total, squares, row)
        for (name, f), (lo, hi, total, squares), row
        in zip(flat.items(), stats, counts.tolist(), strict=True)
    }


class Backend(Protocol):
    def start(self, config: Config, metadata: Mapping[str, str]) -> None: ...
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_distributions(self, distributions: Mapping[str, Histogram], step: int) -> None: ...
    def log_text(self, name: str, text: str, step: int) -> None: ...
    def log_summary(self, hparams: Mapping[str, Any], results: Mapping[str, float]) -> None: ...
    def close(self) -> None: ...


class Tracker:
    """Fans every call out to the enabled backends."""

    def __init__(self, backends: list[Backend]) -> None:
        self.backends = backends

    @classmethod
    def open(cls, run: RunPaths, config: Config, metadata: Mapping[str, str],
             resume_step: int | None = None) -> Tracker:
        """TensorBoard in the run folder, plus Aim if config.train.aim_logging.

        With resume_step, both continue the run's existing logs from that step on. Under
        torchrun only rank 0 logs: the other ranks get a tracker without backends."""
        if not distributed.is_main_process():
            return cls([])
        backends: list[Backend] = [TensorBoardBackend(run.tensorboard, resume_step)]
        if config.train.aim_logging:
            backends.append(AimBackend(run, aim_repo(config), resume_step is not None))
        if config.train.wandb_logging:
            backends.append(WandbBackend(run, config))
        tracker = cls(backends)
        for backend in backends:
            backend.start(config, metadata)
        return tracker

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for backend in self.backends:
            backend.log(metrics, step)

    def log_distributions(self, tensors: Mapping[str, torch.Tensor], step: int) -> None:
        if not self.backends:
            return
        summaries = histograms(tensors)
        for backend in self.backends:
            backend.log_distributions(summaries, step)

    def log_histograms(self, model: torch.nn.Module, step: int) -> None:
        """Parameter and gradient distributions; gradients are those of the step just taken."""
        named = list(model.named_parameters())
        tensors = {f"params/{name}": p for name, p in named}
        tensors.update({f"grads/{name}": p.grad for name, p in named if p.grad is not None})
        self.log_distributions(tensors, step)

    def log_text(self, name: str, text: str, step: int) -> None:
        for backend in self.backends:
            backend.log_text(name, text, step)

    def log_summary(self, hparams: Mapping[str, Any], results: Mapping[str, float]) -> None:
        """Hyperparameters with the run's final results, for comparing runs side by side."""
        for backend in self.backends:
            backend.log_summary(hparams, results)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()

    @property
    def lost(self) -> dict[str, str]:
        """The trackers that stopped taking the run's logs part way, and why, for
        results.json."""
        return {type(backend).__name__.removesuffix("Backend").lower(): backend.lost
                for backend in self.backends if getattr(backend, "lost", None)}

    @property
    def closing_notes(self) -> list[str]:
        """What the backends have to tell the user once the run is over."""
        return [note for backend in self.backends for note in getattr(backend, "notes", [])]


def flat_hparams(config: Config) -> dict[str, Any]:
    """The config as one flat mapping of scalars (None becomes the string 'none'), with the
    number of processes and the global batch they make together."""
    flat = {**config.to_dict()["model"], **config.to_dict()["train"]}
    flat["world_size"] = distributed.world_size()
    flat["global_batch_size"] = config.train.global_batch_size(distributed.world_size())
    return {k: "none" if v is None else v for k, v in flat.items()}


def aim_repo(config: Config) -> str:
    """Where Aim runs go: an `aim server`'s aim://HOST:PORT, or the folder holding the repo
    (.aim), as `aim up --repo` takes it."""
    return config.train.aim_repo or str(PROJECT_ROOT)


def check_aim_available(config: Config) -> None:
    """Fail before training starts if Aim is asked for but cannot be imported, or its server
    does not answer."""
    check_importable("aim", "Aim", "turn it off with --no-aim")
    if is_aim_server(config.train.aim_repo):
        server = AimServer(config.train.aim_repo)
        problem = server.problem()
        if problem is not None:
            raise UserError(
                f"no Aim server answers at {server.address} ({problem}); start one on that "
                f"machine with aim server --repo FOLDER --host 0.0.0.0 --port {server.port}, "
                "or log into a local repo with --aim-repo FOLDER")


def check_importable(module: str, tracker: str, how_to_drop: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as error:  # a broken install raises more than ImportError
        raise UserError(
            f"{tracker} logging was requested but {module} cannot be imported ({error}); "
            f"install it with pip install {module}, or {how_to_drop}"
        ) from None


def check_wandb_available(config: Config) -> None:
    """Fail before training starts if W&B is asked for but cannot be imported, or asked to
    log online without an API key."""
    check_importable("wandb", "W&B", "drop --wandb")
    if config.train.wandb_mode == "online" and not has_wandb_api_key():
        raise UserError("--wandb-mode online needs a W&B API key: run wandb login or set "
                        "WANDB_API_KEY; or pass --wandb-mode offline to log into the run "
                        "folder and upload later with wandb sync")


def has_wandb_api_key() -> bool:
    """Whether W&B would find an API key: WANDB_API_KEY, or what wandb login saved (~/.netrc,
    for WANDB_BASE_URL's host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
    try:
        return netrc.netrc().authenticators(host.split("/")[0]) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(config: Config) -> str:
    """The mode W&B runs in: auto becomes online where there is an API key."""
    if config.train.wandb_mode != "auto":
        return config.train.wandb_mode
    return "online" if has_wandb_api_key() else "offline"


class TensorBoardBackend:
    def __init__(self, log_dir: Path, resume_step: int | None = None) -> None:
        # purge_step hides what an interrupted process logged after its last checkpoint, so a
        # resumed run's curves continue without a doubled stretch
        purge_step = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def start(self, config: Config, metadata: Mapping[str, str]) -> None:
        self.log_text("config", json.dumps(config.to_dict(), indent=2), 0)
        for name, text in metadata.items():
            self.log_text(f"meta/{name}", text, 0)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_distributions(self, distributions: Mapping[str, Histogram], step: int) -> None:
        for name, h in distributions.items():
            self.writer.add_histogram_raw(name, h.min, h.max, h.count, h.sum, h.sum_squares,
                                          h.bin_edges, h.bin_counts, step)

    def log_text(self, name: str, text: str, step: int) -> None:
        # TensorBoard renders text as markdown; indenting makes it a code block, which keeps
        # line breaks and spacing
        self.writer.add_text(name, "    " + text.replace("\n", "\n    "), step)

    def log_summary(self, hparams: Mapping[str, Any], results: Mapping[str, float]) -> None:
        # written into this run's own event file (add_hparams would start a sub-run)
        experiment, start, end = hparams_summary(dict(hparams), dict(results))
        file_writer = self.writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        self.log(results, step=0)

    def close(self) -> None:
        self.writer.close()


class AimBackend:
    """Aim, in a local repo (the folder holding .aim) or on an `aim server` (aim://HOST:PORT).

    A run on a server is held by a child process (utils/aim_server_run.py), so training never
    waits for the server. If that run cannot be opened, or the server stops answering, or the
    child ends, nothing more goes to Aim (the other trackers go on) and `lost` says why and
    since when, for results.json."""

    def __init__(self, run: RunPaths, repo: str, resuming: bool) -> None:
        self.lost: str | None = None
        self.step = 0
        record = run.meta / "aim_run.txt"
        saved_hash, saved_repo = (record.read_text().split("\n")[:2] if record.exists()
                                  else (None, None))
        same_repo = saved_repo is not None and (
            saved_repo == repo if is_aim_server(repo) else Path(saved_repo) == Path(repo))
        # a resumed run takes over its Aim run: the process that held it is gone
        take_over = saved_hash if resuming and same_repo else None
        self.run: LocalAimRun | AimServerRun | None = None
        if not is_aim_server(repo):
            self.run = LocalAimRun.open(repo, run.run_id, take_over)
        else:
            try:
                self.run = AimServerRun.open(AimServer(repo), run.run_id, take_over,
                                             run.root / "logs" / "aim_client.log")
            except AimServerError as error:
                self.lose(str(error))
                return
        if take_over is None:
            record.write_text(f"{self.run.hash}\n{repo}\n")

    def start(self, config: Config, metadata: Mapping[str, str]) -> None:
        if self.reachable():
            self.run.set("hparams", flat_hparams(config))
            self.run.set("meta", dict(metadata))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.reachable(step):
            for name, value in metrics.items():
                self.track(("scalar", float(value)), name, step)

    def log_distributions(self, distributions: Mapping[str, Histogram], step: int) -> None:
        if self.reachable(step):
            for name, h in distributions.items():
                self.track(("distribution", h.bin_counts, (h.min, h.max)), name, step)

    def log_text(self, name: str, text: str, step: int) -> None:
        if self.reachable(step):
            self.track(("text", text), name, step)

    def track(self, value: tuple, name: str, step: int) -> None:
        metric, context = _aim_name(name)
        self.run.track(value, metric, step, context)

    def log_summary(self, hparams: Mapping[str, Any], results: Mapping[str, float]) -> None:
        if self.reachable():
            self.run.set("hparams", dict(hparams))  # the final ones: a pace check may change them
            self.run.set("results", dict(results))

    def close(self) -> None:
        if self.reachable():
            trouble = self.run.close()
            if trouble is not None:
                self.lose(f"{trouble}, at the end of step {self.step}")

    def reachable(self, step: int | None = None) -> bool:
        """Whether to log to Aim: always for a local repo; for a server, until trouble."""
        self.step = self.step if step is None else step
        if self.lost is None and isinstance(self.run, AimServerRun):
            trouble = self.run.trouble()
            if trouble is not None:
                self.lose(f"{trouble}, by step {self.step}")
        return self.lost is None

    def lose(self, why: str) -> None:
        self.lost = why
        if isinstance(self.run, AimServerRun):
            self.run.abandon()
        console.warn(f"{why}; the run goes on without Aim (TensorBoard has every step), and "
                     "its results.json records this")


class LocalAimRun:
    """An Aim run in a local repo, with AimServerRun's calls."""

    def __init__(self, aim: Any, run: Any) -> None:
        self.aim, self.aim_run, self.hash = aim, run, run.hash

    @classmethod
    def open(cls, repo_path: str, name: str, saved_hash: str | None) -> LocalAimRun:
        import aim

        Path(repo_path).mkdir(parents=True, exist_ok=True)
        # the same as `aim init` on first use; later runs share the repo
        repo = aim.Repo.from_path(repo_path, init=not aim.Repo.exists(repo_path))
        if saved_hash:
            return cls(aim, aim.Run(saved_hash, repo=repo, force_resume=True))
        run = aim.Run(repo=repo)
        run.name = name
        return cls(aim, run)

    def set(self, key: str, value: Any) -> None:
        self.aim_run[key] = value

    def track(self, value: tuple, name: str, step: int, context: dict[str, str]) -> None:
        self.aim_run.track(aim_value(self.aim, value), name=name, step=step, context=context)

    def close(self) -> None:
        self.aim_run.close()


def _aim_name(name: str) -> tuple[str, dict[str, str]]:
    """'val/loss' -> ('loss', {'subset': 'val'}); 'params/blocks.0.qkv.weight' keeps its path
    in the context; names without a slash have no context."""
    if "/" not in name:
        return name, {}
    head, tail = name.split("/", 1)
    if head in ("train", "val"):
        return tail, {"subset": head}
    return head, {"tensor": tail}


class WandbBackend:
    """Weights & Biases. The W&B run id is the chargpt run id, so a resumed run logs into the
    same W&B run; W&B's files (an offline run's whole log) live in runs/<id>/logs/wandb."""

    def __init__(self, run: RunPaths, config: Config) -> None:
        import wandb

        self.wandb = wandb
        self.paths = run
        self.mode = wandb_mode(config)
        self.run = wandb.init(
            project=config.train.wandb_project, id=run.run_id, name=run.run_id,
            dir=str(run.root / "logs"), mode=self.mode, resume="allow",
            config=flat_hparams(config),
            # its console capture and system monitor would compete with the progress bar
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))
        self.notes: list[str] = []

    def start(self, config: Config, metadata: Mapping[str, str]) -> None:
        self.run.config.update({"meta": {name: text[:2000] for name, text in metadata.items()}},
                               allow_val_change=True)
        # the metadata files in full, results.json included, as the run ends
        self.run.save(str(self.paths.meta / "*"), base_path=str(self.paths.root), policy="end")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_distributions(self, distributions: Mapping[str, Histogram], step: int) -> None:
        self.run.log({name: self.wandb.Histogram(np_histogram=(h.bin_counts,
                                                               [h.min, *h.bin_edges]))
                      for name, h in distributions.items()}, step=step)

    def log_text(self, name: str, text: str, step: int) -> None:
        self.run.log({name: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def log_summary(self, hparams: Mapping[str, Any], results: Mapping[str, float]) -> None:
        self.run.config.update(dict(hparams), allow_val_change=True)  # the final max_iters
        self.run.summary.update(dict(results))

    def close(self) -> None:
        offline_dir = Path(self.run.dir).parent
        self.run.finish()
        if self.mode == "offline":
            self.notes.append(f"the W&B run is offline; upload it with: wandb sync "
                              f"{offline_dir}")
