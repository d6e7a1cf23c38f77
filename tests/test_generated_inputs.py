"""Generated inputs for every flag of every script (Hypothesis): whatever a user types, a script
exits 0, 1 (a training failure, with its line) or 2 (bad input, with its line), never with a
traceback, and on exit 2 it has written nothing.

The flags come from the scripts' own parsers, so a new flag is covered the day it is added.
Each flag gets values of its own type and of every other: negative, zero and huge numbers, nan
and inf, empty and unicode text, and paths to a file, a folder of someone else's files, a place
that does not exist, one under a file, one that cannot be written and a name too long for the
file system. The scripts run in process, in a folder of their own per example.

Past the checks, real work starts (a model is built, a decoding copy made, a profile run): the
first test stops each script there, so that a valid but huge value (a billion steps) is
accepted without being carried out; the second runs small valid values to the end. The
default profile runs a few dozen examples per script, the same ones every time; more, with
fresh draws: pytest tests/test_generated_inputs.py --hypothesis-profile=long
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import tempfile
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import export
import inference
import profile_model
import search
import serve
import train
from utils.config import USER_FIELDS
from utils.config_loader import ConfigLoader
from utils.config_values import split_optional

CORPUS = "".join(f"{name}.\nTo be, or not to be, that is the question {i % 7}.\n"
                 for i, name in enumerate(("HAMLET", "OPHELIA", "HORATIO") * 80))
TINY_MODEL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
              "--device", "cpu", "--num-threads", "1"]
TINY_RUN = [*TINY_MODEL, "--data-path", "corpus.txt", "--max-iters", "2", "--eval-interval",
            "1", "--eval-iters", "1", "--sample-tokens", "5", "--batch-size", "2",
            "--full-split-max-tokens", "64", "--histogram-interval", "0", "--runs-dir", "runs"]
# the places a path flag is given, in each example's own folder (see workspace)
PATHS = {
    "file": "notes.txt", "folder of other files": "other", "missing": "new/deeper",
    "under a file": "notes.txt/below", "unwritable": "/proc/chargpt-nowhere",
    "name too long": "x" * 300, "run": "runs/trained", "file in a run": "runs/trained/meta/"
    "full_config.json", "transformers export": "hf", "here": ".",
    "search space": "space.yaml",
}


class WorkStarted(BaseException):
    """Raised where a script's checks are over and its work begins (not an Exception, so no
    handler of the script takes it)."""


@dataclass(frozen=True)
class Script:
    main: Callable[[Sequence[str]], int]
    parser: Callable[[], argparse.ArgumentParser]
    base: tuple[str, ...]  # flags that make its work small; generated flags come after them
    work_starts: tuple[object, str]  # (module, function) called once every check has passed


SCRIPTS = {
    "train.py": Script(train.main, lambda: train.build_parser(ConfigLoader()), tuple(TINY_RUN),
                       (train, "init_state")),
    "inference.py": Script(inference.main, inference.build_parser,
                           ("--run", "runs/trained", "--max-new-tokens", "5", "--prompt", "To",
                            "--device", "cpu"), (inference, "cpu_decoder")),
    "export.py": Script(export.main, export.build_parser,
                        ("--run", "runs/trained", "--out", "exported"), (export, "export")),
    "profile_model.py": Script(profile_model.main,
                               lambda: profile_model.build_parser(ConfigLoader()),
                               (*TINY_RUN, "--steps", "1", "--warmup", "0"),
                               (profile_model, "init_state")),
    "serve.py": Script(serve.main, serve.build_parser,
                       ("--runs-dir", "runs", "--run", "trained", "--port", "0"),
                       (serve, "serve_forever")),
    "search.py": Script(search.main, lambda: search.build_parser(ConfigLoader()),
                        ("--study", "generated", "--trials", "1", "--space", "space.yaml",
                         *TINY_RUN), (search, "open_study")),
}


# --- strategies, from the parsers' own flags -------------------------------------------------

def flags_of(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if action.option_strings
            and not isinstance(action, argparse._HelpAction)]


def own_type(action: argparse.Action) -> typing.Any:
    """The type the flag's value converts to: a config field's annotation, or argparse's."""
    if action.dest in USER_FIELDS:
        return split_optional(typing.get_type_hints(USER_FIELDS[action.dest])[action.dest])[1]
    return getattr(action.type, "converts", None) or str


numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(["0", "-1", "1", "2", "-0", "1e999", "nan", "inf", "-inf", "1e-320",
                     str(2**63), str(2**64 + 1)]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
# what a command line can hold: any text but NUL
texts = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)),
                max_size=12)
paths = st.sampled_from(sorted(PATHS.values()))
words = st.sampled_from(["none", "latest", "auto", "cpu", "cuda", "cuda:7", "mps", "best",
                         "last", "step_2", "step_999", "random", "True", "yes", "off"])


def values_for(action: argparse.Action) -> st.SearchStrategy[str]:
    """Values of the flag's own type first, then of any other."""
    if action.choices:
        own = st.sampled_from([str(c) for c in action.choices])
    elif typing.get_origin(own_type(action)) is typing.Literal:
        own = st.sampled_from(typing.get_args(own_type(action)))
    elif own_type(action) in (int, float):
        own = numbers
    elif own_type(action) is bool:
        own = st.sampled_from(["true", "false", "1", "0"])
    else:
        own = st.one_of(paths, texts, words)
    return st.one_of(own, numbers, texts, paths, words)


def argv_for(action: argparse.Action) -> st.SearchStrategy[list[str]]:
    """One use of the flag: a switch as itself (or its --no- form), a flag with its value."""
    if action.nargs == 0:
        return st.sampled_from([[option] for option in action.option_strings])
    return values_for(action).map(lambda value: [action.option_strings[0], value])


def generated_argv(script: str) -> st.SearchStrategy[list[str]]:
    uses = [argv_for(action) for action in flags_of(SCRIPTS[script].parser())]
    return st.lists(st.one_of(uses), min_size=1, max_size=3).map(
        lambda picked: [part for use in picked for part in use])


# --- running a script in its own folder ------------------------------------------------------

@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder each example starts from: the corpus, a trained run with checkpoints, a
    transformers export, a file and a folder of someone else's files."""
    root = tmp_path_factory.mktemp("workspace")
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    (root / "notes.txt").write_text("not ours", encoding="utf-8")
    (root / "space.yaml").write_text("learning_rate: {low: 0.001, high: 0.01, log: true}\n",
                                     encoding="utf-8")
    (root / "other").mkdir()
    (root / "other" / "keep.me").write_text("not ours either", encoding="utf-8")
    with contextlib.chdir(root), quiet():
        assert train.main([*TINY_RUN, "--checkpoint-interval", "1"]) == 0
        (run,) = Path("runs").iterdir()
        run.rename("runs/trained")
        assert export.main(["--run", "runs/trained", "--out", "hf"]) == 0
    return root


@contextlib.contextmanager
def quiet() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


@contextlib.contextmanager
def workspace(template: Path) -> Iterator[Path]:
    """A fresh copy of the template as the working folder; torch's threads and random state
    are put back afterwards, as the scripts set them for the whole process."""
    threads, random_state = torch.get_num_threads(), torch.get_rng_state()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "w"
        shutil.copytree(template, root, symlinks=True)
        try:
            with contextlib.chdir(root):
                yield root
        finally:
            torch.set_num_threads(threads)
            torch.set_rng_state(random_state)


def snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every folder under root, and every file with its size and modification time. (A
    folder's own time changes when the output check probes it, which leaves nothing.)"""
    found: dict[str, tuple[int, int] | None] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[str((Path(folder) / name).relative_to(root))] = None
        for name in files:
            path = Path(folder) / name
            stat = path.lstat()
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


@contextlib.contextmanager
def stopped_where_work_starts(script: Script) -> Iterator[None]:
    module, name = script.work_starts

    def stop(*args: object, **kwargs: object) -> typing.NoReturn:
        raise WorkStarted

    original = getattr(module, name)
    setattr(module, name, stop)
    try:
        yield
    finally:
        setattr(module, name, original)


def check_contract(script: Script, argv: list[str], root: Path, stop_at_work: bool) -> int | None:
    """Run the script; exit 0, 1 or 2 with one error line, no traceback, and nothing written
    on exit 2. Returns the exit code, None where the work started."""
    before = snapshot(root)
    stops = stopped_where_work_starts(script) if stop_at_work else contextlib.nullcontext()
    with quiet() as (_, err), stops:
        try:
            code = script.main(list(argv))
        except WorkStarted:
            event("accepted: the work started")
            return None
    message = err.getvalue()
    event(f"exit {code}")
    assert "Traceback" not in message, message
    assert code in (0, 1, 2), (code, message)
    if code:
        errors = [line for line in message.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message.rstrip().endswith(errors[0]), message
    if code == 2:
        assert snapshot(root) == before, f"exit 2 wrote files: {message}"
    return code


# --- the tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCRIPTS)
@given(data=st.data())
def test_any_value_of_any_flag_is_refused_in_one_line_or_accepted(template, name, data):
    script = SCRIPTS[name]
    argv = data.draw(generated_argv(name), label="flags")
    with workspace(template) as root:
        check_contract(script, [*script.base, *argv], root, stop_at_work=True)


def small_valid_values(action: argparse.Action) -> st.SearchStrategy[str] | None:
    """Values of the flag's own type in the range a tiny run takes; None for a path or text
    flag, and for --compile (compiling takes tens of seconds; tests/test_decoding.py and
    tests/test_train.py compile)."""
    kind = own_type(action)
    if action.dest == "compile":
        return None
    if action.nargs == 0:
        return st.just("")
    if action.choices or typing.get_origin(kind) is typing.Literal:
        return st.sampled_from([str(c) for c in action.choices or typing.get_args(kind)])
    if kind is int:
        return st.integers(0, 4).map(str)
    if kind is float:
        return st.floats(0, 1.5, allow_subnormal=False).map(lambda x: f"{x:.3g}")
    return None


def small_valid_argv(script: str) -> st.SearchStrategy[list[str]]:
    uses = []
    for action in flags_of(SCRIPTS[script].parser()):
        values = small_valid_values(action)
        if values is not None:
            option = action.option_strings[0]
            uses.append(values.map(lambda v, o=option: [o] if v == "" else [o, v]))
    return st.lists(st.one_of(uses), min_size=1, max_size=3).map(
        lambda picked: [part for use in picked for part in use])


# a third of the profile's examples: each one here trains (about 0.3 s), where the others stop
# at the start of the work
@pytest.mark.parametrize("name", ["train.py", "inference.py"])
@settings(max_examples=max(10, settings.default.max_examples // 3))
@given(data=st.data())
def test_small_valid_values_run_to_the_end(template, name, data):
    script = SCRIPTS[name]
    argv = data.draw(small_valid_argv(name), label="flags")
    with workspace(template) as root:
        check_contract(script, [*script.base, *argv], root, stop_at_work=False)
