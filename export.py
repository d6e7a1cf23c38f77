"""Export a run as a Hugging Face transformers model folder: config.json, model.safetensors and
a character-level tokenizer that AutoTokenizer loads.

Usage: python export.py --run runs/<id> --out hf/mine

    model = AutoModelForCausalLM.from_pretrained("hf/mine")
    tokenizer = AutoTokenizer.from_pretrained("hf/mine")

GPT-2's layout (the classic preset) becomes GPT2LMHeadModel and NanoChat's (the default)
NanoChatForCausalLM, weight for weight: their logits equal chargpt's. A model whose options
have no exact layout in either is refused, naming the option.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from model import RMS_NORM_EPS, ROPE_BASE, LanguageModel, ModelConfig
from tokenizer import CharTokenizer
from utils import console
from utils.config_loader import ArgumentParser
from utils.errors import UserError
from utils.output_paths import check_output_folder
from utils.runs import load_run_model

CLASSES = {"gpt2": "GPT2LMHeadModel", "nanochat": "NanoChatForCausalLM"}
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, which chargpt uses, and GPT-2's

# what each layout fixes: (field, value it needs, what the layout lacks otherwise)
GPT2_NEEDS = (("norm", "layernorm", "only LayerNorm"), ("embedding_norm", False, "no norm after "
              "the embedding"), ("qk_norm", False, "no QK-norm"), ("mlp", "gelu", "only GELU"),
              ("logit_softcap", None, "no logit softcap"))
NANOCHAT_NEEDS = (("norm", "rmsnorm", "only RMSNorm"), ("embedding_norm", True, "always a norm "
                  "after the embedding"), ("qk_norm", True, "always QK-norm"), ("bias", False,
                  "no biases in its MLP"))


def layout_for(config: ModelConfig) -> str:
    """'gpt2' or 'nanochat': the transformers class that holds this model exactly; the
    position option picks which, and the other options must fit it."""
    layout, needs = (("gpt2", GPT2_NEEDS) if config.position == "learned"
                     else ("nanochat", NANOCHAT_NEEDS))
    for field, needed, lack in needs:
        value = getattr(config, field)
        if value != needed:
            shown = "none" if value is None else value
            raise UserError(
                f"cannot export {field}={shown}: with position={config.position} the model maps "
                f"onto {CLASSES[layout]}, which has {lack}; only GPT-2's and NanoChat's option "
                "sets export exactly"
            )
    return layout


def gpt2_weights(model: LanguageModel) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict; its Conv1D layers hold (in, out) weights, and a bias-free
    model gets zero biases."""
    config = model.config
    weights = {name: t.detach() for name, t in model.state_dict().items()}

    def bias(name: str, size: int) -> torch.Tensor:
        return weights.get(name, torch.zeros(size))

    state = {"transformer.wte.weight": weights["token_embedding.weight"],
             "transformer.wpe.weight": weights["position_embedding.weight"],
             "transformer.ln_f.weight": weights["ln_final.weight"],
             "transformer.ln_f.bias": bias("ln_final.bias", config.n_embd)}
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for our_norm, their_norm in (("ln_attn", "ln_1"), ("ln_mlp", "ln_2")):
            state[f"{theirs}{their_norm}.weight"] = weights[f"{ours}{our_norm}.weight"]
            state[f"{theirs}{their_norm}.bias"] = bias(f"{ours}{our_norm}.bias", config.n_embd)
        for our_linear, their_linear in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                         ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            weight = weights[f"{ours}{our_linear}.weight"]
            state[f"{theirs}{their_linear}.weight"] = weight.t().contiguous()
            state[f"{theirs}{their_linear}.bias"] = bias(f"{ours}{our_linear}.bias",
                                                         weight.size(0))
    if not config.tie_embeddings:
        state["lm_head.weight"] = weights["lm_head.weight"]
    return state


def nanochat_weights(model: LanguageModel) -> dict[str, torch.Tensor]:
    """NanoChatForCausalLM's state dict: the fused qkv splits into q, k and v projections."""
    config = model.config
    weights = {name: t.detach() for name, t in model.state_dict().items()}
    state = {"model.embed_tokens.weight": weights["token_embedding.weight"],
             "lm_head.weight": model.output_weight().detach()}
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = weights[f"{ours}attn.qkv.weight"].split(config.n_embd)
        state.update({f"{theirs}self_attn.q_proj.weight": q, f"{theirs}self_attn.k_proj.weight": k,
                      f"{theirs}self_attn.v_proj.weight": v,
                      f"{theirs}self_attn.o_proj.weight": weights[f"{ours}attn.proj.weight"],
                      f"{theirs}mlp.fc1.weight": weights[f"{ours}mlp.fc.weight"],
                      f"{theirs}mlp.fc2.weight": weights[f"{ours}mlp.proj.weight"]})
    return state


def hf_model(model: LanguageModel) -> torch.nn.Module:
    """The transformers model that computes what `model` computes, weights loaded."""
    from transformers import GPT2Config, GPT2LMHeadModel, NanoChatConfig, NanoChatForCausalLM

    config = model.config
    # no token is special: generation runs until max_new_tokens, as inference.py's does
    no_special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if layout_for(config) == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(
            vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
            n_layer=config.n_layer, n_head=config.n_head, n_inner=4 * config.n_embd,
            activation_function="gelu",  # exact GELU, as chargpt's; gelu_new is the tanh one
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=LAYER_NORM_EPS,
            tie_word_embeddings=config.tie_embeddings, **no_special))
        state = gpt2_weights(model)
    else:
        hf = NanoChatForCausalLM(NanoChatConfig(
            vocab_size=config.vocab_size, hidden_size=config.n_embd,
            intermediate_size=4 * config.n_embd, num_hidden_layers=config.n_layer,
            num_attention_heads=config.n_head, num_key_value_heads=config.n_head,
            max_position_embeddings=config.block_size,
            hidden_act="relu2" if config.mlp == "relu2" else "gelu",
            rms_norm_eps=RMS_NORM_EPS,
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE},
            final_logit_softcapping=config.logit_softcap, attention_bias=False,
            tie_word_embeddings=config.tie_embeddings, **no_special))
        state = nanochat_weights(model)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # a tied head is the embedding itself, so the state dict need not hold it
    missing = [name for name in missing if not (config.tie_embeddings and name == "lm_head.weight")]
    assert not missing and not unexpected, f"unmapped weights: {missing} {unexpected}"
    return hf.eval()


def hf_tokenizer(tokenizer: CharTokenizer):
    """A PreTrainedTokenizerFast over chargpt's characters: every character is one token, and
    decoding fuses them without spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {char: index for index, char in enumerate(tokenizer.chars)}
    # WordLevel needs an unknown token: one outside the vocabulary, which is never produced
    unknown = "<unk>"
    vocabulary[unknown] = len(vocabulary)
    fast = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token=unknown))
    fast.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=fast, unk_token=unknown,
                                   clean_up_tokenization_spaces=False)


def export(model: LanguageModel, tokenizer: CharTokenizer, out: Path) -> None:
    """Write the folder atomically: built beside out, then renamed over it."""
    hf = hf_model(model)
    building = out.with_name(f".{out.name}.exporting-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    try:
        hf.save_pretrained(building, safe_serialization=True)
        hf_tokenizer(tokenizer).save_pretrained(building)
        if out.exists():
            shutil.rmtree(out)
        os.replace(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def is_export_folder(path: Path) -> bool:
    """Whether path holds a transformers model folder (config.json and its weights), such as
    an earlier export, which a new export may replace."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="latest",
                        help="run folder to export, or 'latest' (default: latest)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"),
                        help="where 'latest' looks for runs (default: runs)")
    parser.add_argument("--checkpoint", metavar="NAME",
                        help="export a training checkpoint (last, best or step_N) instead of "
                             "the run's final export")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    return parser


def run_export(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    check_output_folder(args.out, "--out", replaceable=is_export_folder)
    saved = load_run_model(args.run, args.runs_dir, args.checkpoint)
    model, tokenizer = saved.model, saved.tokenizer
    layout = layout_for(model.config)
    export(model, tokenizer, args.out)
    console.info(f"exported {saved.source} as {CLASSES[layout]} to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return console.run_main(run_export, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
