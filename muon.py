"""Stage 14b — Muon: momentum, orthogonalised, for the weight matrices.

AdamW sizes each number of an update on its own. Muon treats a weight matrix
as a matrix: it takes the (Nesterov) momentum M of the gradient and replaces it
by the nearest orthogonal matrix, U Vᵀ where M = U S Vᵀ is its singular value
decomposition. Every direction of the update then moves by the same amount, so
the few directions that dominate a gradient no longer drown the others. An SVD
at every step is slow; five steps of a quintic Newton–Schulz iteration, only
matrix products, give U S' Vᵀ with S' near 1 (not exactly 1: see
`orthogonalize`), which trains as well.

Muon is for the 2-D weight matrices inside the blocks (attention and MLP
projections, router, experts). The embedding, the output head, norms, biases
and scales keep AdamW: an embedding row is a lookup, not a map between spaces,
and a vector has no directions to even out. Keller Jordan's modded-nanogpt
speedrun made Muon known (2024); Moonshot AI's "Muon is scalable" (2025) sized
its update by the matrix's shape to a fixed RMS per number, as AdamW's updates
roughly have, which is what lets this module take the same learning rate and
weight decay as AdamW (`UPDATE_RMS`).

New since stage 14: an optimizer of our own, a `torch.optim.Optimizer` whose
state saves and resumes like AdamW's. Use it: `python train.py --optimizer muon`.
Run the demo: `python muon.py` (singular values before and after the iteration,
and which parameters of the gpt preset each half of the optimizer takes).
"""
import math

import torch
from torch.optim.adam import adam

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # a, b, c of a·x + b·x³ + c·x⁵: the slope at 0 as steep as converges
NS_STEPS = 5
NS_BAND = (0.68, 1.21)  # where 5 steps leave each singular value ≥ NS_SMALLEST × the Frobenius norm
NS_SMALLEST = 0.004
# The update's size per number, as a multiple of lr. Moonshot's 0.2 matches AdamW's, so that one lr and
# weight decay serve both halves; here 0.6 trained better (llama, 250 steps at lr 3e-3, held-out loss:
# AdamW 1.947; Muon at 0.2 behind AdamW all along, at 0.6 1.924, at 2.0 1.982; one seed each).
UPDATE_RMS = 0.6
MOMENTUM = 0.95

# Shapes: M rows (out features), N columns (in features); a leading E batches matrices (experts).


def newton_schulz_polynomial(s, steps=NS_STEPS):
    """What `orthogonalize` does to one singular value s in [0, 1]: the quintic, applied `steps` times."""
    a, b, c = NS_COEFFS
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def orthogonalize(g, steps=NS_STEPS, eps=1e-7):
    """About U Vᵀ for g = U S Vᵀ: (..., M, N) -> (..., M, N), each matrix of the batch on its own.

    Scaled by its Frobenius norm (≥ the largest singular value), every singular
    value starts in [0, 1]; each step maps X to a·X + b·(X Xᵀ)X + c·(X Xᵀ)²X,
    which applies a·s + b·s³ + c·s⁵ to every singular value s and keeps U and V.
    The coefficients trade exactness for speed: a small s grows 3.4× a step, and
    the values end in NS_BAND, around 1, rather than at 1. Example: s = 0.1 after
    5 steps becomes newton_schulz_polynomial(0.1) ≈ 0.71; one below NS_SMALLEST
    stays smaller than NS_BAND (0.001 becomes 0.47), which the update can afford.
    """
    x = g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # (M, N) -> (N, M): the Gram matrix X Xᵀ is then the smaller side's
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = x @ x.mT  # (M, N) @ (N, M) -> (M, M)
        x = a * x + (b * gram + c * gram @ gram) @ x  # (M, M) @ (M, N) -> (M, N)
    return (x.mT if tall else x).to(g.dtype)


def is_muon_param(name, p):
    """A matrix inside the blocks: `blocks.0.attn.qkv.weight` is one, `embed.tok.weight` and `norm.weight` are not."""
    return p.dim() >= 2 and "blocks" in name.split(".")


def param_groups(model, weight_decay, muon=False):
    """The optimizer's parameter groups: weight decay on matrices (dim ≥ 2), not on norms, biases or scales.

    [decayed matrices, the rest]; with muon=True the matrices inside the blocks
    come first in a group of their own, Muon's. Shared (tied) tensors appear once.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if p.dim() >= 2 and not (muon and is_muon_param(n, p))],
               "weight_decay": weight_decay},
              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    if muon:
        groups.insert(0, {"params": [p for n, p in named if is_muon_param(n, p)], "weight_decay": weight_decay,
                          "muon": True})
    return groups


class Muon(torch.optim.Optimizer):
    """Muon for the groups marked {"muon": True}, AdamW (torch's own fused kernel) for the others.

    One optimizer rather than two, so that the training loop sets one learning rate
    per step, the gradient scaler unscales once, and one state_dict saves everything.
    Decay is decoupled in both halves: a weight shrinks by lr · weight_decay a step.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, momentum=MOMENTUM,
                 nesterov=True, ns_steps=NS_STEPS, update_rms=UPDATE_RMS, fused=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, update_rms=update_rms, muon=False)
        super().__init__(params, defaults)
        self.fused = fused

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon_step if group["muon"] else self._adamw_step)(group)
        return loss

    def _muon_step(self, group):
        lr, mu = group["lr"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(p.grad)  # M ← μ·M + G
            direction = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf  # Nesterov: look one step ahead
            update = orthogonalize(direction, group["ns_steps"])
            # U Vᵀ of an (M, N) matrix has RMS 1/√max(M, N): this makes it update_rms whatever the shape.
            scale = group["update_rms"] * math.sqrt(max(p.size(-2), p.size(-1)))
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-lr * scale)

    def _adamw_step(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if not self.state[p]:  # the slots torch.optim.AdamW keeps, under the same names
                self.state[p].update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                                     exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        slots = [[self.state[p][k] for p in params] for k in ("exp_avg", "exp_avg_sq", "step")]
        beta1, beta2 = group["betas"]
        adam(params, [p.grad for p in params], slots[0], slots[1], [], slots[2], fused=self.fused,
             decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
             weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def _demo():
    from transformer import PRESETS, Transformer

    torch.manual_seed(0)
    g = torch.randn(6, 4) @ torch.diag(torch.tensor([10.0, 1.0, 0.1, 0.01]))  # (6, 4), badly conditioned
    print("singular values before:", [round(s, 3) for s in torch.linalg.svdvals(g).tolist()])
    print("after Newton–Schulz:   ", [round(s, 3) for s in torch.linalg.svdvals(orthogonalize(g)).tolist()])
    model = Transformer(PRESETS["gpt"])
    muon_group, adamw_decay, adamw_plain = param_groups(model, 0.1, muon=True)
    names = {id(p): n for n, p in model.named_parameters()}
    for label, group in (("Muon", muon_group), ("AdamW, decayed", adamw_decay), ("AdamW, no decay", adamw_plain)):
        shown = [names[id(p)] for p in group["params"]]
        print(f"{label:16s} {len(shown):3d} tensors, e.g. {', '.join(shown[:3])}")


if __name__ == "__main__":
    _demo()
