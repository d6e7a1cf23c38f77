"""Search train.py's settings for the lowest full-split val loss on your text, with Optuna.

Usage: python search.py --study lr --trials 20 --space configs/search/recipe.yaml \\
           --time-budget 60 --data-path my.txt
       python search.py --study lr ...same flags...   # continues the study (after Ctrl-C too)
       optuna-dashboard sqlite:///runs/search/studies.db    # watch it in a browser

Each trial is one ordinary train.py run, in its own process and run folder
(runs/<id>_<study>-t<N>): any train.py flag given here is the fixed part of every trial, the
space file names the settings the sampler picks (see configs/search/recipe.yaml), and a trial
is judged by the full-split val loss in its meta/results.json. Trial 0 is the config as given,
the baseline. A trial that fails (say n_embd not divisible by n_head) is recorded with its
error line and the search goes on. Ctrl-C stops the running trial the way it stops train.py;
the same command continues the study, resuming that trial first. --trials caps the study's
total, so the same command on several machines with one --storage shares the work.

Read top-down: main -> search (checks, then the study) -> run_trials -> run_trial -> report.
Storage, trial records and reruns are in utils/study.py; the space file in
utils/search_space.py; the train.py process in utils/trial_process.py.
"""

from __future__ import annotations

import argparse
import itertools
import math
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from utils import console
from utils.checkpoint import CHECKPOINT_SUFFIX
from utils.config import MAX_SEED, PROJECT_ROOT, USER_FIELDS, Config
from utils.config_loader import ConfigError, ConfigLoader
from utils.errors import TrainingFailure, UserError
from utils.runs import RunPaths, command_line, read_results
from utils.search_space import SearchSpace, SearchSpaceError, trial_flags
from utils.study import (
    BEYOND_CAP,
    DUPLICATE,
    ORPHAN_WAIT_SECONDS,
    STALE_SECONDS,
    check_study_name,
    count_toward_cap,
    ended_as,
    is_duplicate,
    mark_lost_trials,
    open_storage,
    open_study,
    queue_reruns,
    search_folder,
    storage_url,
    this_process,
    trial_run_tag,
    trials_training_alone,
    wait_for_trials_alone,
)
from utils.training import bits_per_character
from utils.trial_process import StopSignals, run_train_process

TRAIN_SCRIPT = PROJECT_ROOT / "train.py"
DEFAULT_SPACE = "configs/search/recipe.yaml"
BEST_SHOWN = 5


def main(argv: Sequence[str] | None = None) -> int:
    return console.run_main(search, sys.argv[1:] if argv is None else argv)


def search(argv: Sequence[str]) -> int:
    """Check everything, open (or continue) the study, run trials up to the cap, report."""
    loader = ConfigLoader()
    args = build_parser(loader).parse_args(argv)
    fixed_flags = train_flags(argv)
    base = loader.load(args)  # the fixed part, checked as train.py checks it
    space = SearchSpace.read(args.space)
    check_flags(args, space)
    space.check(lambda values: loader.load(args, values, f"search space {space.path}"))
    check_trial_command(loader, space, fixed_flags)
    check_study_name(args.study)
    runs_dir = Path(base.train.runs_dir)
    url = storage_url(args.storage, runs_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # search.py prints its own lines
    sampler = optuna.samplers.TPESampler(seed=args.sampler_seed)
    study = open_study(args.study, open_storage(url), space.describe(), fixed_flags,
                       command_line("search.py", argv), sampler)
    with StopSignals() as signals:
        prepare(study, space, base, runs_dir, signals)
        console.info(f"study {args.study} in {url}: {count_toward_cap(study)} of "
                     f"{args.trials} trials so far")
        run_trials(study, args, loader, space, fixed_flags, runs_dir, signals)
    report(study, space, fixed_flags, url)
    if signals.requested:
        console.warn(f"search stopped by {signals.name}; continue it with "
                     f"{command_line('search.py', argv)}")
        return signals.exit_code
    states = {t.state for t in study.get_trials(deepcopy=False)}
    if not states & {TrialState.COMPLETE, TrialState.RUNNING}:  # none finished, none can
        raise TrainingFailure("no trial of the study finished; see each trial's line above "
                              f"and its log in {search_folder(runs_dir, args.study)}")
    return 0


def build_parser(loader: ConfigLoader) -> argparse.ArgumentParser:
    """search.py's own flags, then every train.py setting as the fixed part of each trial."""
    parser = loader.build_parser(__doc__)
    group = parser.add_argument_group("search")
    add_search_flags(group)
    return parser


def add_search_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--study", required=True,
                        help="name of the study; the same name continues it, and names each "
                             "trial's run folder <id>_<study>-t<N>")
    parser.add_argument("--trials", type=int, default=20,
                        help="trials the study holds in all, over every process that works on "
                             "it; a failed trial counts, an interrupted one is run again "
                             "(default: 20)")
    parser.add_argument("--space", type=Path, default=Path(DEFAULT_SPACE), metavar="FILE",
                        help="YAML file of the settings to search: name: {low, high, log, "
                             f"step}}, name: {{choices: [...]}} or name: value (default: "
                             f"{DEFAULT_SPACE})")
    parser.add_argument("--storage", metavar="URL",
                        help="Optuna storage: sqlite:///FILE.db, postgresql://... or mysql://... "
                             "for several machines, or a journal file path for several "
                             "processes on one disk (default: sqlite:///<runs-dir>/search/"
                             "studies.db)")
    parser.add_argument("--sampler-seed", type=int, metavar="N",
                        help="seed of the sampler's picks, to repeat a study's first picks; "
                             "each process of a shared study should have its own or none "
                             "(default: none)")


def train_flags(argv: Sequence[str]) -> list[str]:
    """The argv without search.py's own flags: the fixed part each trial passes to train.py."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_search_flags(own)
    return own.parse_known_args(list(argv))[1]


def check_flags(args: argparse.Namespace, space: SearchSpace) -> None:
    if args.trials < 1:
        raise UserError(f"--trials must be at least 1, got {args.trials}")
    if args.sampler_seed is not None and not 0 <= args.sampler_seed <= MAX_SEED:
        raise UserError(f"--sampler-seed must be in [0, {MAX_SEED}], got {args.sampler_seed}")
    given = [key for key in vars(args) if key in USER_FIELDS]
    if "run_tag" in given:
        raise UserError("search.py names each trial's run folder <id>_<study>-t<N>; leave "
                        "--run-tag out")
    both = [key for key in space.keys if key in given]
    if both:
        flag = "--" + both[0].replace("_", "-")
        raise UserError(f"{both[0]} is both in search space {space.path} and given as {flag}; "
                        "keep it in one of them")


def check_trial_command(loader: ConfigLoader, space: SearchSpace,
                        fixed_flags: list[str]) -> None:
    """A trial passes every setting of the space to train.py as a flag, beside the fixed
    flags: refuse a space whose flags train.py refuses whatever their values (--max-iters
    beside --time-budget, --wandb-project without --wandb). A switch the space searches may
    decide it (wandb_logging: {choices: [false, true]}): one way it goes is enough."""
    switches = [key for key, distribution in space.distributions.items()
                if isinstance(distribution, optuna.distributions.CategoricalDistribution)
                and all(isinstance(choice, bool) for choice in distribution.choices)]
    clash = None
    for turned in itertools.product(*(space.distributions[key].choices for key in switches)):
        values = {**space.trial_values(), **dict(zip(switches, turned, strict=True))}
        clash = flag_clash(loader, values, fixed_flags)
        if clash is None:
            return
    raise SearchSpaceError(f"search space {space.path}: train.py refuses the flags each trial "
                           f"would pass: {clash}")


def flag_clash(loader: ConfigLoader, values: dict[str, Any],
               fixed_flags: list[str]) -> ConfigError | None:
    """What train.py refuses in the flags that set these values beside the fixed ones, of
    the rules about flags given together (the values' own rules are space.check's)."""
    try:
        loader.check_layers(loader.build_parser().parse_args([*fixed_flags,
                                                              *trial_flags(values)]))
    except ConfigError as error:
        return error
    return None


def prepare(study: optuna.Study, space: SearchSpace, base: Config, runs_dir: Path,
            signals: StopSignals) -> None:
    """Trials lost with a killed search end as lost; those and interrupted ones are queued to
    run again; a new study's first trial is the baseline."""
    alone = trials_training_alone(study)
    if alone:
        console.info(f"trial {', '.join(map(str, alone))}: train.py still runs though its "
                     f"search is gone; waiting up to {ORPHAN_WAIT_SECONDS} s for it to stop")
        wait_for_trials_alone(study, until=lambda: signals.requested)
    for number in mark_lost_trials(study):
        console.warn(f"trial {number} was left running by a search that is gone: it runs again")
    for number in trials_training_alone(study):
        console.warn(f"trial {number}'s train.py still runs though its search is gone: it is "
                     "left running and counted; continue the study once it has stopped")
    for number in queue_reruns(study, runs_dir):
        console.info(f"trial {number} did not finish: it runs again first, resumed from its "
                     "run folder where it has a checkpoint")
    if study.get_trials(deepcopy=False):
        return
    current = {key: value for section in base.to_dict().values() for key, value in section.items()}
    params, outside = space.baseline(current)
    for key in outside:
        console.warn(f"the baseline cannot keep {key}={current[key]}: the space cannot hold "
                     "that value, so trial 0 samples it")
    # a second process starting the same new study at the same moment may queue it too: the
    # trial numbered last ends as a duplicate when it is taken
    study.enqueue_trial(params, user_attrs={"baseline": True}, skip_if_exists=True)


def run_trials(study: optuna.Study, args: argparse.Namespace, loader: ConfigLoader,
               space: SearchSpace, fixed_flags: list[str], runs_dir: Path,
               signals: StopSignals) -> None:
    """Ask for trials and run them until the study holds --trials or a stop signal comes."""
    while not signals.requested and count_toward_cap(study) < args.trials:
        trial = study.ask(space.distributions)
        if is_duplicate(study, trial):
            trial.set_user_attr("ended", DUPLICATE)
            study.tell(trial, state=TrialState.FAIL)
            continue
        # another process may have asked at the same moment: the trial numbered last loses
        if count_toward_cap(study, below=trial.number) >= args.trials:
            trial.set_user_attr("ended", BEYOND_CAP)
            study.tell(trial, state=TrialState.FAIL)
            return
        run_trial(study, trial, args, loader, space, fixed_flags, runs_dir, signals)


def run_trial(study: optuna.Study, trial: optuna.Trial, args: argparse.Namespace,
              loader: ConfigLoader, space: SearchSpace, fixed_flags: list[str],
              runs_dir: Path, signals: StopSignals) -> None:
    """Run one trial as a train.py process and tell the study how it ended."""
    for key, value in {**this_process(), "alive_at": time.time()}.items():
        trial.set_user_attr(key, value)
    values = {**space.fixed, **trial.params}
    name = f"trial {trial.number}"
    try:  # a rule between two searched values (n_embd divisible by n_head) fails here at once
        loader.load(args, values, f"{name}'s values")
    except ConfigError as error:
        return finish(study, trial, "failed", error=str(error))
    # a rerun of an interrupted or lost trial goes on from its run's last checkpoint
    resumed = trial.user_attrs.get("run")
    if resumed and not (RunPaths(Path(resumed)).checkpoints
                        / f"last{CHECKPOINT_SUFFIX}").is_file():
        resumed = None
    # a lost trial's train.py may have ended its run after its search was gone
    if resumed and (results := scored_results(Path(resumed), exit_code=None)):
        return complete(study, trial, results, seconds=None, run=Path(resumed))
    if resumed:
        command = [sys.executable, str(TRAIN_SCRIPT), "--resume", resumed]
    else:
        command = [sys.executable, str(TRAIN_SCRIPT), *fixed_flags, *trial_flags(values),
                   "--run-tag", trial_run_tag(args.study, trial.number)]
    log = search_folder(runs_dir, args.study) / f"t{trial.number}.log"
    console.info(f"{name} running: {describe_values(trial.params)}"
                 + (f", resuming {resumed}" if resumed else "") + f" (log: {log})")
    started = time.perf_counter()
    outcome = run_train_process(
        command, log, signals, runs_dir,
        on_run_folder=lambda run: record(trial, "run", str(run), signals),
        on_alive=lambda: record(trial, "alive_at", time.time(), signals),
        on_start=lambda pid: record(trial, "train_pid", pid, signals))
    seconds = time.perf_counter() - started
    if results := scored_results(outcome.run, outcome.exit_code):
        return complete(study, trial, results, seconds, outcome.run)
    if signals.requested:
        return finish(study, trial, "interrupted", seconds=seconds, run=outcome.run)
    results = read_results(RunPaths(outcome.run)) if outcome.run else None
    error = outcome.error or (f"the run ended without a full-split val loss "
                              f"({results.get('end_reason')})" if isinstance(results, dict) else
                              f"train.py ended with exit code {outcome.exit_code}; see its log")
    finish(study, trial, "failed", error=error, seconds=seconds, run=outcome.run)


def scored_results(run: Path | None, exit_code: int | None) -> dict[str, Any] | None:
    """The run's results.json if its train.py ended well (exit_code 0, or None where the
    process was not this search's: a lost trial's) having taken its steps and scored itself,
    else None."""
    results = read_results(RunPaths(run)) if run else None
    if exit_code not in (0, None) or not isinstance(results, dict):
        return None
    loss = results.get("full_split_val_loss")
    cut_short = str(results.get("end_reason")).startswith("stopped by")  # by a signal
    if (not cut_short and isinstance(loss, (int, float)) and math.isfinite(loss)
            and "training_seconds" in results and "steps" in results):
        return results
    return None


def complete(study: optuna.Study, trial: optuna.Trial, results: dict[str, Any],
             seconds: float | None, run: Path) -> None:
    loss = results["full_split_val_loss"]
    trial.set_user_attr("bpc", bits_per_character(loss))
    trial.set_user_attr("training_seconds", results["training_seconds"])
    trial.set_user_attr("steps", results["steps"])
    finish(study, trial, "complete", value=loss, seconds=seconds, run=run)


def record(trial: optuna.Trial, key: str, value: Any, signals: StopSignals) -> None:
    """Set a user attribute of the running trial. If another search has taken it for lost
    meanwhile (it heard nothing from this one for STALE_SECONDS), that search runs it again:
    this one stops its train.py, which checkpoints, and finish says so."""
    try:
        trial.set_user_attr(key, value)
    except optuna.exceptions.UpdateFinishedTrialError:
        signals.stop_process()


def finish(study: optuna.Study, trial: optuna.Trial, ended: str, value: float | None = None,
           error: str | None = None, seconds: float | None = None,
           run: Path | None = None) -> None:
    """Record how the trial ended, tell the study, and print its line."""
    try:
        trial.set_user_attr("ended", ended)
        if error is not None:
            trial.set_user_attr("error", error)
        if seconds is not None:
            trial.set_user_attr("seconds", round(seconds, 1))
        study.tell(trial, value, state=TrialState.COMPLETE if ended == "complete"
                   else TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        console.warn(f"trial {trial.number} was taken for lost by another search while it ran "
                     f"(nothing was heard from this one for {STALE_SECONDS // 60} minutes): "
                     "that search runs it again, and this end is not recorded")
        return
    took = f", {seconds:.0f} s" if seconds is not None else ""
    where = f", {run}" if run else ""
    values = describe_values(trial.params)
    if ended == "complete":
        print(f"trial {trial.number}: {values}: full-split val loss {value:.4f}, "
              f"{bits_per_character(value):.3f} bits per character{took}{where}", flush=True)
    elif ended == "interrupted":
        print(f"trial {trial.number}: {values}: interrupted{took}{where}", flush=True)
    else:
        print(f"trial {trial.number}: {values}: failed: {error}{where}", flush=True)


def report(study: optuna.Study, space: SearchSpace, fixed_flags: list[str], url: str) -> None:
    """The best trials as a table, and the train.py command that repeats the best one."""
    trials = study.get_trials(deepcopy=False)
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    ends = [ended_as(t) for t in trials]
    counts = ", ".join(f"{ends.count(e)} {e}" for e in dict.fromkeys(ends))
    print(f"study {study.study_name}: {len(trials)} trials ({counts})")
    if not done:
        return
    print(f"\n{'trial':>5}  {'val loss':>8}  {'bits/char':>9}  {'seconds':>7}  values")
    for trial in done[:BEST_SHOWN]:
        baseline = " (baseline)" if trial.user_attrs.get("baseline") else ""
        print(f"{trial.number:>5}  {trial.value:>8.4f}  {trial.user_attrs['bpc']:>9.3f}  "
              f"{trial.user_attrs['training_seconds']:>7.0f}  "
              f"{describe_values(trial.params)}{baseline}")
    best = done[0]
    command = ["python", "train.py", *fixed_flags, *trial_flags({**space.fixed, **best.params})]
    print(f"\nbest: trial {best.number}, run folder {best.user_attrs.get('run')}")
    print(f"repeat it: {shlex.join(command)}")
    if url.startswith("sqlite:///"):
        print(f"see the study: optuna-dashboard {url}")


def describe_values(params: Mapping[str, Any]) -> str:
    shown = [f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
             for key, value in params.items()]
    return " ".join(shown) or "the config as given"


if __name__ == "__main__":
    console.exit_process(main())
