"""Model behaviour: shapes, initial loss, causality, learning, and KV-cache exactness."""

from __future__ import annotations

import math

import pytest
import torch

import model as model_module
from model import (
    ConfigFieldError,
    KVCache,
    LanguageModel,
    ModelConfig,
    SamplingConfig,
    attention_mask,
    sample_next,
)


def test_forward_returns_logits_for_every_position(tiny_model, tiny_config):
    idx = torch.randint(tiny_config.vocab_size, (3, 7))
    logits, loss = tiny_model(idx)
    assert logits.shape == (3, 7, tiny_config.vocab_size)
    assert loss is None


def test_initial_loss_is_near_log_vocab():
    config = ModelConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    torch.manual_seed(0)
    model = LanguageModel(config)
    idx = torch.randint(65, (8, 32))
    _, loss = model(idx, torch.randint(65, (8, 32)))
    assert abs(loss.item() - math.log(65)) < 0.1


def test_changing_a_later_token_never_changes_earlier_logits(tiny_model, tiny_config):
    idx = torch.randint(tiny_config.vocab_size, (2, 12))
    changed = idx.clone()
    changed[:, 8] = (changed[:, 8] + 1) % tiny_config.vocab_size
    before, _ = tiny_model(idx)
    after, _ = tiny_model(changed)
    assert torch.equal(before[:, :8], after[:, :8])
    assert not torch.allclose(before[:, 8:], after[:, 8:])


def test_tiny_model_overfits_one_batch(tiny_config):
    torch.manual_seed(0)
    model = LanguageModel(tiny_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(tiny_config.vocab_size, (4, 16))
    y = torch.randint(tiny_config.vocab_size, (4, 16))
    for _ in range(150):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_input_and_output_embeddings_are_one_tensor(tiny_model, tiny_config):
    """The head is the token embedding: doubling the row of a token absent from the input
    leaves every hidden state alone, so exactly that token's logit doubles and no other moves."""
    token = 0
    idx = torch.randint(1, tiny_config.vocab_size, (2, 9))  # never token 0
    with torch.no_grad():
        before, _ = tiny_model(idx)
        tiny_model.token_embedding.weight[token] *= 2.0
        after, _ = tiny_model(idx)
    torch.testing.assert_close(after[..., token], 2 * before[..., token])
    assert torch.equal(after[..., 1:], before[..., 1:])


def test_model_config_rejects_heads_that_do_not_divide_width():
    with pytest.raises(ConfigFieldError, match="n_embd=30 must be divisible by n_head=4"):
        ModelConfig(vocab_size=5, n_embd=30, n_head=4)


def test_attention_mask_lets_each_query_see_only_filled_earlier_slots():
    mask = attention_mask(past=3, query_len=2, key_len=6, device=torch.device("cpu"))
    assert mask.tolist() == [[True, True, True, True, False, False],
                             [True, True, True, True, True, False]]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_kv_cache_decode_matches_full_forward(tiny_model, tiny_config, batch_size):
    """Prefill, a chunk, then single tokens: every position's logits equal the full forward's."""
    idx = torch.randint(tiny_config.vocab_size, (batch_size, tiny_config.block_size))
    full, _ = tiny_model(idx)
    cache = KVCache(tiny_config, batch_size)
    pieces = [tiny_model(idx[:, :5], cache=cache)[0],     # prefill
              tiny_model(idx[:, 5:9], cache=cache)[0]]    # chunked prefill after a past
    pieces += [tiny_model(idx[:, t:t + 1], cache=cache)[0] for t in range(9, idx.size(1))]
    assert cache.length == tiny_config.block_size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_cache_refuses_positions_past_block_size(tiny_model, tiny_config):
    cache = KVCache(tiny_config, 1)
    tiny_model(torch.zeros(1, tiny_config.block_size, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceed block_size"):
        tiny_model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def record_step_logits(monkeypatch) -> list[torch.Tensor]:
    """Capture the logits each generation step samples from."""
    seen: list[torch.Tensor] = []
    real = model_module.sample_next

    def recording(logits, *args, **kwargs):
        seen.append(logits.clone())
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(model_module, "sample_next", recording)
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
    cached = tiny_model.generate(prompt, new_tokens, temperature=0, use_cache=True)
    cached_logits = list(logits)
    logits.clear()
    uncached = tiny_model.generate(prompt, new_tokens, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape == (batch_size, prompt_len + new_tokens)
    assert len(cached_logits) == len(logits) == new_tokens
    for step, (a, b) in enumerate(zip(cached_logits, logits, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"step {step}")


def test_sampling_with_the_same_seed_repeats(tiny_model):
    prompt = torch.zeros(2, 1, dtype=torch.long)

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return tiny_model.generate(prompt, 30, temperature=1.0, top_p=0.9, generator=generator)

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


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
