"""Model behaviour: shapes, initial loss, causality, learning, and KV-cache exactness."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

import model as model_module
from generation import generate
from model import (
    CLASSIC_ARCHITECTURE,
    ConfigFieldError,
    KVCache,
    LanguageModel,
    ModelConfig,
    attention_mask,
    rotate,
)
from tests.conftest import OPTION_SETS, randomised


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


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_tied_input_and_output_embeddings_are_one_tensor(tiny_config, norm):
    """The head is the token embedding: doubling the row of a token absent from the input
    leaves every hidden state alone, so exactly that token's logit doubles and no other moves."""
    config = dataclasses.replace(tiny_config, tie_embeddings=True, logit_softcap=None,
                                 norm=norm)
    model = randomised(LanguageModel(config)).eval()
    token = 0
    idx = torch.randint(1, config.vocab_size, (2, 9))  # never token 0
    with torch.no_grad():
        before, _ = model(idx)
        model.token_embedding.weight[token] *= 2.0
        after, _ = model(idx)
    torch.testing.assert_close(after[..., token], 2 * before[..., token])
    assert torch.equal(after[..., 1:], before[..., 1:])
    assert "lm_head.weight" not in model.state_dict()


def test_the_classic_layout_is_gpt2s_and_the_default_nanochats(tiny_config):
    classic = LanguageModel(ModelConfig(**{**vars(tiny_config), **CLASSIC_ARCHITECTURE}))
    names = set(classic.state_dict())
    assert {"position_embedding.weight", "blocks.0.ln_attn.weight", "ln_final.weight"} <= names
    assert "lm_head.weight" not in names
    modern = LanguageModel(tiny_config)
    names = set(modern.state_dict())
    # RMSNorm without weights, rotary angles derived (not saved), an untied head
    assert not any("ln" in name or "position" in name or "rotary" in name for name in names)
    assert "lm_head.weight" in names
    # zero-initialised output projections and head: the first logits are all equal
    logits, _ = modern(torch.randint(tiny_config.vocab_size, (1, 5)))
    assert torch.equal(logits, torch.zeros_like(logits))


def test_rope_turns_pairs_by_position_so_scores_depend_on_distance_only():
    config = ModelConfig(vocab_size=5, block_size=16, n_layer=1, n_head=1, n_embd=8)
    rotary = model_module.Rotary(config)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    assert torch.equal(rotate(q, rotary.angles(0, 1)), q)  # position 0 is no turn
    # NanoChat's convention, first pair: (x1 cos + x2 sin, x2 cos - x1 sin) at angle p * 1
    turned = rotate(q, rotary.angles(3, 1))
    x1, x2 = q[..., 0], q[..., 4]
    torch.testing.assert_close(turned[..., 0], x1 * math.cos(3) + x2 * math.sin(3))
    torch.testing.assert_close(turned[..., 4], x2 * math.cos(3) - x1 * math.sin(3))

    def score(m: int, n: int) -> torch.Tensor:
        return (rotate(q, rotary.angles(m, 1)) * rotate(k, rotary.angles(n, 1))).sum()

    torch.testing.assert_close(score(7, 4), score(3, 0))


def test_the_softcap_bounds_every_logit(tiny_config):
    config = dataclasses.replace(tiny_config, logit_softcap=2.0)
    logits, _ = randomised(LanguageModel(config), seed=1)(torch.randint(11, (2, 16)))
    assert logits.abs().max() < 2.0 and logits.abs().max() > 1.0


def test_a_config_saved_before_the_architecture_options_is_gpt2():
    saved = {"vocab_size": 5, "block_size": 8, "n_layer": 1, "n_head": 1, "n_embd": 8,
             "dropout": 0.0, "bias": False}
    assert ModelConfig.from_saved(saved) == ModelConfig(**saved, **CLASSIC_ARCHITECTURE)


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_every_option_set_decodes_exactly_with_the_cache(tiny_config, options):
    """Prefill, a chunk, then single tokens equal the full forward; greedy output with and
    without the cache is token-identical, also well past block_size."""
    model = randomised(LanguageModel(dataclasses.replace(tiny_config, **options))).eval()
    idx = torch.randint(tiny_config.vocab_size, (2, tiny_config.block_size))
    full, _ = model(idx)
    cache = KVCache(model.config, 2)
    pieces = [model(idx[:, :5], cache=cache)[0], model(idx[:, 5:9], cache=cache)[0]]
    pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(9, idx.size(1))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
    prompt = idx[:, :3]
    cached = generate(model, prompt, 60, temperature=0, use_cache=True)
    assert torch.equal(cached, generate(model, prompt, 60, temperature=0, use_cache=False))


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


@pytest.mark.parametrize(("options", "message"), [
    ({"n_embd": 12, "n_head": 4}, "position=rope needs an even head size, but n_embd=12 / "
                                  "n_head=4 = 3"),
    ({"logit_softcap": 0.0}, "logit_softcap must be > 0"),
    ({"norm": "batchnorm"}, "norm must be one of layernorm, rmsnorm"),
])
def test_architecture_options_are_validated(options, message):
    with pytest.raises(ConfigFieldError, match=re.escape(message)):
        ModelConfig(vocab_size=5, **options)
