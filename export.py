"""Stage 23b — export: a run for Hugging Face, llama.cpp (GGUF) and llama2.c; a Hugging Face model as a run.

A model trained here is only useful here until its weights, configuration and
tokenizer are written the way other tools read them. Hugging Face transformers
reads a directory: config.json names the architecture (GPT2LMHeadModel,
LlamaForCausalLM or MixtralForCausalLM, whose parts are exactly our presets'),
model.safetensors holds the weights under its names, and tokenizer.json
describes the tokenizer to the `tokenizers` library. Every default that differs
from ours (RMSNorm eps, RoPE base, BOS/EOS ids) is written out, never assumed.

llama.cpp reads one GGUF file: its "llama" architecture holds our llama and moe
presets, and the tokenizer travels inside. llama2.c's run.c reads a bare
model.bin and tokenizer.bin (runq.c an int8 model.bin) and hard-wires the ids
of its special tokens, so the vocabulary is laid out the way it expects. Both
pair RoPE's channels as neighbours (2i, 2i+1) where ours pairs i with i + D/2:
the q and k rows are reordered on the way out, the same numbers in another order.

Going the other way, `--from-hf` reads a Hugging Face directory into a run
directory that sample.py, evaluate.py and cli.py load like any trained run.

New since stage 23: another program's names for the same numbers. Run it:

    python export.py out/llama --format hf --out out/llama-hf
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'out/llama-hf')('ROMEO:'))"
    python export.py --from-hf out/llama-hf --out out/llama-again
    python export.py out/llama --format gguf --out out/llama.gguf            # llama-cli -m out/llama.gguf
    python export.py out/llama --format llama2c --out out/llama-l2c [--int8] # ./run out/llama-l2c/model.bin ...

Shapes: C channels, H query heads, G key/value heads, D head dim, F feed-forward width, V vocabulary, E experts.
"""
import argparse
import json
import math
import struct
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bpe_tokenizer import GPT4_SPLIT_PATTERN, SPM_LOSSLESS, HFTokenizer, byte_to_unicode, load_tokenizer
from char_tokenizer import UNK, UNK_TEXT, replace_unencodable_output
from chat_format import END, chat_ids
from checkpoint import (WEIGHTS, atomic_write, build_model, load_weights, model_config_dict, read_config,
                        resolve_run_dir, save_run_files, save_weights, write_json)
from components import NORM_EPS, parse_rope_scaling, rope_frequencies
from dataset import DEFAULT_CORPUS, atomic_write_bytes
from quantize import symmetric_quantize
from transformer import ModelConfig, Transformer

FORMATS = ("hf", "gguf", "llama2c")  # the formats export_<format> writes
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
    if set(cfg.layer_kinds) != {"attn"}:
        raise ValueError(f"layers={cfg.layers}: no export format has a layer with memory; keep the run directory")
    if kind is None:
        raise ValueError(f"pos={cfg.pos}, norm={cfg.norm}, mlp={cfg.mlp} matches no Hugging Face architecture: "
                         f"transformers has learned+layernorm+gelu (GPT-2), rope+rmsnorm+swiglu (Llama) "
                         f"and rope+rmsnorm+moe (Mixtral)")
    if kind == "gpt2" and cfg.kv_heads != cfg.n_head:
        raise ValueError(f"GPT-2 has no grouped-query attention (n_kv_head={cfg.n_kv_head}, n_head={cfg.n_head})")
    if kind == "mixtral" and cfg.bias:
        raise ValueError("Mixtral's attention has no biases (this moe run has bias=True)")
    if kind == "mixtral" and cfg.moe_top_k == 1:  # ours then weighs the expert by its router probability
        raise ValueError("Mixtral and llama.cpp rescale the chosen experts' weights to sum to 1, which for a top-1 "
                         "MoE loses the router probability ours multiplies by: no format here holds moe_top_k=1")
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

def bpe_spellings(tok):
    """Our BPE's byte and merge tokens spelled with GPT-2's byte-to-character table, as tokenizer.json and GGUF store
    them (b" the" -> "Ġthe"); ValueError if two ids hold the same bytes, which those files cannot tell apart."""
    char = byte_to_unicode()
    spelled = ["".join(char[b] for b in tok.vocab[i]) for i in range(256 + len(tok.merges))]
    if len(set(spelled)) < len(spelled):
        raise ValueError("this BPE vocabulary holds two ids for the same bytes, which tokenizer.json and GGUF "
                         "cannot tell apart: retrain the tokenizer")
    return spelled


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
        out.add_special_tokens([AddedToken(s, special=True) for s in tok.special_tokens])  # chat tokens, after <unk>
    elif tok.kind == "bpe":
        spelled = bpe_spellings(tok)
        out = Tokenizer(models.BPE({s: i for i, s in enumerate(spelled)}, [(spelled[a], spelled[b]) for a, b in tok.merges]))
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


# chat_format.render_chat as a Jinja template, the form apply_chat_template and llama.cpp read
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '" + END + "' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def tokenizer_config(tok, hf_tok, block_size):
    """tokenizer_config.json: the plain fast tokenizer over tokenizer.json; special tokens by name, or None;
    a chat run's template."""
    name = {k: None if i is None else hf_tok.id_to_token(i)
            for k, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id), ("unk", tok.unk_id))}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
            "clean_up_tokenization_spaces": False,  # it would turn " ." into "." and break the round trip
            **{f"{k}_token": v for k, v in name.items()}, **({"chat_template": CHAT_TEMPLATE} if chat_ids(tok) else {})}


def stop_ids(tok):
    """The ids generation stops at: the end of a turn in a chat run, else EOS (None: none)."""
    chat = chat_ids(tok)
    return [chat[END]] if chat else tok.eos_id


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
               {"bos_token_id": tok.bos_id, "eos_token_id": stop_ids(tok), "pad_token_id": tok.pad_id})
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
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"] if index.is_file() else {}
    files = sorted(set(weight_map.values())) or [WEIGHTS]
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


# --- GGUF: llama.cpp's one-file format ----------------------------------------------------------------------

def interleave_rope_rows(w, heads):
    """Rows of q or k (heads·D, …) from our half-split RoPE pairs (i, i + D/2) to the neighbour pairs (2i, 2i + 1)
    that llama.cpp and llama2.c rotate, head by head. One head, D = 4: rows (a0, a1, b0, b1) -> (a0, b0, a1, b1)."""
    D = w.shape[0] // heads
    return w.reshape(heads, 2, D // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (h, 2, D/2, …) -> (h, D/2, 2, …)


def llama_tensors(model):
    """A llama or moe run's weights under llama.cpp's GGUF names, q and k rows interleaved, a learnable scale folded.

    Experts are stacked per layer: ffn_{gate,up}_exps (E, F, C), ffn_down_exps (E, C, F). A tied head has no
    output.weight: llama.cpp then reads token_embd for it.
    """
    cfg = model.config
    state = fold_attention_scale(model.state_dict(), cfg)
    H, G, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    out = {"token_embd.weight": state["embed.tok.weight"], "output_norm.weight": state["norm.weight"]}
    if not cfg.tie_weights:
        out["output.weight"] = state["head.weight"]
    ffn = (("gate", "ffn_gate"), ("up", "ffn_up"), ("out_proj", "ffn_down"))
    for i in range(cfg.n_layer):
        ours, blk = f"blocks.{i}.", f"blk.{i}."
        for p in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = state[f"{ours}attn.qkv.{p}"].split([H * D, G * D, G * D])  # ((H + 2G)·D, …) -> 3 parts
            out |= {f"{blk}attn_q.{p}": interleave_rope_rows(q, H), f"{blk}attn_k.{p}": interleave_rope_rows(k, G),
                    f"{blk}attn_v.{p}": v, f"{blk}attn_output.{p}": state[f"{ours}attn.out_proj.{p}"]}
        out[f"{blk}attn_norm.weight"] = state[f"{ours}attn_norm.weight"]
        out[f"{blk}ffn_norm.weight"] = state[f"{ours}ffn_norm.weight"]
        if cfg.mlp == "moe":
            out[f"{blk}ffn_gate_inp.weight"] = state[f"{ours}ffn.router.weight"]
            for name, gguf_name in ffn:  # E × (F, C) -> (E, F, C)
                experts = [state[f"{ours}ffn.experts.{e}.{name}.weight"] for e in range(cfg.n_experts)]
                out[f"{blk}{gguf_name}_exps.weight"] = torch.stack(experts)
        else:
            out |= {f"{blk}{gguf_name}.weight": state[f"{ours}ffn.{name}.weight"] for name, gguf_name in ffn}
    return {name: t.detach().float().contiguous() for name, t in out.items()}


def llama_kind(cfg, fmt, instead):
    """hf_kind of a run that `fmt` (llama.cpp's llama architecture, llama2.c) can hold; ValueError otherwise."""
    kind = hf_kind(cfg)
    if kind == "gpt2":
        raise ValueError(f"{fmt} has no exact form of the gpt preset (learned positions, LayerNorm, exact GELU): "
                         f"{instead}")
    return kind


def gguf_vocab(tok, TokenType):
    """llama.cpp's tokenizer keys for ours: (model, pre-tokenizer, tokens, token types, scores, merges).

    spm -> "llama": the pieces, scores and types as sentencepiece has them. bpe -> "gpt2": tokens in GPT-2's
    byte spelling, our merges, and "llama-bpe", the name llama.cpp gives our split regex (GPT-4's). char ->
    "gpt2" too, since llama.cpp drops an unknown character there rather than stop: one token per character,
    with merges that rebuild a multi-byte character from the bytes llama.cpp starts from.
    """
    if tok.kind == "spm":
        sp, user = tok.sp, {tok.sp.piece_to_id(s) for s in SPM_LOSSLESS["user_defined_symbols"]}
        types = [TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i) else
                 TokenType.BYTE if sp.is_byte(i) else TokenType.UNUSED if sp.is_unused(i) else
                 TokenType.USER_DEFINED if i in user else TokenType.NORMAL for i in range(tok.vocab_size)]
        pieces = [sp.id_to_piece(i) for i in range(tok.vocab_size)]
        return "llama", None, pieces, types, [sp.get_score(i) for i in range(tok.vocab_size)], None
    if tok.kind == "bpe":
        if tok.pattern != GPT4_SPLIT_PATTERN:
            raise ValueError("llama.cpp splits text only with the regexes it names, and this BPE tokenizer was trained "
                             "with another split pattern: export --format hf")
        spelled = bpe_spellings(tok)
        merges = [f"{spelled[a]} {spelled[b]}" for a, b in tok.merges]
        types = [TokenType.NORMAL] * len(spelled) + [TokenType.CONTROL] * len(tok.special_tokens)
        return "gpt2", "llama-bpe", spelled + list(tok.special_tokens), types, None, merges
    if tok.kind == "char":
        char = byte_to_unicode()
        spelled = ["".join(char[b] for b in c.encode("utf-8")) for c in tok.chars]
        # "猫" is 3 bytes: merges (b1, b2), then (b1b2, b3); shorter prefixes first, each pair once
        merges = dict.fromkeys(f"{s[:n - 1]} {s[n - 1]}" for n in range(2, 5) for s in spelled if len(s) >= n)
        types = [TokenType.NORMAL] * len(spelled) + [TokenType.UNKNOWN] + [TokenType.CONTROL] * len(tok.special_tokens)
        # an ASCII vocabulary has no merges, but llama.cpp refuses a file without any and gguf writes no empty
        # list: one merge that never applies, as its left side "aa" is no symbol (only a merge could make one)
        merges = list(merges) or [f"{spelled[0] * 2} {spelled[0]}"]
        return "gpt2", "default", [*spelled, UNK, *tok.special_tokens], types, None, merges
    raise ValueError(f"a {tok.kind!r} tokenizer has no GGUF form here: export --format hf")


def gguf_special_ids(tok):
    """bos/eos/unk/pad ids to write. llama.cpp cannot store "none": a missing or out-of-range key falls back to its
    default, bos 1 and eos 2 (sentencepiece) or 11 (BPE), real characters of a small vocabulary. So a missing bos or
    eos is written as <unk>, which a trained model never emits (it is never a target); pad is simply left out."""
    if tok.unk_id is None and None in (tok.bos_id, tok.eos_id):
        raise ValueError("this tokenizer has no BOS/EOS and no <unk> to stand in for them in GGUF: export --format hf")
    stand_in = lambda i: tok.unk_id if i is None else i  # noqa: E731
    ids = {"bos": stand_in(tok.bos_id), "eos": stand_in(tok.eos_id), "unk": tok.unk_id, "pad": tok.pad_id}
    return {k: i for k, i in ids.items() if i is not None}


def export_gguf(run_dir, path):
    """Write a llama or moe run as one GGUF file (new) for llama.cpp, with its tokenizer; returns its path."""
    try:
        import gguf
    except ImportError:
        raise ValueError("writing GGUF needs the gguf package, llama.cpp's own writer: pip install gguf") from None
    model, tok, _ = load_float_run(resolve_run_dir(run_dir))
    cfg = model.config
    llama_kind(cfg, "llama.cpp", "its gpt2 architecture computes the tanh approximation of GELU; export --format hf")
    model_name, pre, tokens, types, scores, merges = gguf_vocab(tok, gguf.TokenType)
    special = gguf_special_ids(tok)
    path = Path(path)
    if path.exists():
        raise ValueError(f"{path} already exists: pick a new --out")
    tensors = llama_tensors(model)
    rope, factor = parse_rope_scaling(cfg.rope_scaling)

    def write(tmp):
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(path.stem)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(ffn_width(model))
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.kv_heads)
        w.add_layer_norm_rms_eps(NORM_EPS)
        w.add_rope_dimension_count(cfg.head_dim)
        # static NTK scaling is a larger base (as for Hugging Face); linear scaling llama.cpp has by name
        w.add_rope_freq_base(cfg.rope_theta * (factor ** (cfg.head_dim / (cfg.head_dim - 2)) if rope == "ntk" else 1))
        if rope == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)
        if cfg.mlp == "moe":
            w.add_expert_count(cfg.n_experts)
            w.add_expert_used_count(cfg.moe_top_k)
        w.add_tokenizer_model(model_name)
        if pre:
            w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        if scores:
            w.add_token_scores(scores)
        if merges:
            w.add_token_merges(merges)
        for key, i in special.items():
            getattr(w, f"add_{key}_token_id")(i)
        if chat_ids(tok):  # llama.cpp renders the template and ends a reply at end-of-turn
            w.add_chat_template(CHAT_TEMPLATE)
            w.add_eot_token_id(chat_ids(tok)[END])
        w.add_add_bos_token(False)  # our encode adds no BOS; llama.cpp's default would prepend one
        w.add_add_eos_token(False)
        if model_name == "llama":
            w.add_add_space_prefix(False)  # trained without sentencepiece's dummy prefix
        for name, t in tensors.items():
            w.add_tensor(name, t.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)
    return path


# --- llama2.c: model.bin and tokenizer.bin for run.c and runq.c ---------------------------------------------

L2C_MAGIC, L2C_HEADER, L2C_GROUP = 0x616B3432, 256, 64  # "ak42"; version 2's header bytes; its widest Q8_0 group


def check_llama2c(cfg):
    """ValueError naming what llama2.c lacks for this run and where the run can go instead."""
    llama_kind(cfg, "llama2.c", "export --format hf")
    for lacks, found in (("mixture of experts", cfg.mlp == "moe"), ("biases", cfg.bias),
                         ("RoPE base other than 10000 (run.c hard-wires it)", cfg.rope_theta != 10000.0),
                         ("RoPE scaling", cfg.rope_scaling is not None)):
        if found:
            raise ValueError(f"llama2.c has no {lacks}: export --format gguf (llama.cpp) or --format hf")


def llama2c_vocab(tok):
    """run.c's ids 0, 1, 2, … for our tokenizer: [(embedding row, head row, piece bytes, score)], rows being our ids.

    run.c hard-wires three things: it feeds id 1 (BOS) first and stops when id 1 comes out, ids 0-2 are
    <unk> <s> </s>, and a character missing from the vocabulary becomes its UTF-8 bytes at id byte + 3.
      spm: sentencepiece's own layout, except our "\\n" symbol, which sits before the bytes: it moves after them.
      bpe: <|pad|> <|bos|> <|eos|>, then our 256 byte tokens at byte + 3, then the merges: renumbered, no padding.
      char: <unk>; a BOS that reads as the "\\n" sample.py starts from but is as unlikely as <unk>; an EOS and 256
            bytes that act as <unk>; then the characters.
    Scores order run.c's merges (best first): sentencepiece's scores, minus our merge rank for BPE.
    """
    if tok.kind == "spm":
        sp = tok.sp
        first = [sp.unk_id(), sp.bos_id(), sp.eos_id()]
        byte_ids = [i for i in range(tok.vocab_size) if sp.is_byte(i)]
        if min(first) < 0 or len(byte_ids) != 256:
            raise ValueError("run.c needs <unk>, <s>, </s> and 256 byte pieces, which this sentencepiece model lacks "
                             "(train it with byte_fallback=True): export --format gguf or hf")
        order = first + byte_ids + [i for i in range(tok.vocab_size) if i not in first and not sp.is_byte(i)]
        names = [sp.id_to_piece(i).encode() if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) else
                 tok.token_bytes(i) for i in range(tok.vocab_size)]
        vocab = [(i, i, names[i], sp.get_score(i)) for i in order]
    elif tok.kind == "bpe":
        first = [tok.special_tokens.get(s) for s in ("<|pad|>", "<|bos|>", "<|eos|>")]
        if None in first:
            raise ValueError("run.c needs three special tokens for ids 0-2 and this BPE tokenizer lacks "
                             "<|pad|>, <|bos|> or <|eos|>: export --format gguf or hf")
        names = {i: s.encode() for s, i in tok.special_tokens.items()}
        order = first + list(range(256 + len(tok.merges))) + [i for i in names if i not in first]
        # a piece is a C string: the zero byte is spelled as run.c decodes it
        vocab = [(i, i, names.get(i) or (tok.vocab[i] if tok.vocab[i] != b"\0" else b"<0x00>"), -float(i))
                 for i in order]
    elif tok.kind == "char":
        unk, start = tok.unk_id, tok.encode("\n")[0]
        vocab = [(unk, unk, UNK_TEXT.encode(), 0.0), (start, unk, b"<s>", 0.0), (unk, unk, b"</s>", 0.0)]
        vocab += [(unk, unk, f"<0x{b:02X}>".encode(), 0.0) for b in range(256)]
        vocab += [(i, i, c.encode("utf-8"), 0.0) for i, c in enumerate(tok.chars)]
        vocab += [(i, i, s.encode(), 0.0) for s, i in tok.special_tokens.items()]  # a chat run's tokens
    else:
        raise ValueError(f"a {tok.kind!r} tokenizer has no llama2.c form here: export --format hf")
    if not any(piece == b" " for _, _, piece, _ in vocab):
        raise ValueError("run.c puts a ' ' token before every prompt and this vocabulary has none: export --format gguf")
    return vocab


def llama2c_model_bytes(model, vocab, int8):
    """model.bin: version 0 (7-int header, fp32, a negative vocab size for a separate head) that run.c reads, or
    version 2 (magic, version, header padded to 256 bytes, fp32 norms, then Q8_0 int8 groups and their scales)."""
    cfg, t = model.config, llama_tensors(model)
    rows_in, rows_out = [r[0] for r in vocab], [r[1] for r in vocab]
    shared = cfg.tie_weights and rows_in == rows_out
    embedding = t["token_embd.weight"][rows_in]
    classifier = [] if shared else [t.get("output.weight", t["token_embd.weight"])[rows_out]]
    per_layer = lambda name: [t[f"blk.{i}.{name}.weight"] for i in range(cfg.n_layer)]  # noqa: E731
    attention = per_layer("attn_q") + per_layer("attn_k") + per_layer("attn_v") + per_layer("attn_output")
    ffn = per_layer("ffn_gate") + per_layer("ffn_down") + per_layer("ffn_up")  # llama2.c's w1, w2, w3
    V, F = len(vocab), ffn_width(model)
    dims = (cfg.n_embd, F, cfg.n_layer, cfg.n_head, cfg.kv_heads)
    fp32 = lambda ts: b"".join(x.float().numpy().tobytes() for x in ts)  # noqa: E731
    if not int8:
        angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float64), rope_frequencies(cfg.head_dim))
        rope_table = [angles.cos(), angles.sin()]  # (T, D/2) each: read by early llama2.c, skipped by run.c
        return struct.pack("<7i", *dims, V if shared else -V, cfg.block_size) + fp32(
            [embedding] + per_layer("attn_norm") + attention + per_layer("ffn_norm") + ffn + [t["output_norm.weight"]]
            + rope_table + classifier)
    group = math.gcd(L2C_GROUP, cfg.n_embd, F)  # runq.c quantizes C- and F-long activations in groups too
    header = struct.pack("<Ii7iBi", L2C_MAGIC, 2, *dims, V, cfg.block_size, shared, group)
    # groups within a row: in the file's flat order they are its groups of `group` consecutive numbers
    quantized = (symmetric_quantize(m, 8, group) for m in [embedding] + attention + ffn + classifier)
    return (header + bytes(L2C_HEADER - len(header))
            + fp32(per_layer("attn_norm") + per_layer("ffn_norm") + [t["output_norm.weight"]])
            + b"".join(q.numpy().tobytes() + scale.float().numpy().tobytes() for q, scale in quantized))


def export_llama2c(run_dir, out_dir, int8=False):
    """Write a llama run as llama2.c's model.bin (fp32, or Q8_0 with int8) and tokenizer.bin in `out_dir` (new)."""
    model, tok, _ = load_float_run(resolve_run_dir(run_dir))
    check_llama2c(model.config)
    vocab = llama2c_vocab(tok)
    out = new_output_dir(out_dir)
    model_bin = llama2c_model_bytes(model, vocab, int8)
    tokenizer_bin = struct.pack("<I", max(len(piece) for _, _, piece, _ in vocab)) + b"".join(
        struct.pack("<fi", score, len(piece)) + piece for _, _, piece, score in vocab)
    atomic_write_bytes(out / "model.bin", model_bin)
    atomic_write_bytes(out / "tokenizer.bin", tokenizer_bin)
    return out


NEXT_STEP = {  # how to use what each format wrote
    "hf": "load it: AutoModelForCausalLM.from_pretrained({out!r}), AutoTokenizer.from_pretrained({out!r})",
    "gguf": "run it with llama.cpp: llama-cli -m {out} -p \"ROMEO:\" --temp 0",
    "llama2c": "run it with llama2.c: ./{run} {out}/model.bin -z {out}/tokenizer.bin -t 0 -i \"ROMEO:\"",
}


def main(argv=None):
    replace_unencodable_output()
    p = argparse.ArgumentParser(description="Export a run to another format, or import a Hugging Face model.")
    p.add_argument("run", nargs="?", help="the run directory to export (only read)")
    p.add_argument("--format", choices=FORMATS, help="what to write: hf (a Hugging Face model directory), gguf "
                   "(one file for llama.cpp) or llama2c (model.bin and tokenizer.bin for llama2.c's run.c)")
    p.add_argument("--out", required=True, help="the new directory (hf, llama2c, --from-hf) or .gguf file to write")
    p.add_argument("--int8", action="store_true", help="llama2c only: Q8_0 weights, the file runq.c reads")
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
        if args.int8 and args.format != "llama2c":
            raise ValueError("--int8 is for --format llama2c (runq.c's Q8_0 file); quantize.py makes int8 runs")
        if args.format == "llama2c":
            out = export_llama2c(args.run, args.out, int8=args.int8)
        else:
            out = {"hf": export_hf, "gguf": export_gguf}[args.format](args.run, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    files = sorted(f.name for f in out.iterdir()) if out.is_dir() else [out.name]
    print(f"wrote {', '.join(files)} ({sum((out / f if out.is_dir() else out).stat().st_size for f in files):,} bytes)")
    print(NEXT_STEP[args.format].format(out=str(out), run="runq" if args.int8 else "run"))


if __name__ == "__main__":
    main()
