"""Stage 23b — export: a trained run in Hugging Face's format, and a Hugging Face model as a run.

A model trained here is only useful here until its weights, configuration and
tokenizer are written the way other tools read them. Hugging Face transformers
reads a directory: config.json names the architecture (GPT2LMHeadModel,
LlamaForCausalLM or MixtralForCausalLM, whose parts are exactly our presets'),
model.safetensors holds the weights under its names, and tokenizer.json
describes the tokenizer to the `tokenizers` library. Every default that differs
from ours (RMSNorm eps, RoPE base, BOS/EOS ids) is written out, never assumed.

Going the other way, `--from-hf` reads such a directory into a run directory
that sample.py, evaluate.py and cli.py load like any trained run.

New since stage 23: another program's names for the same numbers. Run it:

    python export.py out/llama --format hf --out out/llama-hf
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'out/llama-hf')('ROMEO:'))"
    python export.py --from-hf out/llama-hf --out out/llama-again

Shapes: C channels, H query heads, G key/value heads, D head dim, F feed-forward width, V vocabulary.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bpe_tokenizer import SPM_LOSSLESS, HFTokenizer, byte_to_unicode, load_tokenizer
from char_tokenizer import UNK
from checkpoint import (WEIGHTS, atomic_write, build_model, load_weights, model_config_dict, read_config,
                        resolve_run_dir, save_run_files, save_weights, write_json)
from components import NORM_EPS, parse_rope_scaling
from dataset import DEFAULT_CORPUS
from transformer import ModelConfig, Transformer

FORMATS = ("hf",)  # the formats export_<format> writes; GGUF and llama2.c join them later
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}
# (pos, norm, mlp) of our config -> the Hugging Face model type built from the same parts
HF_KINDS = {("learned", "layernorm", "gelu"): "gpt2", ("rope", "rmsnorm", "swiglu"): "llama",
            ("rope", "rmsnorm", "moe"): "mixtral"}
DEFAULT_THETA = {"llama": 10000.0, "mixtral": 1e6}  # what transformers assumes when config.json says nothing
IGNORED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # buffers old checkpoints saved: no weights


# --- The model: which Hugging Face architecture, its config.json, and the names of the weights -------------

def hf_kind(cfg):
    """The Hugging Face model type that computes exactly what `cfg` does; ValueError naming what none can hold."""
    kind = HF_KINDS.get((cfg.pos, cfg.norm, cfg.mlp))
    if kind is None:
        raise ValueError(f"pos={cfg.pos}, norm={cfg.norm}, mlp={cfg.mlp} matches no Hugging Face architecture: "
                         f"transformers has learned+layernorm+gelu (GPT-2), rope+rmsnorm+swiglu (Llama) "
                         f"and rope+rmsnorm+moe (Mixtral)")
    if kind == "gpt2" and cfg.kv_heads != cfg.n_head:
        raise ValueError(f"GPT-2 has no grouped-query attention (n_kv_head={cfg.n_kv_head}, n_head={cfg.n_head})")
    if kind == "mixtral" and cfg.bias:
        raise ValueError("Mixtral's attention has no biases (this moe run has bias=True)")
    return kind


def ffn_width(model):
    """F, the hidden width of the feed-forward layers (of one expert for MoE)."""
    ffn = model.blocks[0].ffn
    ffn = ffn.experts[0] if hasattr(ffn, "experts") else ffn
    return (ffn.gate if hasattr(ffn, "gate") else ffn.fc).out_features


def hf_config(model, kind, tok):
    """config.json for transformers. Every default of theirs that is not ours is written explicitly."""
    cfg = model.config
    common = {"architectures": [HF_CLASSES[kind]], "model_type": kind, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_weights, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
              "pad_token_id": tok.pad_id, "torch_dtype": "float32", "use_cache": True}
    if kind == "gpt2":
        return {**common, "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": ffn_width(model),
                "activation_function": "gelu",  # exact GELU, as ours; GPT-2's own default is the tanh one
                "layer_norm_epsilon": NORM_EPS, "resid_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                "embd_pdrop": 0.0, "scale_attn_weights": True}
    rope, factor = parse_rope_scaling(cfg.rope_scaling)
    theta, scaling = cfg.rope_theta, None
    if rope == "ntk":  # our static NTK scaling is a larger base, which plain RoPE can hold exactly
        theta = theta * factor ** (cfg.head_dim / (cfg.head_dim - 2))
    elif rope == "linear":
        scaling = {"rope_type": "linear", "factor": factor}
    out = {**common, "hidden_size": cfg.n_embd, "intermediate_size": ffn_width(model),
           "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
           "head_dim": cfg.head_dim, "max_position_embeddings": cfg.block_size, "hidden_act": "silu",
           "rms_norm_eps": NORM_EPS, "rope_theta": theta, "rope_scaling": scaling, "attention_dropout": cfg.dropout}
    if kind == "llama":
        return {**out, "attention_bias": cfg.bias, "mlp_bias": False}
    return {**out, "num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.moe_top_k,
            "router_aux_loss_coef": cfg.moe_aux_weight, "output_router_logits": False, "router_jitter_noise": 0.0,
            "sliding_window": None}


def weight_names(cfg, kind):
    """[(our name, HF name, transposed)] for every weight except Llama's q/k/v, which ours fuses into one.

    GPT-2 stores its Linear layers as Conv1D, (in, out): the transpose of ours, and always with
    biases (zeros where ours has none). A tied head is the embedding: HF ties it on load.
    """
    if kind == "gpt2":
        names = [("embed.tok.weight", "transformer.wte.weight", False),
                 ("embed.pos.weight", "transformer.wpe.weight", False),
                 ("norm.weight", "transformer.ln_f.weight", False), ("norm.bias", "transformer.ln_f.bias", False)]
        parts = [("attn_norm", "ln_1", False), ("attn.qkv", "attn.c_attn", True), ("attn.out_proj", "attn.c_proj", True),
                 ("ffn_norm", "ln_2", False), ("ffn.fc", "mlp.c_fc", True), ("ffn.out_proj", "mlp.c_proj", True)]
        for i in range(cfg.n_layer):
            for ours, hf, conv in parts:
                names += [(f"blocks.{i}.{ours}.{p}", f"transformer.h.{i}.{hf}.{p}", conv and p == "weight")
                          for p in ("weight", "bias")]
    else:
        names = [("embed.tok.weight", "model.embed_tokens.weight", False), ("norm.weight", "model.norm.weight", False)]
        parts = [("attn_norm.weight", "input_layernorm.weight"), ("attn.out_proj.weight", "self_attn.o_proj.weight"),
                 ("ffn_norm.weight", "post_attention_layernorm.weight")]
        parts += [("attn.out_proj.bias", "self_attn.o_proj.bias")] if cfg.bias else []
        if kind == "llama":
            parts += [("ffn.gate.weight", "mlp.gate_proj.weight"), ("ffn.up.weight", "mlp.up_proj.weight"),
                      ("ffn.out_proj.weight", "mlp.down_proj.weight")]
        else:  # Mixtral's per-expert names (w1 gate, w3 up, w2 down): transformers 4.x and 5.x both read them
            parts += [("ffn.router.weight", "block_sparse_moe.gate.weight")]
            parts += [(f"ffn.experts.{e}.{ours}.weight", f"block_sparse_moe.experts.{e}.{w}.weight")
                      for e in range(cfg.n_experts) for ours, w in (("gate", "w1"), ("out_proj", "w2"), ("up", "w3"))]
        names += [(f"blocks.{i}.{ours}", f"model.layers.{i}.{hf}", False) for i in range(cfg.n_layer) for ours, hf in parts]
    if not cfg.tie_weights:
        names.append(("head.weight", "lm_head.weight", False))
    return names


def fold_attention_scale(state, cfg):
    """attn_scale="learnable" multiplies each head's queries by its own scale where HF uses D^−0.5:
    fold scale / D^−0.5 into the query rows (and biases) of qkv, so the fixed scale gives the same scores."""
    state = dict(state)
    for i in range(cfg.n_layer):
        scale = state.pop(f"blocks.{i}.attn.scale", None)
        if scale is None:
            continue
        factor = (scale / cfg.head_dim ** -0.5).repeat_interleave(cfg.head_dim)  # (H,) -> (H·D,)
        for p in ("weight", "bias"):
            name = f"blocks.{i}.attn.qkv.{p}"
            if name in state:
                t = state[name].clone()
                t[:cfg.n_head * cfg.head_dim] *= factor.view(-1, *[1] * (t.dim() - 1))  # q rows of (H·D + 2·G·D, …)
                state[name] = t
    return state


def to_hf_tensors(model, kind):
    """Our state dict -> {HF name: tensor}, ready for safetensors."""
    cfg = model.config
    state = fold_attention_scale(model.state_dict(), cfg)
    out = {}
    for ours, hf, transposed in weight_names(cfg, kind):
        if ours not in state:  # a GPT-2 bias our run has none of
            out[hf] = torch.zeros(state[ours.rsplit(".", 1)[0] + ".weight"].shape[0])
        else:
            out[hf] = state[ours].t() if transposed else state[ours]
    if kind != "gpt2":
        H, G, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
        for i in range(cfg.n_layer):
            for p in ("weight", "bias") if cfg.bias else ("weight",):
                q, k, v = state[f"blocks.{i}.attn.qkv.{p}"].split([H * D, G * D, G * D])  # ((H + 2G)·D, …) -> 3 parts
                for name, t in (("q", q), ("k", k), ("v", v)):
                    out[f"model.layers.{i}.self_attn.{name}_proj.{p}"] = t
    return {name: t.detach().float().contiguous().clone() for name, t in out.items()}


def from_hf_tensors(tensors, cfg, kind):
    """{HF name: tensor} -> our state dict for Transformer(cfg); ValueError on a missing or unexpected tensor."""
    tensors = {n: t for n, t in tensors.items() if not n.endswith(IGNORED)}
    base = "transformer." if kind == "gpt2" else "model."
    if not any(n.startswith(base) for n in tensors):  # a base-model checkpoint (e.g. "wte.weight"): no prefix
        tensors = {n if n.startswith("lm_head.") else base + n: t for n, t in tensors.items()}
    used, state = set(), {}

    def take(name):
        if name not in tensors:
            raise ValueError(f"the checkpoint has no tensor {name}")
        used.add(name)
        return tensors[name].float()

    for ours, hf, transposed in weight_names(cfg, kind):
        if kind == "gpt2" and hf.endswith(".bias") and not cfg.bias:
            used.add(hf)  # all zero (config_from_hf checked): ours simply has none
        else:
            state[ours] = take(hf).t() if transposed else take(hf)
    if kind != "gpt2":
        for i in range(cfg.n_layer):
            for p in ("weight", "bias") if cfg.bias else ("weight",):
                parts = [take(f"model.layers.{i}.self_attn.{n}_proj.{p}") for n in "qkv"]
                state[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(parts)  # 3 parts -> ((H + 2G)·D, …)
    if cfg.tie_weights:
        state["head.weight"] = state["embed.tok.weight"]
        used.discard("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # some checkpoints store the tied copy as well
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(f"the checkpoint holds tensors this architecture does not use: {', '.join(unexpected[:3])}")
    return state


# --- The tokenizer as tokenizer.json ------------------------------------------------------------------------

def hf_tokenizer(tok):
    """Our tokenizer as a `tokenizers.Tokenizer` that gives the same ids (ValueError if it cannot).

    char: a WordLevel vocabulary behind a split into single code points. bpe: byte-level BPE,
    our merges written with GPT-2's byte-to-character table, our split regex first. spm: a
    unigram model with byte fallback, spaces written "▁", newline an atomic token.
    """
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    except ImportError:
        raise ValueError("writing tokenizer.json needs the tokenizers package: pip install tokenizers") from None
    if tok.kind == "hf":
        return Tokenizer.from_str(json.dumps(tok.spec))
    if tok.kind == "char":
        vocab = {c: i for i, c in enumerate(tok.chars)} | {UNK: tok.unk_id}
        out = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        out.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every code point alone
        out.decoder = decoders.Fuse()  # join the pieces without the spaces WordLevel would put between them
    elif tok.kind == "bpe":
        char = byte_to_unicode()
        spell = lambda i: "".join(char[b] for b in tok.vocab[i])  # noqa: E731
        n = 256 + len(tok.merges)
        vocab = {spell(i): i for i in range(n)}
        if len(vocab) < n:
            raise ValueError("this BPE vocabulary holds two ids for the same bytes, which tokenizer.json cannot "
                             "tell apart: retrain the tokenizer")
        out = Tokenizer(models.BPE(vocab, [(spell(a), spell(b)) for a, b in tok.merges]))
        split = [pre_tokenizers.Split(Regex(tok.pattern), behavior="isolated")] if tok.pattern else []
        out.pre_tokenizer = pre_tokenizers.Sequence(split + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                      use_regex=False)])
        out.decoder = decoders.ByteLevel()
        out.add_special_tokens([AddedToken(s, special=True) for s in tok.special_tokens])  # take the ids after the merges
    elif tok.kind == "spm":
        sp = tok.sp
        out = Tokenizer(models.Unigram([(sp.id_to_piece(i), sp.get_score(i)) for i in range(tok.vocab_size)],
                                       unk_id=sp.unk_id(), byte_fallback=True))
        out.normalizer = normalizers.Replace(" ", "\u2581")
        out.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        out.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True) for i in range(tok.vocab_size)
                                if sp.is_control(i) or sp.is_unknown(i)])
        out.add_tokens([AddedToken(s, normalized=False) for s in SPM_LOSSLESS["user_defined_symbols"]
                        if sp.piece_to_id(s) != sp.unk_id()])  # "\n": matched before the unigram model, as in spm
    else:
        raise ValueError(f"a {tok.kind!r} tokenizer has no tokenizer.json form")
    if out.get_vocab_size() != tok.vocab_size:
        raise ValueError(f"tokenizer.json would hold {out.get_vocab_size()} tokens, ours {tok.vocab_size}")
    return out


def tokenizer_config(tok, hf_tok, block_size):
    """tokenizer_config.json: the plain fast tokenizer over tokenizer.json; special tokens by name, or None."""
    name = {k: None if i is None else hf_tok.id_to_token(i)
            for k, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id), ("unk", tok.unk_id))}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
            "clean_up_tokenization_spaces": False,  # it would turn " ." into "." and break the round trip
            **{f"{k}_token": v for k, v in name.items()}}


# --- Export and import --------------------------------------------------------------------------------------

def load_float_run(run_dir):
    """(model with float weights, tokenizer, config) of a run; a quantized run comes back dequantized."""
    config = read_config(run_dir)
    if config["model"].get("model") != "transformer":
        raise ValueError(f"{run_dir} holds a {config['model'].get('model')} model, which no export format has: "
                         f"export a transformer run")
    if not (run_dir / WEIGHTS).is_file():
        raise FileNotFoundError(f"{run_dir} has no {WEIGHTS}: train the run first")
    model = load_weights(build_model(config["model"]), run_dir / WEIGHTS, config.get("quantization"))
    return model.eval(), load_tokenizer(run_dir / config["tokenizer_file"]), config


def new_output_dir(out):
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not empty: pick a new --out")
    return out


def export_hf(run_dir, out_dir):
    """Write run `run_dir` as a Hugging Face model directory `out_dir` (new or empty); returns its path.

    Everything that could refuse (architecture, tokenizer) is checked before a file is written.
    """
    run_dir = resolve_run_dir(run_dir)
    model, tok, config = load_float_run(run_dir)
    kind = hf_kind(model.config)
    hf_tok = hf_tokenizer(tok)
    out = new_output_dir(out_dir)
    tensors = to_hf_tensors(model, kind)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", hf_config(model, kind, tok))
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / "tokenizer.json", lambda tmp: hf_tok.save(str(tmp)))
    write_json(out / "tokenizer_config.json", tokenizer_config(tok, hf_tok, model.config.block_size))
    write_json(out / "generation_config.json",
               {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id})
    return out


def refuse_unless(ok, what, hf_dir):
    if not ok:
        raise ValueError(f"{hf_dir}: {what}, which this project's models cannot represent")


def config_from_hf(hf, tensors, hf_dir):
    """A Hugging Face config.json (dict) -> (our ModelConfig, kind); ValueError naming what ours cannot hold."""
    arch = (hf.get("architectures") or [None])[0]
    kinds = {cls: kind for kind, cls in HF_CLASSES.items()}
    if arch not in kinds:
        found = f"architecture {arch} is not supported" if arch else "config.json names no architecture"
        raise ValueError(f"{hf_dir}: {found}: import a Hugging Face GPT2LMHeadModel, LlamaForCausalLM or "
                         f"MixtralForCausalLM directory")
    kind = kinds[arch]
    if kind == "gpt2":
        refuse_unless(hf.get("activation_function", "gelu_new") == "gelu",
                      f"activation_function {hf.get('activation_function', 'gelu_new')!r} (ours is the exact GELU, "
                      f"'gelu')", hf_dir)
        refuse_unless(math.isclose(hf.get("layer_norm_epsilon", 1e-5), NORM_EPS), "a layer_norm_epsilon not 1e-5", hf_dir)
        refuse_unless(hf.get("scale_attn_weights", True) and not hf.get("scale_attn_by_inverse_layer_idx"),
                      "attention scaled other than by D^-0.5", hf_dir)
        bias = any(t.any() for n, t in tensors.items() if n.endswith(".bias") and not n.endswith(IGNORED))
        return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024), n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], ffn_hidden=hf.get("n_inner"), bias=bias,
                           tie_weights=hf.get("tie_word_embeddings", True)), kind
    C, H = hf["hidden_size"], hf["num_attention_heads"]
    refuse_unless(hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r} (ours: silu)", hf_dir)
    refuse_unless(math.isclose(hf.get("rms_norm_eps", 1e-6), NORM_EPS),
                  f"rms_norm_eps {hf.get('rms_norm_eps', 1e-6)} (ours is fixed at {NORM_EPS})", hf_dir)
    refuse_unless(hf.get("head_dim") in (None, C // H), f"head_dim {hf.get('head_dim')} other than hidden/heads", hf_dir)
    refuse_unless(not hf.get("mlp_bias"), "biases in the feed-forward layers", hf_dir)
    refuse_unless(hf.get("sliding_window") is None, "sliding-window attention", hf_dir)
    refuse_unless(hf.get("pretraining_tp", 1) == 1, "pretraining_tp > 1", hf_dir)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    refuse_unless(rope_type in ("default", "linear"), f"RoPE scaling {rope_type!r} (ours: none or linear)", hf_dir)
    refuse_unless(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) == 1.0,
                  "RoPE on part of each head", hf_dir)
    fields = dict(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
                  n_layer=hf["num_hidden_layers"], n_head=H, n_kv_head=hf.get("num_key_value_heads") or H, n_embd=C,
                  ffn_hidden=hf["intermediate_size"], bias=bool(hf.get("attention_bias")), norm="rmsnorm",
                  mlp="swiglu", pos="rope", rope_theta=rope.get("rope_theta", hf.get("rope_theta", DEFAULT_THETA[kind])),
                  rope_scaling=f"linear:{float(rope['factor'])}" if rope_type == "linear" else None,
                  tie_weights=hf.get("tie_word_embeddings", False))
    if kind == "mixtral":
        refuse_unless(not hf.get("router_jitter_noise"), "router jitter noise", hf_dir)
        fields.update(mlp="moe", n_experts=hf["num_local_experts"], moe_top_k=hf["num_experts_per_tok"],
                      moe_aux_weight=hf.get("router_aux_loss_coef", 0.001))
    return ModelConfig(**fields), kind


def read_hf_tensors(hf_dir):
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists, as float32."""
    index = hf_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS]
    tensors = {}
    for name in files:
        if not (hf_dir / name).is_file():
            raise FileNotFoundError(f"{hf_dir} has no {name}: only safetensors weights are read (nothing here "
                                    f"unpickles a pytorch_model.bin)")
        try:
            tensors.update(load_file(hf_dir / name))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{hf_dir / name} is damaged or not a safetensors file ({e})") from None
    return {n: t.float() for n, t in tensors.items()}


def hf_special_ids(hf_dir, hf, tk):
    """bos/eos/pad/unk ids: tokenizer_config.json's token names first, then config.json's ids; None for an id
    the vocabulary lacks (GPT-2's config says 50256 whatever the vocabulary size)."""
    path = hf_dir / "tokenizer_config.json"
    names = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    special = {}
    for key in ("bos", "eos", "pad", "unk"):
        token = names.get(f"{key}_token")
        token = token.get("content") if isinstance(token, dict) else token
        i = tk.token_to_id(token) if token else hf.get(f"{key}_token_id")
        i = i[0] if isinstance(i, list) and i else i
        special[key] = i if isinstance(i, int) and 0 <= i < hf["vocab_size"] else None
    return special


def import_hf(hf_dir, run_dir):
    """Turn a local Hugging Face GPT-2, Llama or Mixtral directory into a run directory; returns its path."""
    hf_dir = Path(hf_dir)
    for name in ("config.json", "tokenizer.json"):
        if not (hf_dir / name).is_file():
            raise FileNotFoundError(f"{hf_dir} has no {name}: pass a Hugging Face model directory "
                                    f"(config.json, model.safetensors, tokenizer.json)")
    hf = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    tensors = read_hf_tensors(hf_dir)
    cfg, kind = config_from_hf(hf, tensors, hf_dir)
    spec = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok = HFTokenizer(spec, cfg.vocab_size, {})
    if tok.tk.get_vocab_size() > cfg.vocab_size:
        raise ValueError(f"{hf_dir}: tokenizer.json has {tok.tk.get_vocab_size()} tokens, the model only "
                         f"{cfg.vocab_size}")
    tok = HFTokenizer(spec, cfg.vocab_size, hf_special_ids(hf_dir, hf, tok.tk))
    model = Transformer(cfg)
    try:
        model.load_state_dict(from_hf_tensors(tensors, cfg, kind), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{hf_dir}: the weights do not fit config.json ({str(e).splitlines()[0]})") from None
    out = new_output_dir(run_dir)
    # an imported model has no corpus of its own: evaluate.py scores it on the default one
    config = {"model": model_config_dict(model), "block_size": cfg.block_size, "tokenizer": "hf",
              "tokenizer_file": "tokenizer.json", "args": {"data": DEFAULT_CORPUS}, "imported_from": str(hf_dir)}
    save_run_files(out, config, tok, "tokenizer.json")
    save_weights(model, out / WEIGHTS)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a run to another format, or import a Hugging Face model.")
    p.add_argument("run", nargs="?", help="the run directory to export (only read)")
    p.add_argument("--format", choices=FORMATS, help="what to write: hf (a Hugging Face model directory)")
    p.add_argument("--out", required=True, help="the new directory to write")
    p.add_argument("--from-hf", metavar="HF_DIR", help="import this local Hugging Face model directory instead")
    args = p.parse_args(argv)
    try:
        if args.from_hf:
            if args.run or args.format:
                raise ValueError("--from-hf takes no RUN and no --format: python export.py --from-hf DIR --out RUN")
            out = import_hf(args.from_hf, args.out)
            print(f"wrote run {out}; next: python sample.py --model-checkpoint {out} --prompt \"Hello\"")
            return
        if not args.run or not args.format:
            raise ValueError("give a RUN and --format (python export.py RUN --format hf --out DIR), or --from-hf DIR")
        out = {"hf": export_hf}[args.format](args.run, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {', '.join(sorted(f.name for f in out.iterdir()))} to {out}")
    print(f"load it: AutoModelForCausalLM.from_pretrained({str(out)!r}), AutoTokenizer.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    main()
