"""What serve.py does with trained runs (utils/run_catalog.py finds them): their models loaded
a few at a time, a generation as a stream of events with each character's odds, and a text
scored character by character.

Everything here is plain Python on top of the core and utils/: serve.py puts it on the web.
Every problem a user can fix is a UserError whose words are the command line's.

    catalog = RunCatalog(Path("runs"))
    request = GenerationRequest(run="20261207_143708_run", prompt="ROMEO:")
    sampling = request.sampling(limits)      # every check that needs no model
    loaded = ModelCache(catalog, device, capacity=3).get(request.run, request.checkpoint)
    prompt_ids, seed = prepare_prompt(loaded, request)
    for event in generation_events(loaded, request, sampling, prompt_ids, seed):
        ...                            # {"type": "start"}, {"type": "char"}..., {"type": "end"}
    scored = score_text(loaded, "To be, or not to be", limits)
"""

from __future__ import annotations

import contextlib
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pydantic
import torch
import torch.nn.functional as F

from generation import SamplingConfig, draw_probabilities
from model import LanguageModel
from tokenizer import CharTokenizer, UnknownCharactersError
from utils.decoding import Decoder
from utils.errors import UserError
from utils.run_catalog import EXPORT, LATEST, RunCatalog, weights_path
from utils.runs import RunPaths, load_run_model
from utils.sampling import (
    StopFilter,
    check_at_least_one,
    check_seed,
    encode_prompt,
    sampling_settings,
)

TOP_CANDIDATES = 10  # the candidates shown for each generated character
SCORE_CANDIDATES = 5  # and for each scored one: a long text's answer stays small
BITS_PER_NAT = 1 / math.log(2)
# each character shown is checked against every stop string: a few short ones keep that cheap
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 100


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_new_tokens: int = 2000
    max_score_chars: int = 20_000  # a scored text's length, and a prompt's


@dataclass
class LoadedModel:
    """A run's model ready to serve: the model to score with and a decoder to generate with."""

    run_id: str
    checkpoint: str
    model: LanguageModel
    decoder: Decoder
    tokenizer: CharTokenizer
    device: torch.device
    turns: threading.Lock  # held for each step of a generation


class ModelCache:
    """The last `capacity` models asked for, loaded on first use through the loader
    inference.py uses. Loads are one at a time, and a model asked for while it loads is
    loaded once; a loaded model is handed out, and the list of loaded ones read, without
    waiting for a load. A model evicted while a generation still uses it lives on until that
    generation ends.

    Generations and scores take turns: each generation step, and each window of a scored
    text, holds one lock shared by every model, so the work of several clients runs one
    piece after another instead of all at once fighting over the cores and
    Python's GIL, which is several times slower in all (BENCHMARKS.md, serve.py under
    load)."""

    def __init__(self, catalog: RunCatalog, device: torch.device, capacity: int = 3) -> None:
        self.catalog, self.device, self.capacity = catalog, device, capacity
        self._models: OrderedDict[tuple[str, str, int | None], LoadedModel] = OrderedDict()
        self._loading: dict[tuple[str, str, int | None], Future[LoadedModel]] = {}
        self._lock = threading.Lock()  # held only to read or change the two above
        self._loads = threading.Lock()  # held for each load
        self._turns = threading.Lock()

    def get(self, run_id: str, checkpoint: str = EXPORT) -> LoadedModel:
        run = self.catalog.resolve(run_id, checkpoint)
        # a run still training rewrites last and best: a new file is a new model
        try:
            version = weights_path(run, checkpoint).stat().st_mtime_ns
        except OSError:
            version = None  # missing: the loader says what the run holds instead
        key = (run.run_id, checkpoint, version)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            pending = self._loading.get(key)
            loads_it = pending is None
            if loads_it:
                pending = self._loading[key] = Future()
        if not loads_it:
            return pending.result()  # the loader's model, or its error
        try:
            with self._loads:
                loaded = self._load(run, checkpoint)
        except BaseException as error:
            with self._lock:
                del self._loading[key]
            pending.set_exception(error)
            raise
        with self._lock:
            del self._loading[key]
            # an earlier version of the same file is one no request can ask for any more
            for older in [k for k in self._models
                          if k[:2] == key[:2] and (k[2] or 0) < (key[2] or 0)]:
                del self._models[older]
            self._models[key] = loaded
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
        pending.set_result(loaded)
        return loaded

    def loaded(self) -> list[str]:
        """The models loaded now, least recently used first, as run:checkpoint."""
        with self._lock:
            return [f"{run_id}:{checkpoint}" for run_id, checkpoint, _ in self._models]

    def _load(self, run: RunPaths, checkpoint: str) -> LoadedModel:
        saved = load_run_model(str(run.root), self.catalog.runs_dir,
                               None if checkpoint == EXPORT else checkpoint, self.device)
        # the model as trained (F.linear), not a layout chosen by timing as inference.py's
        # cpu_decoder does: two float32 layouts can break a near-tie differently, and every
        # server process must give a seed the same characters
        decoder = Decoder(saved.model)
        return LoadedModel(run.run_id, checkpoint, saved.model, decoder, saved.tokenizer,
                           self.device, self._turns)


class ModelChoice(pydantic.BaseModel):
    """A run (its folder name under the runs folder) and what to load from it."""

    # a misspelt field is an error, and so is a value of another JSON type ("0.5", true):
    # taking it as the number it might mean would hide the client's mistake
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    run: str = LATEST
    checkpoint: str = EXPORT


class GenerationRequest(ModelChoice):
    """What POST /api/generate asks for: inference.py's flags and defaults, for one sample."""

    prompt: str = "\n"
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = []

    def sampling(self, limits: Limits) -> SamplingConfig:
        """The sampling settings, after the checks inference.py makes and the server's limit."""
        check_at_least_one("max_new_tokens", self.max_new_tokens)
        if self.max_new_tokens > limits.max_new_tokens:
            raise UserError(f"--max-new-tokens is at most {limits.max_new_tokens} on this "
                            f"server, got {self.max_new_tokens}")
        check_seed(self.seed)
        if "" in self.stop:
            raise UserError("argument --stop: expected a value, got an empty one")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise UserError(f"--stop: this server takes at most {MAX_STOP_STRINGS} stop strings "
                            f"of at most {MAX_STOP_CHARS} characters each")
        if len(self.prompt) > limits.max_score_chars:
            raise UserError(f"the prompt is {len(self.prompt):,} characters; this server takes "
                            f"at most {limits.max_score_chars:,} (the model reads only its last "
                            "context's worth)")
        return sampling_settings(self.temperature, self.top_k, self.top_p, self.min_p,
                                 self.repetition_penalty)


class ScoreRequest(ModelChoice):
    """What POST /api/score asks for: the text to score."""

    text: str


def check_score_length(text: str, limits: Limits) -> None:
    """The checks of a text to score that need no model."""
    if len(text) > limits.max_score_chars:
        raise UserError(f"the text is {len(text):,} characters; this server scores at most "
                        f"{limits.max_score_chars:,}")
    if len(text) < 2:
        raise UserError("the text needs at least two characters: the first is the context of "
                        "the second")


def prepare_prompt(loaded: LoadedModel, request: GenerationRequest) -> tuple[torch.Tensor, int]:
    """The checks of a generation that need its model, before anything is streamed (those
    that do not are request.sampling's): the prompt's ids (1, T) and the seed."""
    prompt_ids = torch.tensor([encode_prompt(loaded.tokenizer, request.prompt)],
                              device=loaded.device)
    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    return prompt_ids, seed


@torch.no_grad()
def generation_events(loaded: LoadedModel, request: GenerationRequest, sampling: SamplingConfig,
                      prompt_ids: torch.Tensor, seed: int) -> Iterator[dict[str, Any]]:
    """The events of one sample, as inference.py draws it for the same seed: a start event,
    one event per character shown (the probability the model gave it, and the top candidates
    before and after the sampling settings reshaped the model's odds), then an end event.

    A character that could begin a stop string is held back until it is ruled out, and the
    stop string itself is never sent (inference.py's StopFilter)."""
    generator = torch.Generator(device=loaded.device).manual_seed(seed)
    tokenizer = loaded.tokenizer
    yield {"type": "start", "run": loaded.run_id, "checkpoint": loaded.checkpoint,
           "seed": seed, "prompt_tokens": prompt_ids.size(1)}
    stop_filter = StopFilter(request.stop)
    held: list[dict[str, Any]] = []  # events of characters the stop filter holds back
    new_tokens, start = 0, time.perf_counter()
    steps = loaded.decoder.generate_steps(prompt_ids, request.max_new_tokens, sampling,
                                          generator)
    while True:
        with loaded.turns:  # one step at a time on this machine, in turn (see ModelCache)
            step = next(steps, None)
            if step is None:
                break
            token = int(step.ids[0])
            event = character_event(tokenizer, token, step.logits, sampling, step.context)
        new_tokens += 1
        held.append(event)
        shown = stop_filter.feed(tokenizer.decode([token]))
        yield from release(held, len(shown))
        if stop_filter.stopped:
            held.clear()
            break
    yield from release(held, len(stop_filter.flush()))
    seconds = time.perf_counter() - start
    yield {"type": "end", "new_tokens": new_tokens, "seconds": round(seconds, 4),
           "tokens_per_second": round(new_tokens / seconds, 1) if seconds > 0 else None,
           "seed": seed, "stopped": stop_filter.stopped}


def release(held: list[dict[str, Any]], count: int) -> Iterator[dict[str, Any]]:
    """The first `count` held events, taken off the list (one per character shown)."""
    released, held[:] = held[:count], held[count:]
    yield from released


def character_event(tokenizer: CharTokenizer, token: int, logits: torch.Tensor,
                    sampling: SamplingConfig, context: torch.Tensor) -> dict[str, Any]:
    """One generated character: the model's probability for it, and the top candidates of
    the model's odds (temperature 1, nothing cut) and of the odds it was drawn from."""
    model_probs = F.softmax(logits[0].float(), dim=-1)
    drawn_probs = draw_probabilities(logits, sampling, context)[0]
    return {"type": "char", "text": tokenizer.chars[token],
            "p": round(float(model_probs[token]), 6),
            "p_drawn": round(float(drawn_probs[token]), 6),
            "top": candidates(tokenizer, model_probs, TOP_CANDIDATES),
            "top_drawn": candidates(tokenizer, drawn_probs, TOP_CANDIDATES)}


def candidates(tokenizer: CharTokenizer, probs: torch.Tensor, count: int
               ) -> list[list[str | float]]:
    """The `count` most likely characters as [character, probability], those with any."""
    top = torch.topk(probs, min(count, probs.numel()))
    return [[tokenizer.chars[i], round(p, 6)]
            for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True) if p > 0]


@torch.no_grad()
def score_text(loaded: LoadedModel, text: str, limits: Limits) -> dict[str, Any]:
    """The model's surprise at each character of text given the ones before it, in bits, and
    the text's bits per character. The first character has nothing before it and is not
    scored. Past the context length, each character is scored with at least half a context of
    characters before it."""
    check_score_length(text, limits)
    try:
        ids = torch.tensor(loaded.tokenizer.encode(text), device=loaded.device)
    except UnknownCharactersError as error:
        raise UserError(f"the text has {error}; the model knows only the characters of its "
                        "training text") from None
    log_probs = next_char_log_probs(loaded.model, ids, loaded.turns)  # (len - 1, vocab)
    surprise = -log_probs.gather(1, ids[1:, None])[:, 0] * BITS_PER_NAT
    probs = log_probs.exp()
    chars = [{"text": text[0], "bits": None}]
    for position, bits in enumerate(surprise.tolist(), start=1):
        chars.append({"text": text[position], "bits": round(bits, 4),
                      "top": candidates(loaded.tokenizer, probs[position - 1],
                                        SCORE_CANDIDATES)})
    mean_bits = float(surprise.mean())
    return {"run": loaded.run_id, "checkpoint": loaded.checkpoint, "chars": chars,
            "scored": len(text) - 1, "bits_per_character": round(mean_bits, 6),
            "loss": round(mean_bits / BITS_PER_NAT, 6)}


def next_char_log_probs(model: LanguageModel, ids: torch.Tensor,
                        turns: threading.Lock | None = None) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) over the vocabulary for i = 1..len-1: (len - 1, vocab). Windows
    of block_size characters advance by half a window, and each keeps only the predictions
    the one before it did not make; each window's forward holds `turns`, if given."""
    block_size = model.config.block_size
    stride = max(1, block_size - block_size // 2)
    inputs = ids[:-1]
    rows: list[torch.Tensor] = []
    done = 0  # predictions made so far: of ids[1..done]
    start = 0
    while done < inputs.numel():
        window = inputs[start:start + block_size]
        with turns or contextlib.nullcontext():
            logits, _ = model(window[None])
        rows.append(F.log_softmax(logits[0].float(), dim=-1)[done - start:])
        done = start + window.numel()
        start += stride
    return torch.cat(rows)
