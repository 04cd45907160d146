"""Stage 25b — LoRA: fine-tune a frozen model through small low-rank adapters.

Fine-tuning every weight needs gradients and optimizer state for all of them,
and a full copy of the model per task. LoRA (Hu et al., 2021) freezes each
chosen weight W (C_out × C_in) and learns only a low-rank change of it,
ΔW = B·A with A (r × C_in) and B (C_out × r), r ≪ C:

    y = W·x + B·A·dropout(x) · alpha/r

A starts random and B at zero, so a fresh adapter changes nothing and training
starts exactly from the base model. Afterwards ΔW folds into W (merge_lora):
the merged model is as fast as the base. The adapter alone is a few percent of
the weights, written in peft's files so that peft puts it on this run's
Hugging Face export (export.py).

New since stage 25a: a model whose base weights stay frozen while small added
matrices learn. Run the demo: `python lora.py`

Shapes: B batch, T time, C_in / C_out a Linear layer's widths, r rank,
H query heads, G key/value heads, D head dim.
"""
import json
import math
import re
import tempfile
from fnmatch import fnmatchcase
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from checkpoint import atomic_write, write_json
from transformer import PRESETS, Transformer

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's file names
PEFT_PREFIX = "base_model.model."  # peft names a tensor by its module's path inside PeftModel
# our module inside block i -> the Hugging Face module holding the same weight (export.py's names);
# Llama's fused qkv is the one that splits, into q_proj, k_proj and v_proj (hf_parts)
HF_BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers"}
HF_EMBEDDING = {"gpt2": "transformer.wte", "llama": "model.embed_tokens"}  # the token embedding's module
TOKEN_VALUES = "token_adapter.trainable_tokens_delta"  # peft's trainable tokens: the rows' new values, not deltas
HF_MODULES = {"gpt2": {"attn.qkv": "attn.c_attn", "attn.out_proj": "attn.c_proj", "ffn.fc": "mlp.c_fc",
                       "ffn.out_proj": "mlp.c_proj"},
              "llama": {"attn.out_proj": "self_attn.o_proj", "ffn.gate": "mlp.gate_proj", "ffn.up": "mlp.up_proj",
                        "ffn.out_proj": "mlp.down_proj"}}


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus the trainable low-rank update B·A: (…, C_in) -> (…, C_out).

    A is initialised as nn.Linear initialises its own weight (Kaiming-uniform, a=√5, what peft does too), so
    A·x has a Linear layer's scale from the first step; B is zero, so B·A·x is exactly 0 until B learns.
    Dropout acts on the adapter's input only: the frozen path computes what the base model did.
    """

    def __init__(self, base, rank=8, alpha=16, dropout=0.0):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        self.scaling = alpha / rank  # alpha fixes the update's size, so a new rank needs no new learning rate
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                               dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        base.requires_grad_(False)
        self.train(base.training)  # a layer put into a model in eval mode must not start dropping out

    def forward(self, x):
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (…, C_in) -> (…, r) -> (…, C_out)
        return self.base(x) + update * self.scaling

    def merged(self):
        """The base Linear with B·A·alpha/r added to its weight: the same outputs (in eval mode), one matmul."""
        with torch.no_grad():
            self.base.weight += (self.lora_B @ self.lora_A) * self.scaling  # (C_out, r) @ (r, C_in) -> (C_out, C_in)
        return self.base


def matches(name, targets):
    """True when a target names module `name`: its last components ("qkv", "attn.out_proj") or a glob on the
    whole name ("blocks.0.*"). matches("blocks.1.attn.qkv", ["qkv"]) and (…, ["blocks.*.attn.*"]) are True."""
    return any(name == t or name.endswith("." + t) or fnmatchcase(name, t) for t in targets)


def lora_modules(model):
    """{module name: LoRALinear} of every adapter in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def replace_module(model, name, new):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def add_lora(model, rank=8, alpha=16, dropout=0.0, targets=("qkv", "out_proj")):
    """Wrap every nn.Linear whose name a target matches (see `matches`) in a LoRALinear; freeze all else.

    The defaults adapt the fused attention projection and every out_proj: attention's and the feed-forward's
    (down) projection, or each expert's. "attn.out_proj" picks attention's alone. Returns `model`, changed in place.
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not (isinstance(rank, int) and rank > 0):
        raise ValueError(f"LoRA rank {rank!r} must be a positive integer (rank 0 is full fine-tuning: no add_lora)")
    if lora_modules(model):
        raise ValueError("this model already has LoRA adapters: merge_lora them first or start from the base model")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [name for name in linears if matches(name, targets)]
    if not chosen:
        kinds = sorted({re.sub(r"\.\d+\.", ".*.", name) for name in linears})  # one entry per kind of layer
        raise ValueError(f"no Linear layer matches the LoRA targets {list(targets)}; this model's are: {', '.join(kinds)}")
    for name in chosen:  # a tied head is the embedding: merging its update would change the embedding as well
        weight = model.get_submodule(name).weight
        if any(p is weight for other, m in model.named_modules() if other != name for p in m.parameters(False)):
            raise ValueError(f"{name} shares its weight with another layer (tie_weights): leave it out of the targets")
    model.requires_grad_(False)
    for name in chosen:
        replace_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return model


def merge_lora(model):
    """Fold every adapter into its Linear and put the plain nn.Linear back. Parameters stay frozen as add_lora
    left them (call model.requires_grad_(True) to train it all). Returns `model`, changed in place."""
    for name, m in lora_modules(model).items():
        replace_module(model, name, m.merged())
    return model


def train_rows(model, rows):
    """Let the token embedding rows `rows` (ids, 1-D) train beside the adapters, all others frozen: peft's
    "trainable tokens". A gradient hook zeroes every other row's gradient, which with no weight decay keeps them
    exactly the base's; with a tied head the rows are those tokens' logits too. save_adapter writes their values.
    Returns the number of values that train."""
    tok = model.embed.tok
    rows = torch.unique(torch.as_tensor(rows, dtype=torch.long))  # sorted, as the adapter lists them
    if not len(rows):
        return 0
    keep = torch.isin(torch.arange(len(tok.weight)), rows)[:, None]  # (V, 1)
    tok.weight.requires_grad_(True)
    tok.weight.register_hook(lambda grad: grad.where(keep.to(grad.device), 0.0))  # (V, C)
    tok.trained_rows = rows
    return len(rows) * tok.weight.shape[1]


def trainable_parameters(model):
    """(trainable, total) parameter counts, a tied matrix counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --- The adapter files in peft's layout, on the names of the Hugging Face export -----------------------------

def hf_layout(cfg):
    """The Hugging Face names export.py gives a model: GPT-2's for pos="learned", else Llama's (Mixtral's too)."""
    return "gpt2" if cfg.pos == "learned" else "llama"


def hf_parts(cfg, name):
    """[(Hugging Face module name, rows of our weight it holds)] for our Linear `name`; ValueError if none.

    GPT-2's c_attn holds q, k and v fused as ours; Llama's splits them (Mixtral shares its attention names).
    hf_parts(llama cfg, "blocks.0.attn.qkv") ->
    [("model.layers.0.self_attn.q_proj", rows 0:H·D), (… k_proj, H·D:(H+G)·D), (… v_proj, (H+G)·D:(H+2G)·D)].
    """
    layout = hf_layout(cfg)
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if name == "head":
        return [("lm_head", slice(None))]
    if block and layout == "llama" and block[2] == "attn.qkv":
        ends = torch.tensor([0, cfg.n_head, cfg.n_head + cfg.kv_heads, cfg.n_head + 2 * cfg.kv_heads]) * cfg.head_dim
        return [(f"model.layers.{block[1]}.self_attn.{p}_proj", slice(int(a), int(b)))
                for p, a, b in zip("qkv", ends, ends[1:])]
    if block and block[2] in HF_MODULES[layout]:
        return [(f"{HF_BLOCKS[layout]}.{block[1]}.{HF_MODULES[layout][block[2]]}", slice(None))]
    raise ValueError(f"{name} has no Hugging Face module an adapter could go on (Mixtral fuses its experts and "
                     f"router): adapt attn.qkv, attn.out_proj or a Llama feed-forward instead")


def query_factor(model, name):
    """(H·D,) factor export.py folds into the query rows for attn_scale="learnable" (scale / D^−0.5), or None.
    The adapter's query rows of B are part of the same projection, so they carry the same factor."""
    scale = getattr(model.get_submodule(name.rpartition(".")[0]), "scale", None) if name.endswith("attn.qkv") else None
    if scale is None:
        return None
    return (scale.detach() / model.config.head_dim ** -0.5).repeat_interleave(model.config.head_dim)  # (H,) -> (H·D,)


def scale_query_rows(lora_B, factor, inverse=False):
    """lora_B (rows, r) with its first H·D (query) rows multiplied by factor (divided with inverse)."""
    if factor is None:
        return lora_B
    out = lora_B.detach().clone()
    out[:len(factor)] *= (1 / factor if inverse else factor)[:, None]  # (H·D,) -> (H·D, 1)
    return out


def peft_target_modules(cfg, linears, adapted):
    """peft's target_modules: the short names ("q_proj") when they pick exactly the adapted modules, else full names."""
    everything = set()
    for name in linears:
        try:
            everything |= {hf for hf, _ in hf_parts(cfg, name)}
        except ValueError:  # a module that cannot carry an adapter cannot be picked by a short name either
            continue
    short = {hf.rpartition(".")[2] for hf in adapted}
    if {hf for hf in everything if hf.rpartition(".")[2] in short} == set(adapted):
        return sorted(short)
    return sorted(adapted)


def token_layers(model):
    """{Hugging Face module: our weight} of the layers whose token rows an adapter carries: the token embedding,
    and an untied head beside it (peft follows a tied head by itself)."""
    layers = {HF_EMBEDDING[hf_layout(model.config)]: model.embed.tok.weight}
    if model.head.weight is not model.embed.tok.weight:
        layers["lm_head"] = model.head.weight
    return layers


def token_indices(model, rows):
    """peft's trainable_token_indices for these rows: the list (the embedding's), or one per layer when untied."""
    layers = token_layers(model)
    return rows if len(layers) == 1 else {hf.rpartition(".")[2]: rows for hf in layers}


def save_adapter(model, out_dir):
    """Write the adapters as adapter_config.json + adapter_model.safetensors in `out_dir`, the files peft's
    PeftModel.from_pretrained loads onto export_hf's directory of the base run. Returns the directory.

    Our fused qkv adapter is one A and one B; peft's q_proj, k_proj and v_proj each get that A and their
    rows of B, which is the same update: B·A·x split by rows is (B_q·A·x, B_k·A·x, B_v·A·x).
    """
    adapters = lora_modules(model)
    if not adapters:
        raise ValueError("this model has no LoRA adapters to save: add_lora first")
    settings = {(m.rank, m.alpha, m.dropout.p) for m in adapters.values()}
    if len(settings) > 1:
        raise ValueError(f"peft's adapter_config.json holds one rank, alpha and dropout; these adapters have {settings}")
    (rank, alpha, dropout), = settings
    cfg, tensors = model.config, {}
    for name, m in adapters.items():
        lora_B = scale_query_rows(m.lora_B, query_factor(model, name))
        for hf, rows in hf_parts(cfg, name):
            tensors[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = m.lora_A  # one copy of the shared A for each part
            tensors[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = lora_B[rows]  # (its rows, r)
    adapted = sorted({n[len(PEFT_PREFIX):].rpartition(".lora_")[0] for n in tensors})
    linears = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
    rows = getattr(model.embed.tok, "trained_rows", None)  # train_rows'
    for hf, weight in token_layers(model).items() if rows is not None else ():  # in trainable_token_indices' order
        tensors[f"{PEFT_PREFIX}{hf}.{TOKEN_VALUES}"] = weight[rows]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
              "target_modules": peft_target_modules(cfg, linears, adapted), "bias": "none",
              "fan_in_fan_out": cfg.pos == "learned",  # GPT-2's Conv1D stores its weight as (C_in, C_out)
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "use_rslora": False,
              "use_dora": False, "base_model_name_or_path": None,
              "trainable_token_indices": None if rows is None else token_indices(model, rows.tolist())}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().float().contiguous().clone() for n, t in tensors.items()}  # safetensors refuses shared memory
    atomic_write(out / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(out / ADAPTER_CONFIG, config)
    return out


def read_adapter(adapter_dir):
    """(adapter_config.json as a dict, {tensor name without peft's prefix: tensor}) of a peft LoRA directory."""
    adapter_dir = Path(adapter_dir)
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter_dir / file).is_file():
            raise FileNotFoundError(f"{adapter_dir} has no {file}: give the directory save_adapter wrote")
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    extras = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("peft_type") != "LORA" or extras:
        raise ValueError(f"{adapter_dir} holds no plain LoRA adapter of one rank and alpha (peft_type "
                         f"{config.get('peft_type')!r}{', ' if extras else ''}{', '.join(extras)})")
    tensors = {n.removeprefix(PEFT_PREFIX): t for n, t in load_file(adapter_dir / ADAPTER_WEIGHTS).items()}
    return config, tensors


def load_adapter(model, adapter_dir):
    """Put the adapters of a peft LoRA directory (save_adapter's, or peft's on our HF export) on `model`, the base
    model they were trained on; q_proj/k_proj/v_proj fuse back into one qkv adapter. Returns `model`, in place."""
    config, tensors = read_adapter(adapter_dir)
    if lora_modules(model):
        raise ValueError("this model already has LoRA adapters: load the adapter onto the base model")
    rank, alpha, dropout = config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0)
    rows, used = load_rows(model, config, tensors, adapter_dir)  # first: an ungrown base is refused unchanged
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        try:
            parts = hf_parts(model.config, name)
        except ValueError:  # no file could hold an adapter for it
            continue
        found = [f"{hf}.lora_A.weight" in tensors for hf, _ in parts]
        if not any(found):
            continue
        if not all(found):
            raise ValueError(f"{adapter_dir} adapts only part of {name} ({', '.join(hf for hf, _ in parts)}): "
                             f"ours is one fused layer, so all of its parts or none")
        lora_A = tensors[f"{parts[0][0]}.lora_A.weight"]
        if any(not torch.equal(tensors[f"{hf}.lora_A.weight"], lora_A) for hf, _ in parts):
            raise ValueError(f"the lora_A of {', '.join(hf for hf, _ in parts)} differ: only one shared lora_A "
                             f"fuses into our single {name} adapter")
        lora_B = torch.cat([tensors[f"{hf}.lora_B.weight"] for hf, _ in parts])  # parts' rows -> (C_out, r)
        adapter = LoRALinear(m, rank, alpha, dropout)
        if lora_A.shape != adapter.lora_A.shape or lora_B.shape != adapter.lora_B.shape:
            raise ValueError(f"{adapter_dir}: the adapter of {name} is A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}; "
                             f"rank {rank} on this model needs {tuple(adapter.lora_A.shape)}, {tuple(adapter.lora_B.shape)}")
        with torch.no_grad():
            adapter.lora_A.copy_(lora_A)
            adapter.lora_B.copy_(scale_query_rows(lora_B, query_factor(model, name), inverse=True))
        replace_module(model, name, adapter)
        used |= {f"{hf}.lora_{x}.weight" for hf, _ in parts for x in "AB"}
    unused = sorted(set(tensors) - used)
    if not used or unused:
        raise ValueError(f"{adapter_dir} holds adapters this model has no layer for: "
                         f"{', '.join(unused[:3]) or 'none at all'}; load it onto the base model it was trained on")
    model.requires_grad_(False)
    for m in lora_modules(model).values():
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    if rows is not None:
        train_rows(model, rows)
    return model


def load_rows(model, config, tensors, adapter_dir):
    """Write an adapter's trainable tokens (peft's trainable_token_indices and their rows' values) into our token
    embedding (and an untied head); returns the embedding's ids (None when it has none) and the tensors read."""
    indices = config.get("trainable_token_indices")
    if not indices:
        return None, set()
    layers = token_layers(model)
    wanted = {hf.rpartition(".")[2]: hf for hf in layers}  # peft's dict form keys a layer by its last name
    per_layer = {next(iter(layers)): indices} if isinstance(indices, list) else {
        wanted.get(key, key): ids for key, ids in indices.items()}
    for hf, ids in per_layer.items():
        name, weight = f"{hf}.{TOKEN_VALUES}", layers.get(hf)
        if weight is None or name not in tensors:
            raise ValueError(f"{adapter_dir} trains token rows of {hf}: this model has no such layer (it has "
                             f"{', '.join(layers)})")
        if max(ids) >= len(weight) or tensors[name].shape != (len(ids), weight.shape[1]):
            raise ValueError(f"{adapter_dir} trains {len(ids)} rows of {hf} up to token {max(ids)}, width "
                             f"{tensors[name].shape[-1]}; this model has {len(weight)} tokens of width "
                             f"{weight.shape[1]}: load it onto the base grown by the same tokens (add_chat_tokens)")
        with torch.no_grad():
            weight[torch.tensor(ids)] = tensors[name].to(weight)
    return torch.tensor(per_layer.get(next(iter(layers)), [])), {f"{hf}.{TOKEN_VALUES}" for hf in per_layer}


def _demo():
    torch.manual_seed(0)
    model = Transformer(PRESETS["llama"]).eval()
    idx = torch.randint(65, (2, 32))
    with torch.no_grad():
        before = model(idx)[0]
    add_lora(model, rank=8, alpha=16)
    trainable, total = trainable_parameters(model)
    print(f"llama preset with rank-8 adapters on {len(lora_modules(model))} layers: {trainable:,} of {total:,} "
          f"parameters train ({trainable / total:.1%})")
    print(f"a fresh adapter changes nothing: {torch.equal(model(idx)[0], before)}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(30):  # teach the adapters alone to continue this one batch
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == 29:
            print(f"step {step:2d}  loss {loss.item():.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, tmp)
        config, tensors = read_adapter(tmp)
        print(f"{ADAPTER_WEIGHTS}: {len(tensors)} tensors, e.g. {PEFT_PREFIX}{sorted(tensors)[0]}; "
              f"target_modules {config['target_modules']}")
    with torch.no_grad():
        adapted = model(idx)[0]
        merge_lora(model)
        print(f"merged: max |logits difference| {(model(idx)[0] - adapted).abs().max().item():.2e}, "
              f"plain Linear again: {type(model.blocks[0].attn.qkv).__name__}")


if __name__ == "__main__":
    _demo()
