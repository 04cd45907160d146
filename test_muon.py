"""Muon: the Newton–Schulz iteration against an SVD, the parameter split, one step by hand, exact resume."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import train
from checkpoint import load_training_state
from muon import NS_BAND, NS_SMALLEST, UPDATE_RMS, Muon, newton_schulz_polynomial, orthogonalize, param_groups
from transformer import PRESETS, ModelConfig, Transformer

ROOT = Path(__file__).resolve().parent


def with_singular_values(s, m, n, seed):
    """A random (m, n) matrix U diag(s) Vᵀ and its U, V: the SVD is known by construction."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))  # (m, k) orthonormal columns
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))  # (n, k)
    return u @ torch.diag(s) @ v.T, u, v  # (m, k) (k, k) (k, n) -> (m, n)


@pytest.mark.parametrize("m,n", [(24, 40), (40, 24), (32, 32)])
def test_newton_schulz_is_u_vt_with_singular_values_in_its_band(m, n):
    k = min(m, n)
    s = torch.logspace(0, -1.3, k, dtype=torch.float64)  # largest/smallest 20: the smallest ≥ NS_SMALLEST·‖s‖
    assert s[-1] / s.norm() >= NS_SMALLEST
    g, u, v = with_singular_values(s, m, n, seed=m * n)
    out = orthogonalize(g.float()).double()

    # The iteration keeps U and V and maps each singular value by the scalar quintic, applied 5 times.
    expected = u @ torch.diag(newton_schulz_polynomial(s / s.norm())) @ v.T
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)
    core = u.T @ out @ v  # (k, m) (m, n) (n, k) -> (k, k): diagonal when out = U S' Vᵀ
    assert torch.allclose(core, torch.diag(core.diagonal()), atol=2e-5)
    assert NS_BAND[0] <= core.diagonal().min() and core.diagonal().max() <= NS_BAND[1]
    # So it is the SVD's orthogonalisation U Vᵀ up to that band, and its singular values say the same.
    svdvals = torch.linalg.svdvals(out)
    assert NS_BAND[0] <= svdvals.min() and svdvals.max() <= NS_BAND[1]
    assert (out - u @ v.T).abs().max() < max(1 - NS_BAND[0], NS_BAND[1] - 1)


def test_orthogonalize_takes_a_batch_of_matrices_each_on_its_own():
    g = torch.randn(3, 8, 12, generator=torch.Generator().manual_seed(0))
    batched = orthogonalize(g)
    for i in range(3):
        torch.testing.assert_close(batched[i], orthogonalize(g[i]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset", ["gpt", "llama", "moe"])
def test_muon_takes_the_block_matrices_and_adamw_the_rest(preset):
    cfg = ModelConfig(**{**vars(PRESETS[preset]), "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 50})
    model = Transformer(cfg)
    muon, decay, plain = param_groups(model, 0.1, muon=True)
    assert muon["muon"] and "muon" not in decay and "muon" not in plain
    # By module rather than by name: every Linear weight inside model.blocks is Muon's, nothing else is.
    block_linear = {id(mod.weight) for mod in model.blocks.modules() if isinstance(mod, nn.Linear)}
    assert {id(p) for p in muon["params"]} == block_linear
    embeddings = {id(mod.weight) for mod in model.modules() if isinstance(mod, nn.Embedding)}
    assert embeddings | {id(model.head.weight)} == {id(p) for p in decay["params"]}
    assert all(p.dim() == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    everything = [id(p) for g in (muon, decay, plain) for p in g["params"]]
    assert sorted(everything) == sorted(id(p) for p in model.parameters())  # each once, tied head included
    adamw_groups = param_groups(model, 0.1)  # without Muon: the two groups AdamW always had
    assert [len(g["params"]) for g in adamw_groups] == [len(muon["params"]) + len(decay["params"]),
                                                       len(plain["params"])]


def test_one_muon_step_by_hand_and_the_adamw_half_is_torchs_adamw():
    torch.manual_seed(0)
    matrix, vector = nn.Parameter(torch.randn(6, 10)), nn.Parameter(torch.randn(10))
    twin = nn.Parameter(vector.detach().clone())
    lr, wd, mu = 0.01, 0.1, 0.95
    opt = Muon([{"params": [matrix], "muon": True, "weight_decay": wd}, {"params": [vector], "weight_decay": wd}],
               lr=lr, betas=(0.9, 0.99), momentum=mu)
    reference = torch.optim.AdamW([twin], lr=lr, betas=(0.9, 0.99), weight_decay=wd)
    before = matrix.detach().clone()
    grads = [torch.randn(6, 10) for _ in range(2)]
    for step, grad in enumerate(grads):
        matrix.grad = grad.clone()
        vector.grad = twin.grad = torch.randn(10)
        opt.step()
        reference.step()
        assert torch.equal(vector, twin)  # the same update, number for number
    # By hand, with the SVD standing in for Newton–Schulz: M1 = G1, M2 = μ·G1 + G2; Nesterov uses G + μ·M.
    expected = before
    momentum = torch.zeros(6, 10)
    for grad in grads:
        momentum = mu * momentum + grad
        u, s, vh = torch.linalg.svd((grad + mu * momentum).double(), full_matrices=False)
        update = u @ torch.diag(newton_schulz_polynomial(s / s.norm())) @ vh  # (6, 6) (6, 6) (6, 10)
        expected = expected * (1 - lr * wd) - lr * UPDATE_RMS * math.sqrt(10) * update.float()
    torch.testing.assert_close(matrix.detach(), expected, atol=1e-5, rtol=0)


TEXT = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine. " * 60


def tiny_run(out, *extra):
    return train.run(["--data", "t.txt", "--out", out, "--optimizer", "muon", "--block-size", "16", "--batch-size",
                      "4", "--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--dropout", "0.1", "--eval-iters",
                      "2", "--log-interval", "1", "--warmup-steps", "2", *extra])


def test_muon_run_resumed_after_3_steps_equals_6_in_one_go(tmp_path, monkeypatch):
    # With 2 warm-up steps the first 3 learning rates do not depend on --steps (3 or 6): warm-up, then the peak.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    tiny_run("straight", "--steps", "6", "--eval-interval", "3")
    tiny_run("resumed", "--steps", "3", "--eval-interval", "3")
    train.run(["--resume", "resumed", "--steps", "6"])
    straight, resumed = load_training_state(tmp_path / "straight"), load_training_state(tmp_path / "resumed")
    assert {**resumed["loop"], "elapsed": 0} == {**straight["loop"], "elapsed": 0} and straight["loop"]["step"] == 6
    for name, weight in straight["model"].items():
        assert torch.equal(weight, resumed["model"][name]), name
    assert any("momentum_buffer" in slots for slots in resumed["optimizer"]["state"].values())
    for index, slots in straight["optimizer"]["state"].items():
        for key, value in slots.items():
            assert torch.equal(value, resumed["optimizer"]["state"][index][key]), (index, key)


def test_an_unknown_optimizer_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--optimizer", "sgd"], cwd=tmp_path,
                            capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == "error: --optimizer 'sgd' is not one of adamw, muon"
