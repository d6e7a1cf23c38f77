"""Generation: sampling text from a LanguageModel with a KV cache, as functions that take the
model, and the sampler they draw each token with.

Copy it with model.py, the one project file it needs.

    ids = generate(model, prompt_ids, 200, top_k=10)            # (B, T + 200)
    for next_ids in generate_stream(model, prompt_ids, 200, SamplingConfig(temperature=0.8)):
        ...                                                      # (B,) as each is sampled
    for step in generate_steps(model, prompt_ids, 200):        # each token with the logits
        ...                                                      # and context it came from
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import ConfigFieldError, KVCache, LanguageModel, check_field_values

# runs one cached step: step(ids (B, 1), cache=cache) -> (logits (B, 1, vocab), None)
DecodeStep = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from logits. temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        check_field_values(self)
        if self.temperature < 0:
            raise ConfigFieldError(
                f"temperature must be >= 0 (0 = greedy), got {self.temperature}", "temperature"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ConfigFieldError(f"top_k must be at least 1, got {self.top_k}", "top_k")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigFieldError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ConfigFieldError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.repetition_penalty <= 0:
            raise ConfigFieldError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
                "repetition_penalty",
            )


@dataclass(frozen=True)
class SampledStep:
    """One generation step: the tokens drawn (B,), the model's logits (B, vocab) they were
    drawn from, and the context (B, t) the repetition penalty saw."""

    ids: torch.Tensor
    logits: torch.Tensor
    context: torch.Tensor


def generate_stream(
    model: LanguageModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    step: DecodeStep | None = None,
) -> Iterator[torch.Tensor]:
    """Yield each new token (B,) as it is sampled after the prompt idx (B, T); the arguments
    as in generate_steps."""
    for sampled in generate_steps(model, idx, max_new_tokens, sampling, generator, use_cache,
                                  step):
        yield sampled.ids


@torch.no_grad()
def generate_steps(
    model: LanguageModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    step: DecodeStep | None = None,
) -> Iterator[SampledStep]:
    """Yield each step after the prompt idx (B, T): the tokens sampled, with the logits and
    context they were sampled from.

    Context policy past block_size: the window holds at most block_size tokens. When one more
    would not fit, the window restarts from the most recent half of the text (latest token
    included) at positions 0.., which is one fresh prefill; with use_cache=False the same
    window is recomputed every step, so both paths see identical contexts.

    step(ids, cache=cache) runs each cached one-token step instead of the model itself, a
    compiled form of its forward, say; prefills always run the model.
    """
    sampling = sampling or SamplingConfig()
    block_size = model.config.block_size
    keep = max(1, block_size // 2)
    text = idx[:, -block_size:]
    window_len = text.size(1)
    cache = KVCache(model.config, idx.size(0)) if use_cache else None
    cached_step = step or model
    logits, _ = model(text, cache=cache)
    for count in range(1, max_new_tokens + 1):
        next_id = sample_next(logits[:, -1], sampling, text, generator)  # (B,)
        yield SampledStep(next_id, logits[:, -1], text)
        if count == max_new_tokens:
            break
        text = torch.cat([text, next_id[:, None]], dim=1)[:, -block_size:]
        if window_len == block_size:
            window_len = keep
            if cache is not None:
                cache.reset()
            logits, _ = model(text[:, -keep:], cache=cache)
        else:
            window_len += 1
            if cache is not None:
                logits, _ = cached_step(next_id[:, None], cache=cache)
            else:
                logits, _ = model(text[:, -window_len:])


@torch.no_grad()
def generate(
    model: LanguageModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    step: DecodeStep | None = None,
) -> torch.Tensor:
    """The prompt idx (B, T) followed by max_new_tokens sampled ids: (B, T + max_new_tokens);
    step as in generate_steps."""
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty)
    new = list(generate_stream(model, idx, max_new_tokens, sampling, generator, use_cache, step))
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx


def sample_next(
    logits: torch.Tensor,
    sampling: SamplingConfig,
    context: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of logits (B, vocab); a pure function of its inputs and generator.

    context (B, T) holds the tokens the repetition penalty applies to.
    """
    logits = penalise_repetition(logits.float(), sampling, context)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probabilities(logits, sampling)
    # one draw of torch.multinomial(probs, 1), the same token for the same generator state,
    # without its checks of probs (softmax's are valid), which cost more than the draw:
    # the largest p_i / q_i with q_i ~ Exp(1) is token i with probability p_i
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def draw_probabilities(logits: torch.Tensor, sampling: SamplingConfig,
                       context: torch.Tensor | None = None) -> torch.Tensor:
    """The probabilities (B, vocab) sample_next draws from, after every sampling setting
    reshaped the model's: greedy puts all of it on one token."""
    logits = penalise_repetition(logits.float(), sampling, context)
    if sampling.temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    return sampling_probabilities(logits, sampling)


def penalise_repetition(logits: torch.Tensor, sampling: SamplingConfig,
                        context: torch.Tensor | None) -> torch.Tensor:
    """CTRL-style: tokens already in the context (B, T) made less likely, whatever the sign
    of their logit."""
    if sampling.repetition_penalty == 1.0 or context is None:
        return logits
    seen = logits.gather(1, context)
    penalised = torch.where(
        seen > 0, seen / sampling.repetition_penalty, seen * sampling.repetition_penalty
    )
    return logits.scatter(1, context, penalised)


def sampling_probabilities(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The probabilities (B, vocab) a token is drawn from at temperature > 0: softmax of
    logits / temperature, with the tokens top_k, top_p and min_p drop set to 0."""
    # the largest logit shifted to 0 first: softmax is the same, and a tiny temperature (or a
    # repetition penalty far from 1) cannot overflow the logits to inf and the odds to nan
    largest = torch.finfo(logits.dtype).max
    logits = logits.clamp(-largest, largest)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    if sampling.temperature != 1.0:
        # a temperature below float32's range divides by 0: the largest logits (0 / 0) stay 0
        logits = (logits / sampling.temperature).nan_to_num(0.0, math.inf, -math.inf)
    if sampling.top_k is not None:
        kth = torch.topk(logits, min(sampling.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if sampling.top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p; the top one stays
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
    if sampling.min_p is not None:
        # keep tokens at least min_p times as likely as the most likely one (which always stays)
        threshold = sampling.min_p * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs
