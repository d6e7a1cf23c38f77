"""A decoder-only character-level transformer and its KV cache.

Config in, tensors out: no I/O, printing or device choice here. Generation, which takes the
model as an argument, is generation.py's.

    model = LanguageModel(ModelConfig(vocab_size=65))
    logits, loss = model(idx, targets)              # training / evaluation
    cache = KVCache(model.config, batch_size=1)
    logits, _ = model(prompt_ids, cache=cache)      # prefill
    logits, _ = model(next_ids, cache=cache)        # decode: one position further
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConfigFieldError(ValueError):
    """A config value breaks a rule; `fields` names the keys involved, so a loader can say
    where each value came from."""

    def __init__(self, message: str, *fields: str) -> None:
        super().__init__(message)
        self.fields = fields


def check_field_values(config: Any) -> None:
    """Raise a ConfigFieldError for a dataclass field typed Literal[...] whose value is not one
    of its choices, or a float field (or optional one) that is nan or infinite: no setting
    means anything at inf, and a nan passes every range check (a loader checks flags already;
    this also covers configs built in code)."""
    for name, annotation in typing.get_type_hints(type(config)).items():
        value = getattr(config, name)
        allowed = typing.get_args(annotation)
        if typing.get_origin(annotation) is Literal and value not in allowed:
            raise ConfigFieldError(f"{name} must be one of {', '.join(allowed)}", name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigFieldError(f"{name} must be a finite number, got {value}", name)


RMS_NORM_EPS = 1e-6  # NanoChat's rms_norm_eps, so the modern layout maps onto it exactly
ROPE_BASE = 10000.0  # NanoChat's rope_theta
# The GPT-2 layout, which every model had before these options existed: a saved config without
# them describes it (see ModelConfig.from_saved)
CLASSIC_ARCHITECTURE: dict[str, Any] = {
    "position": "learned", "norm": "layernorm", "embedding_norm": False, "qk_norm": False,
    "mlp": "gelu", "tie_embeddings": True, "logit_softcap": None,
    "zero_init_projections": False,
}


@dataclass(frozen=True)
class ModelConfig:
    """The model's shape and architecture. The defaults are the default run's: small enough
    to train on a laptop CPU within the default time budget.

    Two option sets match public layouts exactly: CLASSIC_ARCHITECTURE is GPT-2's (learned
    positions, LayerNorm, exact GELU, tied head); the defaults are Hugging Face NanoChat's
    (RMSNorm without weights also after the embedding, RoPE then QK-norm, ReLU², untied head,
    tanh logit softcap).
    """

    vocab_size: int | None = field(
        default=None, metadata={"help": "number of distinct characters; set from the tokenizer"}
    )
    block_size: int = field(default=128, metadata={"help": "context length in characters"})
    n_layer: int = field(default=4, metadata={"help": "number of transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads per block"})
    n_embd: int = field(default=128, metadata={"help": "embedding width"})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability in training"})
    bias: bool = field(
        default=False, metadata={"help": "use biases in Linear and LayerNorm layers"}
    )
    position: Literal["learned", "rope"] = field(
        default="rope", metadata={"help": "learned position embeddings (GPT-2) or rotary "
                                          "embeddings of queries and keys (RoPE)"}
    )
    norm: Literal["layernorm", "rmsnorm"] = field(
        default="rmsnorm", metadata={"help": "LayerNorm with a learned gain (and bias with "
                                             "--bias), or RMSNorm without learned weights"}
    )
    embedding_norm: bool = field(
        default=True, metadata={"help": "normalise the embedding before the first block"}
    )
    qk_norm: bool = field(
        default=True, metadata={"help": "RMS-normalise each head's queries and keys (after "
                                        "RoPE) before attention"}
    )
    mlp: Literal["gelu", "relu2"] = field(
        default="relu2", metadata={"help": "MLP activation: exact GELU or squared ReLU"}
    )
    tie_embeddings: bool = field(
        default=False, metadata={"help": "use the token embedding as the output layer too"}
    )
    logit_softcap: float | None = field(
        default=15.0, metadata={"help": "squash logits into (-cap, cap) as "
                                        "cap * tanh(logits / cap); none = off"}
    )
    zero_init_projections: bool = field(
        default=True, metadata={"help": "start the residual output projections (and an "
                                        "untied head) at zero"}
    )

    def __post_init__(self) -> None:
        check_field_values(self)
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ConfigFieldError(f"{name} must be at least 1", name)
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigFieldError("vocab_size must be at least 1", "vocab_size")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigFieldError("dropout must be in [0, 1)", "dropout")
        if self.n_embd % self.n_head:
            raise ConfigFieldError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}",
                "n_embd",
                "n_head",
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigFieldError(
                f"position=rope needs an even head size, but n_embd={self.n_embd} / "
                f"n_head={self.n_head} = {self.head_dim}", "position", "n_embd", "n_head",
            )
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ConfigFieldError("logit_softcap must be > 0 (or none)", "logit_softcap")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_saved(cls, values: Mapping[str, Any]) -> ModelConfig:
        """The config a run saved; one saved before the architecture options existed had the
        GPT-2 layout."""
        return cls(**{**CLASSIC_ARCHITECTURE, **values})


class KVCache:
    """Keys and values of the tokens seen so far, one preallocated buffer pair per layer.

    Buffers are (batch, n_head, block_size, head_dim) and filled in place, so decoding a token
    writes one slot instead of concatenating tensors. `length` counts the filled positions;
    the model advances it after each forward.
    """

    def __init__(self, config: ModelConfig, batch_size: int) -> None:
        self.config = config
        self.batch_size = batch_size
        self.length = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, n_head, T, head_dim) keys and values at positions
        length..length+T-1; return the layer's whole (B, n_head, block_size, head_dim) buffers."""
        if not self.keys:
            # allocated on first use so the buffers take the dtype autocast gives k and v
            shape = (self.batch_size, self.config.n_head, self.config.block_size,
                     self.config.head_dim)
            for _ in range(self.config.n_layer):
                self.keys.append(torch.zeros(shape, dtype=k.dtype, device=k.device))
                self.values.append(torch.zeros(shape, dtype=v.dtype, device=v.device))
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer], self.values[layer]

    def reset(self) -> None:
        self.length = 0


def attention_mask(past: int, query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """(query_len, key_len) boolean mask for queries at positions past..past+query_len-1 over a
    buffer of key_len key slots: each query sees the keys at or before its own position, never
    a later or unfilled slot.

    SDPA's is_causal aligns its mask top-left, which is only right when queries and keys have
    the same length, as in training and the first prefill; decode steps need this one.
    """
    query_positions = torch.arange(past, past + query_len, device=device)[:, None]
    return torch.arange(key_len, device=device)[None, :] <= query_positions


class Rotary(nn.Module):
    """Rotary position embedding (RoPE) in NanoChat's convention: each head's vector is split
    in halves (x1, x2), and position p turns every pair by the angle p * base^(-2i/head_dim):
    (x1 cos + x2 sin, x2 cos - x1 sin)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64).float()
        inverse_frequencies = 1.0 / (ROPE_BASE ** (exponents / config.head_dim))
        positions = torch.arange(config.block_size, dtype=torch.float32)
        angles = torch.outer(positions, inverse_frequencies)  # (block_size, head_dim / 2)
        # derived from the config, so not saved with the weights
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def angles(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions start..start+length-1, each (length, head_dim / 2)."""
        return self.cos[start:start + length], self.sin[start:start + length]


def rotate(x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (B, n_head, T, head_dim) turned by the angles of its T positions."""
    cos, sin = (a.to(x.dtype) for a in angles)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=RMS_NORM_EPS, elementwise_affine=False)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.n_head = config.n_head
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        """Causal self-attention; with a cache that already holds keys, the context's mask
        says which of its slots each query sees."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if context.rope is not None:
            q, k = rotate(q, context.rope), rotate(k, context.rope)
        if self.qk_norm:
            q = F.rms_norm(q, (q.size(-1),), eps=RMS_NORM_EPS)
            k = F.rms_norm(k, (k.size(-1),), eps=RMS_NORM_EPS)
        cache, mask = context.cache, context.mask
        if cache is not None:
            keys, values = cache.update(self.layer_index, k, v)  # (B, n_head, block_size, hd)
            if mask is None:  # first prefill: queries and keys line up from position 0
                k, v = keys[:, :, :T], values[:, :, :T]
            else:
                # decode attends over the whole buffer, so every step has the same shapes and
                # kernels reuse their plans instead of planning each new key length (BENCHMARKS.md)
                k, v = keys, values
        y = self.attend(q, k, v, mask, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
        """Each query's average of the values (B, n_head, T, head_dim), weighted by the
        softmax of its scores against the keys; mask None means plain causal. A subclass may
        compute it another way (utils/decoding.py streams one query over the cache)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=mask is None)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.activation = config.mlp
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = F.gelu(h) if self.activation == "gelu" else F.relu(h).square()
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.ln_attn = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_mlp = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), context)
        return x + self.mlp(self.ln_mlp(x))


@dataclass(frozen=True)
class Context:
    """What every block needs to know about one forward pass besides its input."""

    cache: KVCache | None
    mask: torch.Tensor | None  # which cache slots each query sees; None = plain causal
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos and sin of the positions, for RoPE


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer)")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position == "learned":
            self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        else:
            self.rotary = Rotary(config)
        self.embedding_norm = make_norm(config) if config.embedding_norm else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_final = make_norm(config)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._init_parameters()

    def _init_parameters(self) -> None:
        config = self.config
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer), since each block adds two
        # of them to the residual stream; or start them at zero, so every block starts as the
        # identity and learns what to add
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                if config.zero_init_projections:
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if not config.tie_embeddings:
            if config.zero_init_projections:
                nn.init.zeros_(self.lm_head.weight)
            if config.embedding_norm:
                # normalised right away, so its scale only sets how far each update moves it
                nn.init.normal_(self.token_embedding.weight, mean=0.0, std=1.0)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_position_embedding: bool = True) -> int:
        """Parameter count; position embeddings are usually left out of FLOP estimates."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_position_embedding and self.config.position == "learned":
            total -= self.position_embedding.weight.numel()
        return total

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward and backward): 6 per weight in a matmul (not an
        untied token embedding, which is only looked up), plus attention's
        12 * n_layer * n_embd * block_size for the scores and the weighted sum (PaLM, app. B)."""
        c = self.config
        matmul_weights = self.num_parameters()
        if not c.tie_embeddings:
            matmul_weights -= self.token_embedding.weight.numel()
        return 6 * matmul_weights + 12 * c.n_layer * c.n_embd * c.block_size

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) for token ids (B, T), and the mean cross-entropy if targets given.

        With a cache, idx continues the text already in it: positions start at cache.length.
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(
                f"{start + T} positions exceed block_size={self.config.block_size}"
            )
        x = self.token_embedding(idx)
        rope = None
        if self.config.position == "learned":
            x = x + self.position_embedding(torch.arange(start, start + T, device=idx.device))
        else:
            rope = self.rotary.angles(start, T)
        x = self.dropout(self.embedding_norm(x))
        mask = None
        if cache is not None and cache.length > 0:
            mask = attention_mask(start, T, self.config.block_size, idx.device)
        context = Context(cache, mask, rope)
        for block in self.blocks:
            x = block(x, context)
        if cache is not None:
            cache.length += T
        x = self.ln_final(x)
        if self.config.tie_embeddings:
            logits = F.linear(x, self.token_embedding.weight)  # (B, T, vocab)
        else:
            logits = self.lm_head(x)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def output_weight(self) -> torch.Tensor:
        """The (vocab, n_embd) output layer: the token embedding itself when they are tied."""
        return self.token_embedding.weight if self.config.tie_embeddings else self.lm_head.weight
