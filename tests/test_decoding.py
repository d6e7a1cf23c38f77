"""Decoding copies (utils/decoding.py): the weight layouts compute the same model, or stay
close to it, and the compiled step decodes each model's own eager tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from generation import generate
from model import (
    CLASSIC_ARCHITECTURE,
    CausalSelfAttention,
    KVCache,
    LanguageModel,
    ModelConfig,
    attention_mask,
)
from tests.conftest import OPTION_SETS, randomised
from utils import private_torch
from utils.decoding import StreamedAttention, compiled_for_decoding, prepared_for_decoding


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_float32_decode_weights_compute_the_same_model(tiny_config, options):
    """prepared_for_decoding only changes the weights' layout: the logits agree to float32
    rounding, cached decoding stays exact, and 100 greedy tokens (well past block_size) are
    the plain model's."""
    model = randomised(LanguageModel(dataclasses.replace(tiny_config, **options))).eval()
    prepared = prepared_for_decoding(model, "float32")
    idx = torch.randint(tiny_config.vocab_size, (2, tiny_config.block_size))
    with torch.no_grad():
        torch.testing.assert_close(prepared(idx)[0], model(idx)[0], atol=1e-5, rtol=0)
    prompt = idx[:, :3]
    greedy = generate(model, prompt, 100, temperature=0)
    assert torch.equal(generate(prepared, prompt, 100, temperature=0), greedy)
    assert torch.equal(generate(prepared, prompt, 100, temperature=0, use_cache=False), greedy)
    assert all(not isinstance(m, torch.nn.Linear) for m in prepared.modules())
    assert any(isinstance(m, torch.nn.Linear) for m in model.modules())  # the original is kept
    assert model.config == dataclasses.replace(tiny_config, **options)


def test_compiled_models_of_one_shape_each_decode_their_own_eager_tokens(tiny_config):
    """Two models of one shape (the GPT-2 layout: learned positions, a tied head), compiled
    in one process. The first one's greedy output equals its eager model's well past
    block_size (window restarts included), for a batch, from one graph compiled at its first
    step for every position. The second model at that batch size compiles a graph of its own
    rather than running the first one's; at another batch size it compiles a graph of that
    size, which decodes its own eager tokens; the first one's graph then still decodes its
    tokens without another compile. The originals are left uncompiled. Each graph holds its
    own packed copies of the matrices: zeroed after compiling, they change an eager forward
    but not the compiled step. The ids may be a column of a longer tensor (other strides)
    without another compile. inference.py's tests compile the default layout for one sample
    and a batch."""
    # one block: a smaller graph compiles sooner, and the weights' identity is checked the same
    config = dataclasses.replace(tiny_config, n_layer=1, **CLASSIC_ARCHITECTURE)
    models = [randomised(LanguageModel(config), seed).eval() for seed in (0, 1)]
    decoders = [compiled_for_decoding(model) for model in models]
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(config.vocab_size, (2, 3), generator=generator)
    batch = torch.randint(config.vocab_size, (3, 2), generator=generator)
    tokens = 3 * config.block_size
    greedy = [generate(model, prompt, tokens, temperature=0) for model in models]
    assert not torch.equal(greedy[0], greedy[1])
    private_torch.reset_compiled_graphs()  # no graph of an earlier test's model
    with private_torch.recompiles_refused() as recompile_error:
        assert torch.equal(decoders[0].generate(prompt, tokens, temperature=0), greedy[0])
        with pytest.raises(recompile_error):
            decoders[1].generate(prompt, 2, temperature=0)  # its first step compiles
    assert torch.equal(decoders[1].generate(batch, tokens, temperature=0),
                       generate(models[1], batch, tokens, temperature=0))
    with private_torch.recompiles_refused():
        assert torch.equal(decoders[0].generate(prompt, tokens, temperature=0), greedy[0])
    assert all(type(block.attn) is CausalSelfAttention for m in models for block in m.blocks)

    decoder, cache = decoders[0], KVCache(config, 2)
    ids = prompt[:, 1:2]
    with torch.no_grad():
        decoder.model(ids, cache=cache)  # the eager prefill
        before = decoder.step(ids, cache)[0]
        for module in decoder.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.zero_()
        cache.length = 1
        after = decoder.step(ids, cache)[0]
        cache.length = 1
        eager = decoder.model(ids, cache=cache)[0]
    assert torch.equal(after, before)
    assert not torch.equal(eager, before)


@pytest.mark.parametrize("past", [0, 3, 5])
def test_streamed_attention_compiles_to_sdpa(past):
    """Compiled, one query over a masked cache (the decode step) gives SDPA's output up to
    float32 rounding, unfilled slots ignored; eager it is SDPA exactly."""
    attention = StreamedAttention(ModelConfig(vocab_size=5, n_head=3, n_embd=24), 0)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, length, 8, generator=generator) for length in (1, 6, 6))
    mask = attention_mask(past, 1, 6, q.device)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(attention.attend(q, k, v, mask, 0.0), expected)
    compiled = torch.compile(attention.attend)(q, k, v, mask, 0.0)
    assert compiled.shape == expected.shape
    torch.testing.assert_close(compiled, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("weights", "tolerance"),
                         [("bfloat16", 0.05), ("int8", 0.05), ("int8-dynamic", 0.05)])
def test_smaller_decode_weights_stay_close_to_float32(tiny_config, weights, tolerance):
    """bfloat16 and int8 weights (and int8 inputs) move the logits by a small fraction of
    their spread."""
    model = randomised(LanguageModel(tiny_config)).eval()
    prepared = prepared_for_decoding(model, weights)
    # its own generator: the argmax check counts near-ties, so the input must not depend on
    # what earlier tests drew from the global one
    idx = torch.randint(tiny_config.vocab_size, (2, tiny_config.block_size),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, logits = model(idx)[0], prepared(idx)[0]
    assert logits.dtype == torch.float32
    spread = (reference.max() - reference.min()).item()
    assert (logits - reference).abs().max().item() <= tolerance * spread
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


def test_compiled_bfloat16_decoding_stays_close_to_float32(tiny_config):
    """Compiled with bfloat16 weights, the decode steps of a batch move the logits by a small
    fraction of their spread, as bfloat16 weights do eager; the prefill keeps float32's. (That
    two models of one shape each decode with their own weights is pinned for float32 above;
    inference.py's --compile --dtype bfloat16 passes its dtype here.)"""
    config = dataclasses.replace(tiny_config, n_layer=1)  # a smaller graph compiles sooner
    model = randomised(LanguageModel(config)).eval()
    decoder = compiled_for_decoding(model, "bfloat16")
    idx = torch.randint(config.vocab_size, (2, config.block_size),
                        generator=torch.Generator().manual_seed(0))
    cache = KVCache(config, 2)
    with torch.no_grad():
        reference = model(idx)[0]
        logits = [decoder.model(idx[:, :1], cache=cache)[0]]  # the eager prefill
        logits += [decoder.step(idx[:, t:t + 1], cache)[0] for t in range(1, idx.size(1))]
    logits = torch.cat(logits, dim=1)
    assert logits.dtype == torch.float32 and logits.shape == reference.shape
    torch.testing.assert_close(logits[:, 0], reference[:, 0], rtol=0, atol=1e-5)
    spread = (reference.max() - reference.min()).item()
    assert 0 < (logits[:, 1:] - reference[:, 1:]).abs().max().item() <= 0.05 * spread
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
