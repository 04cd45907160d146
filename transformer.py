"""Stage 13 — the Transformer language model: embeddings, N blocks, a final norm, a linear head.

The whole decoder in one page. Token ids become vectors, n_layer blocks
refine them (each position reading only from earlier ones), and a linear head
turns the last vectors into next-token logits. It has the very call of the
bigram model, `logits, loss = model(idx, targets)`, and the same loss.

New since stage 11: a dataclass config whose fields pick every component
(GPT-2 or Llama parts, MoE, grouped-query attention, RoPE scaling), GPT-2's
initialisation, tied input/output embeddings, ready-made PRESETS and a KV
cache for fast generation.
Run the demo: `python transformer.py`

Shapes: B batch, T time, C channels (n_embd), V vocabulary.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from attention import ATTN_IMPLS, ATTN_SCALES, KVCache
from bigram_lm import next_token_loss
from block import FFN_KINDS, LAYER_KINDS, Block
from memory import UPDATE_RULES
from components import (Embeddings, MoE, RotaryEmbedding, expert_counts, load_balancing_loss, make_norm,
                        parse_rope_scaling)
from recurrent import RECURRENT_CELLS, RECURRENT_TRAINS

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope", "none")  # "none": a recurrent model reads order from its recurrence


@dataclass
class ModelConfig:
    """Every choice of the model; the defaults are the `gpt` preset (nanoGPT's CPU recipe model)."""

    vocab_size: int = 65  # tokens in the vocabulary; train.py sets it from the tokenizer
    block_size: int = 64  # longest context, in tokens (Llama: max_seq_len)
    n_layer: int = 4  # number of blocks
    n_head: int = 4  # query heads per attention layer
    n_kv_head: int | None = None  # key/value heads (GQA); None or 0 means n_head, 1 is multi-query
    n_embd: int = 128  # channels of the residual stream (Llama: dim)
    ffn_hidden: int | None = None  # feed-forward width; None: 4·n_embd for gelu, ⅔·4·n_embd→×64 for swiglu/moe
    dropout: float = 0.0  # dropout on attention weights and sub-layer outputs while training
    bias: bool = False  # biases in Linear layers and LayerNorm (GPT-2 had them)
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama)
    mlp: str = "gelu"  # feed-forward: "gelu" (GPT-2), "swiglu" (Llama) or "moe" (experts of SwiGLU)
    pos: str = "learned"  # positions: "learned" table (GPT-2), "rope" rotations (Llama) or "none" (recurrent)
    rope_theta: float = 10000.0  # RoPE base: the slowest pair turns once per ~2π·theta positions
    rope_scaling: str | None = None  # RoPE context stretch: None, "linear:S" or "ntk:S" (S ≥ 1)
    tie_weights: bool = True  # the output head shares the token embedding matrix
    attn_impl: str = "sdpa"  # "sdpa" (fused, fast) or "manual" (explicit, same numbers)
    attn_scale: str = "fixed"  # attention scale: "fixed" head_dim^-0.5 or "learnable" per head
    n_experts: int = 4  # experts per MoE layer (mlp="moe")
    moe_top_k: int = 2  # experts each token is sent to (mlp="moe")
    moe_aux_weight: float = 0.01  # weight of the MoE load-balancing loss added while training
    layers: str | None = None  # kind of each layer, comma-separated: attn, infini, recurrent; one kind: every layer
    memory_segments: int = 2  # segments (calls) a carried memory or state keeps its gradient through, then detached
    memory_banks: int = 1  # memories per infini layer, written in turn, read by relevance (multi-memory)
    memory_update: str = "delta"  # infini memory write rule: "linear" (M += σ(K)ᵀV) or "delta"
    recurrent_cell: str = "minlstm"  # recurrent layers: "minlstm" / "mingru" (parallel scan) or the seed's "gated"
    recurrent_train: str = "exact"  # "gated" cell: "exact" step by step (BPTT) or "lct" (Lagged Cache Training)
    lct_passes: int = 2  # LCT: cached-context passes per training step, only the last with gradient

    def __post_init__(self):
        def check(ok, message):
            if not ok:
                raise ValueError(message)

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_experts", "moe_top_k",
                     "memory_segments", "lct_passes"):
            check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be a positive integer")
        check(self.n_embd % self.n_head == 0,
              f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: pick n_embd a multiple of n_head")
        check(self.n_kv_head is None or 0 <= self.n_kv_head <= self.n_head and self.n_head % self.kv_heads == 0,
              f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (or be 0/None for n_head)")
        check(self.ffn_hidden is None or self.ffn_hidden >= 1, f"ffn_hidden={self.ffn_hidden} must be positive or None")
        check(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        for name, allowed in (("norm", NORMS), ("mlp", FFN_KINDS), ("pos", POSITIONS),
                              ("attn_impl", ATTN_IMPLS), ("attn_scale", ATTN_SCALES),
                              ("recurrent_cell", RECURRENT_CELLS), ("recurrent_train", RECURRENT_TRAINS)):
            check(getattr(self, name) in allowed, f"unknown {name} {getattr(self, name)!r}: choose from {allowed}")
        check(self.pos != "rope" or self.head_dim % 2 == 0,
              f"RoPE rotates channel pairs: head_dim = n_embd/n_head = {self.head_dim} must be even")
        check(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be positive")
        parse_rope_scaling(self.rope_scaling)  # raises ValueError with the accepted forms
        check(self.rope_scaling is None or self.pos == "rope", f"rope_scaling={self.rope_scaling!r} needs pos='rope': a learned position table cannot stretch")
        check(self.moe_top_k <= self.n_experts,
              f"moe_top_k={self.moe_top_k} exceeds n_experts={self.n_experts}: lower it or add experts")
        check(self.moe_aux_weight >= 0, f"moe_aux_weight={self.moe_aux_weight} must be >= 0")
        kinds = self.layer_kinds
        check(len(kinds) == self.n_layer and set(kinds) <= set(LAYER_KINDS),
              f"layers={self.layers!r}: give one kind for every layer or {self.n_layer} (n_layer) from "
              f"{LAYER_KINDS}, comma-separated, e.g. {','.join(['infini'] + ['attn'] * (self.n_layer - 1))}")
        check(self.memory_segments >= 1 and self.memory_banks >= 1,
              f"memory_segments={self.memory_segments} and memory_banks={self.memory_banks} must be at least 1")
        check(self.memory_update in UPDATE_RULES, f"unknown memory_update {self.memory_update!r}: "
              f"choose from {UPDATE_RULES}")

    @property
    def layer_kinds(self):
        """The token mixer of each layer: ("attn",) * n_layer unless `layers` names them (one name: all)."""
        kinds = ("attn",) if self.layers is None else tuple(k.strip() for k in self.layers.split(","))
        return kinds * self.n_layer if len(kinds) == 1 else kinds

    @property
    def kv_heads(self):
        """n_kv_head resolved: n_head when n_kv_head is None or 0."""
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


PRESETS = {
    # nanoGPT's README CPU recipe model: 804,096 parameters at vocab 65.
    "gpt": ModelConfig(),
    # Llama's parts at the gpt preset's size (0.86 M params), tuned for 177 s on one CPU thread
    # (bench.py presets): at this budget more tokens beat more width — 192 channels (1.78 M) ran at 58%
    # of the tokens/s and scored 1.72 against 1.61 — and a 128-token context beat 256 at equal tokens per
    # step. Two key/value heads instead of 4 ran ~9% more steps but scored no better (1.6073 vs 1.6075,
    # medians of 5 seeds).
    "llama": ModelConfig(block_size=128, n_layer=4, n_head=4, n_embd=128, norm="rmsnorm", mlp="swiglu", pos="rope"),
    # llama with 8 small experts, top-2: each token's feed-forward is half llama's (2 × 96 hidden units vs
    # 384) yet the layer holds 2× its weights. Routing (gather, scatter, 8 small matmuls) eats part of the
    # saving on a CPU: a step is ~15% faster than llama's, a third of that from sharing key/value heads. Top-2
    # was chosen over top-1 while top-1 still renormalised its one weight to exactly 1 (the router then learnt
    # from the aux loss alone); top-1 now gates by the router probability, as Switch does, and has not been
    # measured again at this budget. Two key/value heads (as Mixtral shares them) help the MoE where they did
    # not help llama: 1.610 vs 1.626 with 4 (medians of 5 seeds). An aux weight of 0.03 rather than Switch's
    # 0.01 (medians of 5 seeds: 0.001 1.633, 0.01 1.621, 0.03 1.617, 0.1 1.626, 0.3 1.614, all but 0.001
    # within the seeds' noise) then beat llama on 5 of 5 fresh seeds. Tried at 177 s and worse: 4 experts (of
    # 96 or 192), 16 × 48 top-4, 8 × 192, a shared always-on expert.
    "moe": ModelConfig(block_size=128, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, norm="rmsnorm", mlp="moe",
                       pos="rope", ffn_hidden=96, n_experts=8, moe_top_k=2, moe_aux_weight=0.03),
    # llama with its first layer an Infini-attention layer (memory.py), the seed project's default layout:
    # the layers above it read the memory's summary of earlier segments through the residual stream.
    "infini": ModelConfig(block_size=128, n_layer=4, n_head=4, n_embd=128, norm="rmsnorm", mlp="swiglu",
                          pos="rope", layers="infini,attn,attn,attn"),
    # Seed 003's fixed-memory model: every layer a minLSTM recurrence (no attention, no KV cache, no positions:
    # the recurrence itself knows the order), llama's other parts and size. It trains on one 128-token window
    # per row and step from a fresh state, as llama does. At 177 s (seed 1337) two segments per row with the
    # state carried through them scored 2.023 in 286 steps (batch 16, lr 3e-3; one segment 1.873 in 570) and
    # 1.872 in 570 (batch 8, lr 6e-3; one segment at batch 16 1.801 in 581). Generation carries the state on.
    "recurrent": ModelConfig(block_size=128, n_layer=4, n_head=4, n_embd=128, norm="rmsnorm", mlp="swiglu",
                             pos="none", layers="recurrent", memory_segments=1),
}


class Transformer(nn.Module):
    """A decoder-only language model. forward(idx (B, T), targets (B, T) | None, cache) -> (logits (B, T, V), loss)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        # an MoE model's last training loss split into its terms, detached, under their metrics.jsonl
        # names: {"train_loss": cross-entropy, "aux_loss": load-balancing loss}; the loop logs them apart
        self.loss_terms = None
        position_table = config.block_size if config.pos == "learned" else None  # RoPE needs no table
        self.embed = Embeddings(config.vocab_size, config.n_embd, position_table)
        self.blocks = nn.ModuleList(Block(config, kind) for kind in config.layer_kinds)
        self.norm = make_norm(config.norm, config.n_embd, config.bias)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.head.weight = self.embed.tok.weight  # one (V, C) matrix reads tokens in and writes them out
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight"):  # the 2·n_layer projections that add into the residual stream
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # the layers that carry state between calls, found once: the loop resets them before every batch
        self.stateful_paths = tuple(name for name, m in self.named_modules()
                                    if hasattr(m, "reset_memory") and m is not self)

    @staticmethod
    def _init_weights(module):
        """GPT-2: every matrix N(0, 0.02), biases 0 (norms start at weight 1, bias 0)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        """Parameters, each counted once (a tied matrix is one matrix)."""
        return sum(p.numel() for p in self.parameters())

    def new_kv_cache(self, batch_size, device=None, dtype=None, capacity=None, static=False):
        """An empty KVCache for `batch_size` sequences of up to `capacity` (default block_size) positions.

        RoPE models may ask for more than block_size (e.g. with rope_scaling); learned positions may not.
        static: a cache for a compiled step (KVCache).
        """
        cfg, p = self.config, self.head.weight
        capacity = capacity or cfg.block_size
        if cfg.pos == "learned" and capacity > cfg.block_size:
            raise ValueError(f"capacity {capacity} exceeds block_size {cfg.block_size}: learned positions stop there")
        if static:  # RoPE tables that reach the capacity now: a static cache's positions are looked up unchecked
            for m in self.modules():
                if isinstance(m, RotaryEmbedding):
                    m.reach(capacity)
        return KVCache(cfg.n_layer, batch_size, cfg.kv_heads, cfg.head_dim, capacity,
                       device or p.device, dtype or p.dtype, static)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) int64 -> logits (B, T, V), loss (scalar or None).

        With `cache`, idx holds positions cache.length … cache.length+T−1; their keys and
        values are appended and cache.length advances by T. While training an MoE model,
        loss = cross-entropy + moe_aux_weight · (aux loss averaged over layers), and the
        two terms are kept apart in `loss_terms` for logging. A model with memory reads an
        idx longer than block_size as consecutive segments of block_size, the memory
        carrying each one's summary to the next (and the gradient back, memory_segments deep).
        """
        B, T = idx.shape
        W = self.config.block_size
        if cache is None and T > W and self.has_memory:
            outputs = [self.logits(idx[:, s:s + W]) for s in range(0, T, W)]
            logits, aux_losses = torch.cat([o[0] for o in outputs], dim=1), [a for o in outputs for a in o[1]]
        else:
            logits, aux_losses = self.logits(idx, cache)
        loss = None
        if targets is not None:
            loss = next_token_loss(logits, targets)
            if aux_losses and self.training:
                aux = torch.stack(aux_losses).mean()
                self.loss_terms = {"train_loss": loss.detach(), "aux_loss": aux.detach()}
                loss = loss + self.config.moe_aux_weight * aux
        return logits, loss

    def logits(self, idx, cache=None):
        """idx (B, T) -> (logits (B, T, V), the MoE layers' aux losses): one segment through every block."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        # a static cache's position is a tensor, not checked here: reading it would stop a compiled step for a
        # sync; a write past its capacity fails on the index instead
        if cache is not None and (cache.batch_size != B or not cache.static and start + T > cache.capacity):
            raise ValueError(f"the cache holds {cache.batch_size} sequences × {cache.capacity} positions, "
                             f"{cache.length} used; got {B} × {T} more: start a new cache or crop the context")
        if self.config.pos == "learned" and not torch.is_tensor(start) and start + T > self.config.block_size:
            raise ValueError(f"positions up to {start + T} exceed block_size {self.config.block_size}: "
                             f"crop the input to the last {self.config.block_size} tokens")
        x = self.embed(idx, start)  # (B, T) -> (B, T, C)
        aux_losses = []
        for layer, block in enumerate(self.blocks):
            x, aux = block(x, cache, layer)  # (B, T, C) -> (B, T, C)
            if aux is not None:
                aux_losses.append(aux)
        if cache is not None:
            cache.advance(T)
        return self.head(self.norm(x)), aux_losses  # (B, T, C) @ (C, V) -> (B, T, V)

    def stateful(self):
        """(module path, module) of each layer that carries state between calls (it has reset_memory)."""
        return [(name, self.get_submodule(name)) for name in self.stateful_paths]

    @property
    def has_memory(self):
        return bool(self.stateful())

    def reset_memory(self, rows=None):
        """Forget what every stateful layer carries: all rows, or those where the bool tensor rows (B,) is True."""
        for _, m in self.stateful():
            m.reset_memory(rows)

    def get_memory_state(self):
        """Every stateful layer's carried tensors, detached, keyed by module path: {"blocks.0.attn.M": …}."""
        return {f"{name}.{key}": t for name, m in self.stateful() for key, t in m.memory_state().items()}

    def set_memory_state(self, state):
        """Load what get_memory_state() gave (possibly another process's); {} resets."""
        layers = self.stateful()
        unknown = [k for k in state if not any(k.startswith(name + ".") for name, _ in layers)]
        if unknown:
            raise ValueError(f"memory state key {unknown[0]!r} matches no stateful layer of this model "
                             f"({', '.join(name for name, _ in layers) or 'it has none'}): load a state saved "
                             f"by a model of the same layers")
        for name, m in layers:
            m.load_memory_state({k[len(name) + 1:]: t for k, t in state.items() if k.startswith(name + ".")})

    @torch.no_grad()
    def moe_report(self, idx):
        """Routing on a batch idx (B, T): {"aux_loss": mean over layers, "expert_fraction": [layer][expert]}.

        A fraction is the share of routing slots an expert received (each row sums to 1;
        1/n_experts each is perfect balance). {} when the model has no MoE layer.
        """
        moes = [m for m in self.modules() if isinstance(m, MoE)]
        if not moes:
            return {}
        inputs = {}  # each MoE's input, captured on the way through, then routed again here
        hooks = [m.register_forward_hook(lambda module, args, out: inputs.__setitem__(module, args[0])) for m in moes]
        try:
            self(idx)
        finally:
            for hook in hooks:
                hook.remove()
        aux, fractions = [], []
        for m in moes:
            x = inputs[m]
            _, experts, probs = m.route(x.reshape(-1, x.shape[-1]))  # (B, T, C) -> (N, C)
            counts = expert_counts(experts, len(m.experts))
            aux.append(load_balancing_loss(counts, probs).item())
            fractions.append((counts / counts.sum()).tolist())
        return {"aux_loss": sum(aux) / len(aux), "expert_fraction": fractions}


def _demo():
    torch.manual_seed(0)
    for name, preset in PRESETS.items():
        model = Transformer(preset)
        print(f"{name:9s} {model.num_params():>9,} params  {preset.norm}, {preset.mlp}, {preset.pos} positions, "
              f"{preset.n_layer} layers × {preset.n_embd} channels, context {preset.block_size}")
    model = Transformer(dataclasses.replace(PRESETS["moe"], block_size=32, n_embd=64))
    idx = torch.randint(65, (2, 32))
    logits, loss = model(idx, torch.roll(idx, -1, 1))
    print(f"moe (small): idx {tuple(idx.shape)} -> logits {tuple(logits.shape)}, loss {loss.item():.3f} "
          f"(ln 65 = {math.log(65):.3f})")
    print("routing:", {k: v if isinstance(v, float) else [f"{f:.2f}" for f in v[0]]
                       for k, v in model.moe_report(idx).items()})
    cache = model.new_kv_cache(batch_size=2)
    model(idx[:, :20], cache=cache)
    step, _ = model(idx[:, 20:21], cache=cache)
    diff = (step[:, 0] - logits[:, 20]).abs().max().item()
    print(f"KV cache: position 20 read from the cache vs recomputed, max diff {diff:.1e}")


if __name__ == "__main__":
    _demo()
