"""What inference.py and serve.py share about a generation request: the checks of its sampling
settings, seed and prompt, with the words the command line uses, and the filter that ends a
sample at a stop string.

    sampling = sampling_settings(temperature=0.8, top_k=None, top_p=0.9, min_p=None,
                                 repetition_penalty=1.0)   # or UserError("--top-p: ...")
    ids = encode_prompt(tokenizer, "ROMEO:")                # or UserError naming the characters
"""

from __future__ import annotations

from collections.abc import Sequence

from generation import SamplingConfig
from model import ConfigFieldError
from tokenizer import CharTokenizer, UnknownCharactersError
from utils.config import MAX_SEED
from utils.errors import UserError


def sampling_settings(temperature: float, top_k: int | None, top_p: float | None,
                      min_p: float | None, repetition_penalty: float) -> SamplingConfig:
    """The SamplingConfig these values make, or a UserError naming the flag that is wrong."""
    try:
        return SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty)
    except ConfigFieldError as error:
        raise UserError(f"--{error.fields[0].replace('_', '-')}: {error}") from None


def check_at_least_one(name: str, value: int) -> None:
    if value < 1:
        raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be in [0, {MAX_SEED}], got {seed}")


def check_prompt(prompt: str) -> None:
    if not prompt:
        raise UserError("the prompt is empty; pass --prompt TEXT with at least one character")


def encode_prompt(tokenizer: CharTokenizer, prompt: str) -> list[int]:
    """The prompt's ids, or a UserError naming the characters the model does not know."""
    check_prompt(prompt)
    try:
        return tokenizer.encode(prompt)
    except UnknownCharactersError as error:
        raise UserError(f"the prompt has {error}; the model knows only the characters of its "
                        "training text") from None


class StopFilter:
    """Turns streamed pieces of one sample into text safe to show, ending at a stop string.

    Text that could still be the start of a stop string is held back until it is ruled out,
    so the output never shows a partial match that later turns out to be a stop string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        matches = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if matches:
            self.stopped = True
            shown, self.pending = self.pending[:min(matches)], ""
            return shown
        held = max((k for s in self.stops for k in range(1, len(s))
                    if self.pending.endswith(s[:k])), default=0)
        shown = self.pending[:len(self.pending) - held]
        self.pending = self.pending[len(shown):]
        return shown

    def flush(self) -> str:
        shown, self.pending = ("" if self.stopped else self.pending), ""
        return shown
