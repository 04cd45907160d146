"""Stage 32 — a fixed-memory token mixer: a recurrence whose state does not grow with the text.

Attention keeps every past key and value, so its memory grows with the text.
A recurrent layer keeps one context vector per sequence instead and updates it
token by token, c_t = f(c_{t−1}, x_t): generation costs the same at token 10
and at token 100,000, and the state is a few kilobytes.

New since stage 12: three updaters behind the mixer interface of attention
(forward(x, cache, layer) -> same shape), with the state carried on the layer
(`self.memory`, `reset_memory`, `memory_state`, `load_memory_state`).
- minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): the gates
  read the current input only, so c_t = a_t ⊙ c_{t−1} + b_t is *linear* in c and
  the whole window is one scan (`chunked_scan`: every chunk of the window at
  once, then across chunks), in plain PyTorch, and one step at a time when generating.
- "gated", the seed's updater: c_t = σ(W_f·[x_t, c_{t−1}]) ⊙ c_{t−1}
  + σ(W_i·[x_t, c_{t−1}]) ⊙ tanh(W_c·x_t). Its gates read c_{t−1}, so no scan
  applies. Trained "exact" (step by step, gradients back through the window:
  truncated back-propagation through time) or with Lagged Cache Training.
- Lagged Cache Training (LCT): every position reads a *cached* context for its
  predecessor, the one the previous pass computed, so all T positions update in
  one parallel pass: c^(k)_t = f(c^(k−1)_{t−1}, x_t). Each pass is one
  fixed-point (Jacobi) iteration; position t is exact after t+1 passes, and
  after T passes the whole window equals the exact recurrence. We run
  `lct_passes` passes per training step, the first ones without gradient, and
  the gradient of the last pass stops at the cached context: no gradient
  through time at all. What it costs: with few passes the late positions train
  on contexts the model never produces at generation time (which runs the exact
  recurrence), and nothing teaches a gate to keep information for later
  tokens. bench_recurrent.py measures the speed-up and the loss it buys.
- The global-attractor diagnostic: an updater that overwrites its context can
  forget the input and fall onto one fixed point whatever the tokens;
  `attractor_stats` measures how far apart contexts after different tokens are.
Run the demo: `python recurrent.py`

Shapes: B batch, T time, C channels (n_embd; one recurrence per channel), N sequences compared.
"""
import itertools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

RECURRENT_CELLS = ("minlstm", "mingru", "gated")
RECURRENT_TRAINS = ("exact", "lct")
COLLAPSE_L2, COLLAPSE_COSINE = 1e-3, 0.999  # the seed's symptoms of a global attractor
SCAN_CHUNK = 16  # positions a chunk of the scan runs step by step (16 fastest at T = 128–256; 8 and 32 slower)


def g(k):
    """minGRU's positive activation: k + 0.5 for k ≥ 0, σ(k) below; (…) -> (…). It keeps candidates positive."""
    return torch.where(k >= 0, k + 0.5, torch.sigmoid(k))


def chunked_scan(a, b, h0=None, chunk=SCAN_CHUNK):
    """h_t = a_t ⊙ h_{t−1} + b_t for every t: a, b (B, T, C), h0 (B, C) or None for zeros -> (B, T, C).

    A loop over T positions costs T small steps (and T more backward). We cut the
    window into n chunks of L positions and loop twice, L + n steps instead of T:
    1. inside every chunk at once, the recurrence from zero, L steps: `local`;
    2. across chunks, n steps: the context each chunk starts from, H_k = P_k ⊙ H_{k−1}
       + local_k(last), where P is the product of a over the chunk so far;
    3. every position then adds what its chunk's start contributes: h = local + P ⊙ H.
    Only products and sums of a ∈ (0, 1] and b, no division and no logarithm, so
    b and h0 may have any sign. At T = 128–256, L = 16 runs 3.5× faster (forward
    and backward, one thread) than the log-space scan of Heinsen (2023) it replaced.
    Example (one channel): a = (½, ½), b = (1, 1), h0 = 4 -> h = (3, 2.5).
    """
    B, T, C = b.shape
    if T == 1:  # a generation step: the recurrence itself, a tenth of the general path's time
        return b if h0 is None else a * h0.unsqueeze(1) + b  # (B, C) -> (B, 1, C) broadcasts
    L = min(chunk, T)
    n = -(-T // L)  # ceil(T / L)
    pad = n * L - T  # padded positions at the end (a = 1, b = 0) change no earlier position
    a = F.pad(a, (0, 0, 0, pad), value=1.0).view(B, n, L, C)
    b = F.pad(b, (0, 0, 0, pad)).view(B, n, L, C)
    h, local = b[:, :, 0], [b[:, :, 0]]
    for t in range(1, L):
        h = a[:, :, t] * h + b[:, :, t]  # (B, n, C): position t of every chunk at once
        local.append(h)
    local = torch.stack(local, dim=2)  # L × (B, n, C) -> (B, n, L, C)
    P = torch.cumprod(a, dim=2)  # (B, n, L, C): a's product from the chunk's start to each position
    H, starts = (b.new_zeros(B, C) if h0 is None else h0), []
    for k in range(n):
        starts.append(H)
        H = P[:, k, -1] * H + local[:, k, -1]  # (B, C): the context after chunk k
    h = local + P * torch.stack(starts, dim=1).unsqueeze(2)  # (B, n, L, C) + (B, n, L, C) ⊙ (B, n, 1, C)
    return h.view(B, n * L, C)[:, :T]


def attractor_stats(contexts, warn=True):
    """Mean pairwise L2 distance and cosine similarity of N contexts (N, C) -> dict.

    Contexts after *different* tokens that sit closer than COLLAPSE_L2 and point the
    same way beyond COLLAPSE_COSINE mean the updater forgets its input: a global
    attractor. Both symptoms, not either: minGRU/minLSTM contexts are positive
    (g > 0), so their cosine runs near 1 while they still lie far apart. With
    warn=True a collapse also raises a RuntimeWarning.
    """
    pairs = list(itertools.combinations(range(contexts.shape[0]), 2))
    if not pairs:
        raise ValueError(f"need contexts after at least 2 different tokens, got {contexts.shape[0]}")
    i, j = (torch.tensor(p) for p in zip(*pairs))
    l2 = (contexts[i] - contexts[j]).norm(dim=-1).mean().item()
    cosine = F.cosine_similarity(contexts[i], contexts[j], dim=-1).mean().item()
    collapsed = l2 < COLLAPSE_L2 and cosine > COLLAPSE_COSINE
    if collapsed and warn:
        warnings.warn(f"contexts collapse onto one attractor (mean L2 {l2:.2e}, cosine {cosine:.4f}): "
                      "the updater forgets its input; use a gated updater", RuntimeWarning, stacklevel=2)
    return {"l2": l2, "cosine": cosine, "collapsed": collapsed}


@torch.no_grad()
def model_attractor_stats(model, prefix, tokens, warn=True):
    """attractor_stats of every recurrent layer of a language model: {layer name: stats}.

    prefix (T,) ids read first, then each of the N different `tokens` (N,) after it, one
    sequence a row; a layer's context after the last token is what is compared. The
    carried state is reset before and after, so the check leaves no state behind.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Recurrent)}
    rows = torch.cat([prefix.expand(len(tokens), -1), tokens[:, None]], dim=1)  # (N, T + 1)
    model.reset_memory()
    model(rows.to(next(model.parameters()).device))
    stats = {name: attractor_stats(m.memory["c"].float().cpu(), warn) for name, m in layers.items()}
    model.reset_memory()
    return stats


class Recurrent(nn.Module):
    """A recurrent token mixer: (B, T, C) -> (B, T, C), one context of C channels per sequence.

    cell: "minlstm" | "mingru" (scanned) | "gated" (the seed's updater, trained as
    `train` says: "exact" or "lct" with `lct_passes` passes). The context carried
    between calls (self.memory = {"c": (B, C)}) keeps its graph for at most
    `memory_segments` calls, then is detached.
    """

    def __init__(self, n_embd, cell="minlstm", train="exact", lct_passes=2, memory_segments=2, bias=False):
        super().__init__()
        if cell not in RECURRENT_CELLS or train not in RECURRENT_TRAINS:
            raise ValueError(f"recurrent cell {cell!r} / training {train!r}: choose from {RECURRENT_CELLS} / "
                             f"{RECURRENT_TRAINS}")
        self.cell, self.train_mode, self.lct_passes, self.memory_segments = cell, train, lct_passes, memory_segments
        n_in = {"mingru": 2, "minlstm": 3, "gated": 3}[cell]  # gate and candidate pre-activations from x_t
        self.in_proj = nn.Linear(n_embd, n_in * n_embd, bias=bias)
        # the gated updater's gates also read c_{t−1}: W_f and W_i split as [x-part | c-part], c-part here
        self.state_proj = nn.Linear(n_embd, 2 * n_embd, bias=False) if cell == "gated" else None
        self.out_proj = nn.Linear(n_embd, n_embd, bias=bias)  # writes into the residual stream
        self.memory = None
        self.segments = 0  # calls the carried context's graph spans

    def reset_memory(self, rows=None):
        """Forget the context: of every sequence (rows None) or of the rows where `rows` (B,) bool is True."""
        if rows is None or self.memory is None:
            self.memory, self.segments = None, 0
        else:
            self.memory = {k: v.masked_fill(rows.view(-1, 1), 0.0) for k, v in self.memory.items()}  # (B,) -> (B, 1)

    def memory_state(self):
        return {} if self.memory is None else {k: v.detach().clone() for k, v in self.memory.items()}

    def load_memory_state(self, state):
        self.memory, self.segments = ({k: v.clone() for k, v in state.items()} or None), 0

    def start_context(self, x):
        """The carried context (B, C) for a batch x (B, T, C), zeros when fresh; float32 even under autocast."""
        if self.memory is None:
            return x.new_zeros(x.shape[0], x.shape[2], dtype=torch.float32)
        c = self.memory["c"]
        if c.shape != (x.shape[0], x.shape[2]):
            raise ValueError(f"the carried context holds {tuple(c.shape)} (rows, channels), the input "
                             f"{x.shape[0]} rows of {x.shape[2]}: call reset_memory() before a new batch")
        return c

    def coefficients(self, x):
        """minGRU / minLSTM as h_t = a_t ⊙ h_{t−1} + b_t: a, b, each (B, T, C), from x (B, T, C)."""
        if self.cell == "mingru":
            k_z, k_h = self.in_proj(x).chunk(2, dim=-1)  # (B, T, 2C) -> 2 × (B, T, C)
            return torch.sigmoid(-k_z), torch.sigmoid(k_z) * g(k_h)  # z = σ(k_z): a = 1 − z, b = z ⊙ g(k_h)
        k_f, k_i, k_h = self.in_proj(x).chunk(3, dim=-1)  # (B, T, 3C) -> 3 × (B, T, C)
        # normalised gates f' = f/(f+i), i' = i/(f+i) with f = σ(k_f), i = σ(k_i): f' = σ(log f − log i),
        # and log σ(k) = −softplus(−k), so no gate that rounds to 0 divides 0 by 0
        f = torch.sigmoid(F.softplus(-k_i) - F.softplus(-k_f))
        return f, (1 - f) * g(k_h)

    def gated_update(self, pre, c_prev):
        """The seed's updater on pre-activations pre (…, 3C) from x and previous contexts c_prev (…, C)."""
        gates_x, cand = pre.split([2 * c_prev.shape[-1], c_prev.shape[-1]], dim=-1)  # (…, 3C) -> (…, 2C), (…, C)
        f, i = torch.sigmoid(gates_x + self.state_proj(c_prev)).chunk(2, dim=-1)  # (…, 2C) -> 2 × (…, C)
        return f * c_prev + i * torch.tanh(cand)

    def gated_exact(self, pre, c):
        """The recurrence one step after another: pre (B, T, 3C), c (B, C) -> contexts (B, T, C)."""
        out = []
        for t in range(pre.shape[1]):
            c = self.gated_update(pre[:, t], c)
            out.append(c)
        return torch.stack(out, dim=1)  # T × (B, C) -> (B, T, C)

    def gated_lct(self, pre, c0, passes):
        """`passes` Jacobi passes from a zero cache: pre (B, T, 3C), c0 (B, C) -> contexts (B, T, C).

        Pass k reads the cache of pass k−1, shifted one position (position t reads
        the cached c_{t−1}; position 0 reads c0). Gradient flows through the last pass
        only, and never into the cached contexts.
        """
        cache = pre.new_zeros(pre.shape[0], pre.shape[1], c0.shape[-1])  # (B, T, C)
        for k in range(passes):
            prev = torch.cat([c0.unsqueeze(1), cache[:, :-1]], dim=1).detach()  # (B, 1 + T−1, C): predecessors
            with torch.set_grad_enabled(torch.is_grad_enabled() and k == passes - 1):
                cache = self.gated_update(pre, prev)  # every position at once: (B, T, 3C) -> (B, T, C)
        return cache

    def contexts(self, x, c0):
        """The context after every position: x (B, T, C), c0 (B, C) -> (B, T, C)."""
        if self.cell != "gated":
            a, b = self.coefficients(x)
            return chunked_scan(a.float(), b.float(), c0)  # bfloat16 would round the products
        pre = self.in_proj(x)  # (B, T, C) -> (B, T, 3C), every position's x-part at once
        if self.training and self.train_mode == "lct":
            return self.gated_lct(pre, c0, self.lct_passes)
        return self.gated_exact(pre, c0)  # evaluation and generation always run the exact recurrence

    def forward(self, x, cache=None, layer=0):
        """x (B, T, C) -> (B, T, C), starting from the carried context; the KV cache is not used."""
        c = self.contexts(x, self.start_context(x))  # (B, T, C)
        end = c[:, -1]
        self.segments += 1
        if not torch.is_grad_enabled() or self.segments >= self.memory_segments:
            end, self.segments = end.detach(), 0  # the gradient horizon: at most memory_segments calls back
        self.memory = {"c": end}
        return self.out_proj(c.to(x.dtype))


def _demo():
    torch.manual_seed(0)
    C, T = 16, 12
    x = torch.randn(2, T, C)
    for cell in RECURRENT_CELLS:
        layer = Recurrent(C, cell).eval()
        with torch.no_grad():
            y = layer(x)
            layer.reset_memory()
            steps = torch.cat([layer(x[:, t:t + 1]) for t in range(T)], dim=1)  # T × (B, 1, C) -> (B, T, C)
        state_bytes = sum(v.numel() * v.element_size() for v in layer.memory.values())
        print(f"{cell:8s} {tuple(x.shape)} -> {tuple(y.shape)}; whole window vs one token at a time: max diff "
              f"{(y - steps).abs().max().item():.1e}; carried state {state_bytes} bytes at any length")
    gated = Recurrent(C, "gated", "lct").train()
    with torch.no_grad():
        exact = gated.gated_exact(gated.in_proj(x), torch.zeros(2, C))
        for passes in (1, 4, T):
            lct = gated.gated_lct(gated.in_proj(x), torch.zeros(2, C), passes)
            print(f"LCT, {passes:2d} passes: positions exact {(lct - exact).abs().amax(dim=(0, 2)).lt(1e-6).sum()}"
                  f"/{T}, max diff to the exact recurrence {(lct - exact).abs().max().item():.1e}")
    tokens = torch.randn(8, 1, C)  # 8 different tokens after one shared prefix
    prefix = torch.randn(1, 20, C).expand(8, -1, -1)
    layer = Recurrent(C, "minlstm").eval()
    with torch.no_grad():
        ends = layer.contexts(torch.cat([prefix, tokens], dim=1), torch.zeros(8, C))[:, -1]  # (N, C)
    print("attractor check on minLSTM contexts after 8 different tokens:", attractor_stats(ends))


if __name__ == "__main__":
    _demo()
