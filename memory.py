"""Stage 31 — memory beyond the window: Infini-attention's compressive memory.

Attention reads only its window: a token 10,000 positions back is gone. An
Infini-attention layer (Munkhdalai et al. 2024, "Leave No Context Behind")
reads a long text segment by segment and keeps, per sequence and head, a
fixed-size memory of everything before the current segment:

    σ(x)      = ELU(x) + 1                              a positive feature map
    read      A_mem = σ(Q) M / (σ(Q) z)                  linear attention over the past
    write     M += σ(K)ᵀ V                               "linear" rule, or
              M += σ(K)ᵀ (V − σ(K) M / (σ(K) z))          "delta" rule: store only what M does not already know
              z += Σ_t σ(K_t)                            the normaliser: how much each key feature was written
    mix       A = g ⊙ A_mem + (1 − g) ⊙ A_local,  g = sigmoid(gate), one learned gate per head

A segment reads, and the delta rule compares against, M and z as they were at
the segment's start; the segment's writes then land all at once, so a token
never reads itself or its neighbours through the memory (those it sees locally).
A_local is the usual causal softmax attention inside the segment (with RoPE);
the memory path has no positions (NoPE). M is D×D and z is D per head whatever
the number of tokens read, so the state does not grow. Dividing by σ(Q)z makes
a read an average of the values written, not a sum that grows with the text.

Memory banks (`banks` > 1, multi-memory): segment s writes bank s mod N, and a
read mixes the N banks by their relevance to the query, σ(q)·z_b/Σz_b (how well
the query matches the keys that bank holds). The seed project also had a
"hierarchical" memory; it folded that layer into multi-memory as equivalent, and
so does this file: banks written in turn already hold coarser, older summaries.

The carried state: `self.memory` = {"M", "z", "bank"} per row of the batch
(never shared between rows), read at the start of a forward call (a segment)
and stored back at its end, in training and in evaluation alike. Gradient flows
through the memory between the calls of a span of `segments` consecutive calls
(truncated back-propagation through time); a new span starts from a detached
state. train.py gives each step a window of `segments` segments (the
Transformer reads a long input segment by segment), so each step is one span. With a KV cache (generation one
token at a time) every call of one segment reads the memory as it was at the
segment's start, exactly as one call over the whole segment would.

Training feeds a memory something to carry (`document_batches`): row b of
every batch continues its own document where the previous batch left it, and
forgets at the document's end; documents are the texts between blank lines.

New since stage 12: a layer with state carried between forward calls.
Run the demo: `python memory.py`

Shapes: B batch, T positions of the segment, C channels, H query heads,
G key/value heads (the memory is kept per key/value head), D head dim, N banks.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import MultiHeadAttention

UPDATE_RULES = ("linear", "delta")
MEMORY_EPS = 1e-6  # keeps an empty memory's read 0/ε = 0 instead of 0/0


def feature_map(x):
    """σ(x) = ELU(x) + 1: positive, so σ(q)·σ(k) is a valid (unnormalised) attention weight."""
    return F.elu(x) + 1.0


def memory_read(sq, M, z):
    """σ(Q) M / (σ(Q) z): sq (…, T, D), M (…, D, D), z (…, D) -> (…, T, D)."""
    numerator = sq @ M  # (…, T, D) @ (…, D, D) -> (…, T, D)
    denominator = sq @ z.unsqueeze(-1)  # (…, T, D) @ (…, D, 1) -> (…, T, 1)
    return numerator / (denominator + MEMORY_EPS)


def memory_update(sk, v, M, z, rule):
    """(ΔM, Δz) of writing keys σ(K) sk (…, T, D) and values v (…, T, D) into (M, z)."""
    if rule == "delta":
        v = v - memory_read(sk, M, z)  # only what the memory would not already give back
    return sk.transpose(-2, -1) @ v, sk.sum(dim=-2)  # (…, D, T) @ (…, T, D) -> (…, D, D); (…, D)


def banked_read(sq, M, z):
    """Read N banks and mix them by relevance: sq (B, H, T, D), M (B, H, N, D, D), z (B, H, N, D) -> (B, H, T, D)."""
    reads = memory_read(sq.unsqueeze(2), M, z)  # (B, H, 1, T, D) -> (B, H, N, T, D)
    if M.shape[2] == 1:
        return reads[:, :, 0]
    share = z / (z.sum(dim=-1, keepdim=True) + MEMORY_EPS)  # (B, H, N, D): each bank's key profile
    relevance = sq.unsqueeze(2) @ share.unsqueeze(-1)  # (B, H, 1, T, D) @ (B, H, N, D, 1) -> (B, H, N, T, 1)
    weights = relevance / (relevance.sum(dim=2, keepdim=True) + MEMORY_EPS)  # an empty bank gets weight 0
    return (weights * reads).sum(dim=2)  # (B, H, N, T, D) -> (B, H, T, D)


class InfiniAttention(MultiHeadAttention):
    """Causal attention over the segment plus a compressive memory of earlier segments: (B, T, C) -> (B, T, C).

    The same projections as MultiHeadAttention (and so the same parameter names),
    plus `gate` (H,), one mixing logit per head, starting at 0 (half memory, half local).
    forward(x, cache, layer) reads self.memory and stores the updated memory back.
    """

    def __init__(self, n_embd, n_head, block_size, n_kv_head=None, bias=False, dropout=0.0, attn_impl="sdpa",
                 attn_scale="fixed", rotary=None, banks=1, update="delta", segments=2):
        super().__init__(n_embd, n_head, block_size, n_kv_head, bias, dropout, attn_impl, attn_scale, rotary)
        if update not in UPDATE_RULES or banks < 1 or segments < 1:
            raise ValueError(f"memory update {update!r}, banks {banks}, segments {segments}: "
                             f"choose an update from {UPDATE_RULES} and at least 1 bank and 1 segment")
        self.banks, self.update, self.segments = banks, update, segments
        self.gate = nn.Parameter(torch.zeros(n_head))
        self.memory = None  # None: fresh, read as zeros sized by the batch
        self.links = 0  # segments whose computation the carried memory's graph holds
        self.segment_start = None  # the memory at the start of the segment a KV cache is filling

    def empty_memory(self, B, device):
        G, N, D = self.n_kv_head, self.banks, self.head_dim
        return {"M": torch.zeros(B, G, N, D, D, device=device), "z": torch.zeros(B, G, N, D, device=device),
                "bank": torch.zeros(B, dtype=torch.long, device=device)}

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        local, (q, k, v) = self.attend(x, cache, layer)  # (B, H, T, D); q (B, H, T, D), k, v (B, G, T, D)
        state = self.memory if self.memory is not None else self.empty_memory(B, x.device)
        if state["M"].shape[0] != B:
            raise ValueError(f"the memory holds {state['M'].shape[0]} sequences, the input {B}: "
                             f"reset_memory() before a new batch")
        if cache is None or cache.length == 0:  # a new segment: it reads the memory as it is now
            if self.links >= self.segments:  # truncated back-propagation: older segments stop here
                state, self.links = {name: t.detach() for name, t in state.items()}, 0
            self.segment_start = state
            self.links += 1
        base = self.segment_start  # a cached segment's later tokens read what its first token read
        sq, sk, v = feature_map(q.float()), feature_map(k.float()), v.float()
        groups = self.n_head // self.n_kv_head
        M_read = base["M"].repeat_interleave(groups, dim=1)  # (B, G, N, D, D) -> (B, H, N, D, D)
        A_mem = banked_read(sq, M_read, base["z"].repeat_interleave(groups, dim=1))  # (B, H, T, D)
        written = F.one_hot(base["bank"], self.banks).to(sk.dtype).view(B, 1, self.banks, 1)  # (B, 1, N, 1)
        M_bank = (base["M"] * written.unsqueeze(-1)).sum(dim=2)  # (B, G, N, D, D) -> (B, G, D, D)
        z_bank = (base["z"] * written).sum(dim=2)  # (B, G, N, D) -> (B, G, D)
        dM, dz = memory_update(sk, v, M_bank, z_bank, self.update)  # (B, G, D, D), (B, G, D)
        self.memory = {"M": state["M"] + written.unsqueeze(-1) * dM.unsqueeze(2),  # only the bank written
                       "z": state["z"] + written * dz.unsqueeze(2),
                       "bank": (base["bank"] + 1) % self.banks}
        g = torch.sigmoid(self.gate).view(1, -1, 1, 1)  # (H,) -> (1, H, 1, 1)
        y = g * A_mem.to(local.dtype) + (1 - g) * local  # (B, H, T, D)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, H, T, D) -> (B, T, C)

    def reset_memory(self, rows=None):
        """Forget everything (rows None) or only the rows where the bool tensor rows (B,) is True."""
        if rows is None or self.memory is None:
            self.memory, self.links = None, 0
            return
        keep = ~rows.to(self.memory["M"].device)  # (B,)
        self.memory = {name: t * keep.view(-1, *[1] * (t.dim() - 1)).to(t.dtype) for name, t in self.memory.items()}

    def memory_state(self):
        """The carried state, detached: {"M": (B, G, N, D, D), "z": (B, G, N, D), "bank": (B,)}, or {}."""
        return {} if self.memory is None else {name: t.detach() for name, t in self.memory.items()}

    def load_memory_state(self, state):
        """Continue from a state that memory_state() gave (of a model with this layer's shape)."""
        if not state:
            self.reset_memory()
            return
        expected = self.empty_memory(1, "cpu")
        for name, t in expected.items():
            if name not in state or state[name].shape[1:] != t.shape[1:]:
                found = tuple(state[name].shape) if name in state else "nothing"
                raise ValueError(f"memory {name!r}: expected (batch, {', '.join(map(str, t.shape[1:]))}), found "
                                 f"{found}: load a memory saved by a model of this configuration")
        device = self.qkv.weight.device
        self.memory = {name: state[name].to(device) for name in expected}
        self.links = 0


def document_starts(ids, tok):
    """Token indices where a document starts: 0 and every token after a blank line ("\n\n").

    ids: 1-D token ids (a numpy memmap is read in one pass) of the tokenizer `tok` (any with decode and
    vocab_size). Example with characters: "ab\n\ncd" -> [0, 4].
    """
    ids = np.asarray(ids)
    token_texts = [tok.decode([i]) for i in range(tok.vocab_size)]
    ends_line = np.array([t.endswith("\n") for t in token_texts])
    starts_line = np.array([t.startswith("\n") for t in token_texts])
    holds_blank = np.array(["\n\n" in t for t in token_texts])
    inside = np.nonzero(holds_blank[ids[:-1]])[0] + 1  # a token holding "\n\n": the next one starts anew
    across = np.nonzero(ends_line[ids[:-2]] & starts_line[ids[1:-1]])[0] + 2  # "…\n" then "\n…"
    return np.unique(np.concatenate([[0], inside, across]))


def document_batches(ids, starts, length, batch_size, seed=0, rank=0, world=1, start=0):
    """Consecutive pieces of documents, one document per batch row: yields (x, y, new_rows) forever.

    x, y (B, length) as get_batch gives them; new_rows (B,) bool is True where the row starts a document (its
    memory must forget). Documents shorter than length+1 tokens are skipped, and a document's last partial
    piece too. The documents are shuffled by `seed`, dealt to ranks, then to rows; a row cycles through its own.
    Batch i depends on i alone, so `start` skips to batch i (resume) with nothing else to restore.
    """
    ends = np.append(starts[1:], len(ids))
    docs = [(s, e) for s, e in zip(starts.tolist(), ends.tolist()) if e - s >= length + 1]
    mine = [docs[d] for d in np.random.default_rng(seed).permutation(len(docs))[rank::world]]
    if len(mine) < batch_size:
        raise ValueError(f"{len(mine)} documents of at least {length + 1} tokens per process, fewer than the "
                         f"{batch_size} batch rows: lower --batch-size or --block-size, or use --sampler random")
    rows = []  # per row: (offset of each piece, does it start a document)
    for r in range(batch_size):
        pieces = [(s + j * length, j == 0) for s, e in mine[r::batch_size] for j in range((e - s - 1) // length)]
        rows.append(np.array(pieces, dtype=np.int64))  # (P_r, 2)
    offsets = np.arange(length + 1)
    for i in range(start, 2**62):
        picked = np.stack([row[i % len(row)] for row in rows])  # (B, 2)
        window = torch.from_numpy(np.asarray(ids)[picked[:, :1] + offsets].astype(np.int64))  # (B, length + 1)
        yield window[:, :-1], window[:, 1:], torch.from_numpy(picked[:, 1].astype(bool))


def _demo():
    torch.manual_seed(0)
    layer = InfiniAttention(n_embd=32, n_head=4, block_size=16)
    text = torch.randn(1, 64, 32)  # four segments of 16 positions
    outputs = [layer(text[:, s:s + 16]) for s in range(0, 64, 16)]
    state = layer.memory_state()
    size = sum(t.numel() * t.element_size() for t in state.values())
    print(f"4 segments of 16 positions: outputs {tuple(outputs[0].shape)} each; memory "
          f"{ {name: tuple(t.shape) for name, t in state.items()} } = {size:,} bytes, whatever the text's length")
    again = layer(text[:, 48:64])
    layer.reset_memory()
    fresh = layer(text[:, 48:64])
    print(f"the same segment read with the memory carried vs reset: outputs differ by "
          f"{(again - fresh).abs().max().item():.3f}")


if __name__ == "__main__":
    _demo()
