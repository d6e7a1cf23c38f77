"""Generation: cached and uncached decoding agree, a seed repeats its text, and the sampler
draws what torch.multinomial would, within top_k, top_p and min_p, with the repetition penalty."""

from __future__ import annotations

import pytest
import torch

import generation
from generation import SamplingConfig, generate, sample_next, sampling_probabilities
from model import ConfigFieldError


def record_step_logits(monkeypatch) -> list[torch.Tensor]:
    """Capture the logits each generation step samples from."""
    seen: list[torch.Tensor] = []
    real = generation.sample_next

    def recording(logits, *args, **kwargs):
        seen.append(logits.clone())
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(generation, "sample_next", recording)
    return seen


@pytest.mark.parametrize(
    ("batch_size", "prompt_len", "new_tokens"),
    [(1, 1, 10), (3, 5, 10), (2, 16, 6), (2, 3, 60)],
    ids=["batch1-one-char-prompt", "batch3", "prompt-of-block-size", "well-past-block-size"],
)
def test_cached_greedy_generation_equals_the_uncached_path(
    tiny_model, tiny_config, monkeypatch, batch_size, prompt_len, new_tokens
):
    prompt = torch.randint(tiny_config.vocab_size, (batch_size, prompt_len))
    logits = record_step_logits(monkeypatch)
    cached = generate(tiny_model, prompt, new_tokens, temperature=0, use_cache=True)
    cached_logits = list(logits)
    logits.clear()
    uncached = generate(tiny_model, prompt, new_tokens, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape == (batch_size, prompt_len + new_tokens)
    assert len(cached_logits) == len(logits) == new_tokens
    for step, (a, b) in enumerate(zip(cached_logits, logits, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"step {step}")


def test_sampling_with_the_same_seed_repeats(tiny_model):
    prompt = torch.zeros(2, 1, dtype=torch.long)

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return generate(tiny_model, prompt, 30, temperature=1.0, top_p=0.9, generator=generator)

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=5),
                                      SamplingConfig(top_p=0.9), SamplingConfig(min_p=0.1)])
def test_sampling_draws_the_token_multinomial_draws(sampling):
    """A seed gives the text torch.multinomial would give it: one draw from the same
    probabilities and generator state picks the same token, row by row."""
    logits = 3 * torch.randn(200, 65, generator=torch.Generator().manual_seed(0))
    ours, theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for row in logits.split(4):
        probs = sampling_probabilities(row, sampling)
        assert torch.equal(sample_next(row, sampling, generator=ours),
                           torch.multinomial(probs, 1, generator=theirs).squeeze(1))


def test_top_k_of_one_is_greedy():
    logits = torch.randn(4, 50)
    sampled = sample_next(logits, SamplingConfig(temperature=1.5, top_k=1),
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, logits.argmax(dim=-1))


@pytest.mark.parametrize("sampling", [SamplingConfig(top_p=1e-9), SamplingConfig(min_p=1.0)])
def test_tiny_top_p_and_full_min_p_still_keep_the_most_likely_token(sampling):
    logits = torch.randn(6, 30)
    for seed in range(5):
        sampled = sample_next(logits, sampling, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sampled, logits.argmax(dim=-1))


def test_top_p_only_samples_from_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_next(logits, SamplingConfig(top_p=0.8),
                             generator=torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}


def test_repetition_penalty_makes_seen_tokens_less_likely():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    context = torch.tensor([[0]])
    greedy = SamplingConfig(temperature=0, repetition_penalty=1.5)
    assert int(sample_next(logits, greedy, context)) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in"),
        ({"top_k": 0}, "top_k must be at least 1"),
    ],
)
def test_invalid_sampling_settings_are_rejected(kwargs, message):
    with pytest.raises(ConfigFieldError, match=message):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize("sampling", [
    SamplingConfig(temperature=1e-300), SamplingConfig(temperature=1e-45),
    SamplingConfig(temperature=1e300), SamplingConfig(repetition_penalty=1e-300),
    SamplingConfig(repetition_penalty=1e300), SamplingConfig(temperature=1e-300, top_p=0.5),
], ids=["tiny-temperature", "subnormal-temperature", "huge-temperature", "tiny-penalty",
        "huge-penalty", "tiny-temperature-top-p"])
def test_extreme_sampling_settings_still_give_odds(sampling):
    """Any finite setting gives finite odds (top_p leaves them unnormalised) and a token: a
    temperature too small for float32 is greedy (ties share the odds), a huge one uniform."""
    logits = torch.tensor([[1.0, 2.0, 3.0, 3.0], [-5.0, 0.0, 4.0, 2.0]])
    context = torch.tensor([[3], [2]])
    probs = sampling_probabilities(logits, sampling)
    assert torch.isfinite(probs).all() and (probs >= 0).all() and (probs.sum(-1) > 0).all()
    if sampling.top_p is None:
        torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    token = sample_next(logits, sampling, context, torch.Generator().manual_seed(0))
    assert token.shape == (2,) and ((0 <= token) & (token < 4)).all()
    if sampling.temperature == 1e-300:
        assert probs[0, 2] > 0 and probs[1, 2] == 1
