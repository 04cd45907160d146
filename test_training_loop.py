import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import training_loop
from bigram_lm import BigramLM
from training_loop import TrainConfig, TrainingDiverged, estimate_loss, lr_at, make_optimizer, step_progress, train_loop
from transformer import PRESETS, Transformer


def cosine_by_hand(step, lr, min_lr, warmup, total):
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    ratio = (step - warmup) / (total - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr)


@pytest.mark.parametrize("step", [0, 50, 99, 100, 101, 550, 1000, 1999, 2000])
def test_warmup_and_cosine_schedule_match_the_formula(step):
    cfg = TrainConfig(steps=2000, lr=1e-3, min_lr=1e-4, warmup_steps=100)
    expected = cosine_by_hand(step, 1e-3, 1e-4, 100, 2000)
    assert lr_at(step, step_progress(step, cfg), cfg) == pytest.approx(expected, rel=1e-12)


def test_schedule_endpoints_and_time_mode():
    cfg = TrainConfig(steps=10, lr=1e-3, min_lr=1e-4, warmup_steps=0)
    assert lr_at(0, 0.0, cfg) == pytest.approx(1e-3)
    assert lr_at(5, 0.5, cfg) == pytest.approx(5.5e-4)
    assert lr_at(9, 1.0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, 3.0, cfg) == pytest.approx(1e-4)  # past the time budget: stays at the floor


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [(4, 4)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # bias, norm weight, norm bias


def test_config_validation():
    with pytest.raises(ValueError, match="--min-lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="--grad-accum"):
        TrainConfig(grad_accum=0)


def fixed_batches(n, batch, T=8, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(V, (n, batch, T + 1), generator=g)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def test_grad_accumulation_equals_one_large_batch():
    small = fixed_batches(2, 4)
    big = [(torch.cat([small[0][0], small[1][0]]), torch.cat([small[0][1], small[1][1]]))]
    results = []
    for accum, batches in ((2, small), (1, big)):
        torch.manual_seed(0)
        model = BigramLM(11)
        cfg = TrainConfig(steps=1, batch_size=8 // accum, grad_accum=accum, grad_clip=0, warmup_steps=0,
                          eval_interval=1000)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the gradient itself
        it = iter(batches)
        train_loop(model, opt, cfg, lambda: next(it), big)
        results.append(model.table.weight.detach().clone())
    assert (results[0] - results[1]).abs().max() < 1e-6


def test_short_training_lowers_val_loss_and_logs(tmp_path):
    torch.manual_seed(0)
    pattern = torch.tensor([0, 1, 2, 3, 4] * 4)
    x, y = pattern[:-1].repeat(16, 1), pattern[1:].repeat(16, 1)
    model = BigramLM(5)
    cfg = TrainConfig(steps=60, lr=5e-2, min_lr=1e-3, warmup_steps=5, eval_interval=30, log_interval=10)
    before = estimate_loss(model, [(x, y)])
    train_loop(model, make_optimizer(model, cfg), cfg, lambda: (x, y), [(x, y)], run_dir=tmp_path)
    assert estimate_loss(model, [(x, y)]) < before - 1.0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == [10, 20, 30, 40, 50, 60]
    assert [r["step"] for r in rows if "val_loss" in r] == [30, 60]
    assert all({"lr", "tokens_per_sec"} <= r.keys() for r in rows if "train_loss" in r)


def test_nan_loss_stops_training_with_the_step():
    model = BigramLM(5)
    saves = []
    cfg = TrainConfig(steps=10, eval_interval=3, warmup_steps=0)
    calls = {"n": 0}

    def next_batch():
        calls["n"] += 1
        if calls["n"] == 5:
            with torch.no_grad():
                model.table.weight[0, 0] = float("nan")
        return torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)

    with pytest.raises(TrainingDiverged, match="at step 4"):
        train_loop(model, make_optimizer(model, cfg), cfg, next_batch, [next_batch()],
                   save=lambda state, best, last: saves.append(state.step))
    assert saves == [3]  # the checkpoint of step 3 is the last one, nothing written after the NaN


def test_bfloat16_autocast_trains_on_cpu():
    torch.manual_seed(0)
    x = torch.tensor([[0, 1, 2, 3]] * 4)
    y = torch.tensor([[1, 2, 3, 0]] * 4)

    class Tiny(torch.nn.Module):  # an embedding then a Linear, so autocast really changes dtypes
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(4, 16), torch.nn.Linear(16, 4)

        def forward(self, idx, targets=None):
            logits = self.head(self.emb(idx))
            assert logits.dtype == torch.bfloat16
            return logits, torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    model = Tiny()
    cfg = TrainConfig(steps=30, lr=3e-2, min_lr=1e-3, warmup_steps=0, eval_interval=30, dtype="bfloat16")
    train_loop(model, make_optimizer(model, cfg), cfg, lambda: (x, y), [(x, y)])
    assert estimate_loss(model, [(x, y)], dtype="bfloat16") < 0.5


def test_patience_stops_after_evaluations_without_improvement(monkeypatch):
    model = BigramLM(5)
    x = torch.zeros(2, 4, dtype=torch.long)
    cfg = TrainConfig(steps=100, eval_interval=2, patience=3, lr=1e-3, min_lr=1e-3, warmup_steps=0)
    vals = iter([3.0, 2.0, 2.5, 2.1, 2.2, 1.0])  # best at the 2nd evaluation, then three without a better one
    monkeypatch.setattr(training_loop, "estimate_loss", lambda *args, **kwargs: next(vals))
    state = train_loop(model, make_optimizer(model, cfg), cfg, lambda: (x, x), [(x, x)])
    assert state.step == 10 and state.best_val == 2.0  # 5 evaluations, stopped before the 6th


def test_checkpoint_time_does_not_count_against_the_budget():
    """A fake clock: each step takes 0.01 s, each save 0.2 s; only the steps count as training time."""
    model = BigramLM(5)
    x = torch.zeros(2, 4, dtype=torch.long)
    cfg = TrainConfig(steps=5, ckpt_every=1, eval_interval=1000, warmup_steps=0)
    now, saves = [0.0], []

    def next_batch():
        now[0] += 0.01
        return x, x

    def slow_save(state, best, last):
        saves.append((state.step, last))
        now[0] += 0.2

    state = train_loop(model, make_optimizer(model, cfg), cfg, next_batch, [(x, x)], save=slow_save,
                       clock=lambda: now[0])
    assert saves == [(1, False), (2, False), (3, False), (4, False), (5, True)]
    assert state.elapsed == pytest.approx(0.05)


def test_the_plot_is_drawn_first_then_at_most_once_a_period_and_at_the_last_save(tmp_path, monkeypatch):
    model = BigramLM(5)
    save = training_loop.saver(tmp_path, model, make_optimizer(model, TrainConfig()))
    (tmp_path / checkpoint.METRICS).write_text("", encoding="utf-8")
    drawn, now = [], [1000.0]
    monkeypatch.setattr(checkpoint, "plot_losses", lambda runs, path: drawn.append(now[0]) or True)
    monkeypatch.setattr(training_loop.time, "monotonic", lambda: now[0])
    for seconds in (0, 10, training_loop.PLOT_SECONDS - 1, training_loop.PLOT_SECONDS + 5):
        now[0] = 1000.0 + seconds
        save(training_loop.LoopState(), None, False)
    now[0] += 1
    save(training_loop.LoopState(), None, True)
    assert drawn == [1000.0, 1000.0 + training_loop.PLOT_SECONDS + 5, 1000.0 + training_loop.PLOT_SECONDS + 6]
    assert (tmp_path / checkpoint.WEIGHTS).exists()  # the weights are saved every time, plotted or not


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_an_inf_gradient_stops_before_the_update(grad_clip):
    """The loss stays finite, one gradient is inf: the step raises and the weights are untouched."""
    model = BigramLM(5)
    x = torch.zeros(2, 4, dtype=torch.long)
    cfg = TrainConfig(steps=10, eval_interval=3, warmup_steps=0, grad_clip=grad_clip)
    model.table.weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), math.inf) if saves == [3] else g)
    saves, weights = [], []

    def save(state, best, last):
        saves.append(state.step)
        weights.append(model.table.weight.detach().clone())

    with pytest.raises(TrainingDiverged, match="gradient norm became inf at step 4"):
        train_loop(model, make_optimizer(model, cfg), cfg, lambda: (x, x), [(x, x)], save=save)
    assert saves == [3] and torch.equal(model.table.weight, weights[0])


def test_freed_activations_keep_their_pages():
    """A step's pattern: many blocks of ~1 MiB (sizes differ) allocated, written, freed, again. glibc's default gives
    each back to the kernel and faults every page in again (measured: ~100 % of the pages touched); kept, ~0 %."""
    if not training_loop.keep_freed_memory():
        pytest.skip("glibc's malloc only")
    resource = pytest.importorskip("resource")  # Unix only: imported here so that Windows still runs the rest

    def one_step():
        held = [torch.ones((1 << 18) + 1000 * i) for i in range(16)]  # 16 × ~1 MiB, every page written
        del held

    one_step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        one_step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 0.05 * 20 * 16 * 256  # of 81,920 pages touched


def test_read_metrics_drops_only_a_torn_last_row(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "train_lo', encoding="utf-8")
    assert checkpoint.read_metrics(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"step": 2, "train_lo\n{"step": 3}\n',
                    encoding="utf-8")  # a broken row inside is an error
    with pytest.raises(ValueError):
        checkpoint.read_metrics(path)


@pytest.mark.parametrize("preset", ["moe", "llama"])
def test_train_loss_is_the_cross_entropy_and_moe_logs_its_aux_loss_apart(tmp_path, preset):
    torch.manual_seed(0)
    config = dataclasses.replace(PRESETS[preset], vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16,
                                 ffn_hidden=16, moe_aux_weight=0.5)  # a weight large enough to show in the loss
    model = Transformer(config)
    batches, val = fixed_batches(4, 4), fixed_batches(1, 4, seed=1)
    cross_entropy, aux = [], []

    def next_batch():  # the reference, on each micro-batch with the weights it is trained at
        x, y = batches[len(cross_entropy)]
        with torch.no_grad():
            logits, _ = model(x)
            cross_entropy.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
            aux.append(model.moe_report(x).get("aux_loss"))
        return x, y

    cfg = TrainConfig(steps=2, grad_accum=2, batch_size=4, warmup_steps=0, eval_interval=2, log_interval=2)
    train_loop(model, make_optimizer(model, cfg), cfg, next_batch, val, run_dir=tmp_path)
    rows = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    train_row, val_row = [json.loads(line) for line in rows]
    assert train_row["train_loss"] == pytest.approx(sum(cross_entropy) / 4, rel=1e-5)
    logits, _ = model(val[0][0])
    assert val_row["val_loss"] == pytest.approx(F.cross_entropy(logits.flatten(0, 1), val[0][1].flatten()).item(),
                                                rel=1e-5)
    if preset == "moe":
        assert train_row["aux_loss"] == pytest.approx(sum(aux) / 4, rel=1e-5)
    else:
        assert "aux_loss" not in train_row


@pytest.mark.parametrize("device, bf16, compiles, expected", [
    ("cpu", False, False, ("float32", False)),
    ("mps", False, False, ("float32", False)),
    ("cuda", True, True, ("bfloat16", True)),  # an A100, an L4
    ("cuda", False, True, ("float16", True)),  # a T4: no bfloat16, float16 with the gradient scaler
    ("cuda", True, False, ("bfloat16", False)),  # no Triton: no compiling
])
def test_auto_precision_follows_what_the_device_reports(device, bf16, compiles, expected):
    assert training_loop.choose_precision(device, bf16, compiles) == expected
    assert training_loop.choose_precision(device, bf16, compiles, "float32", "off") == ("float32", False)
    assert training_loop.choose_precision(device, bf16, compiles, "auto", "on")[1] is True


@pytest.mark.parametrize("device, bf16, dtype, message", [
    ("cpu", False, "float16", "autocast on a CPU supports bfloat16 only"),
    ("cuda", False, "bfloat16", "this GPU has no bfloat16"),
])
def test_a_precision_the_device_lacks_is_an_error(device, bf16, dtype, message):
    with pytest.raises(ValueError, match=message):
        training_loop.choose_precision(device, bf16, False, dtype)


def test_cpu_reports_neither_bfloat16_nor_compiling():
    assert training_loop.device_capabilities("cpu") == (False, False)


@pytest.mark.parametrize("rule, factor", [("none", 1.0), ("sqrt", 2.0), ("linear", 4.0)])
def test_learning_rates_scale_with_the_tokens_per_step(rule, factor):
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, lr_scaling=rule)
    assert training_loop.scaled_lr(cfg, 4 * 2048, 2048) == pytest.approx((1e-3 * factor, 1e-4 * factor))
    assert training_loop.scaled_lr(cfg, 2048, 2048) == pytest.approx((1e-3, 1e-4))
    with pytest.raises(ValueError, match="--lr-scaling 'cube'"):
        TrainConfig(lr_scaling="cube")


def test_parameters_flops_and_optimizer_memory_match_hand_formulas():
    """The gpt preset by hand: embeddings V·C + T·C, per layer 12·C² + 2·C (4 matrices, 2 norms), a last norm;
    6 FLOPs per parameter plus attention's 12·L·C·T; AdamW two float32 values and a gradient per parameter."""
    model = Transformer(dataclasses.replace(PRESETS["gpt"], vocab_size=65))
    V, T, L, C = 65, 64, 4, 128
    n = V * C + T * C + L * (12 * C * C + 2 * C) + C
    assert n == 804_096 == sum(p.numel() for p in model.parameters())
    assert training_loop.flops_per_token(model, T) == 6 * n + 12 * L * C * T
    cfg = TrainConfig(batch_size=2, warmup_steps=0)
    memory = training_loop.memory_estimate(model, cfg, T, "float32")
    optimizer = make_optimizer(model, cfg)
    x = torch.randint(V, (2, T))
    model(x, x)[1].backward()
    optimizer.step()
    assert memory["weights"] == 4 * n == sum(p.nbytes for p in model.parameters())
    assert memory["gradients"] == sum(p.grad.nbytes for p in model.parameters())
    assert memory["optimizer"] == sum(t.nbytes for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert training_loop.memory_estimate(model, cfg, T, "bfloat16")["activations"] == memory["activations"] // 2


def saved_for_backward(model, x):
    """Bytes of the tensors autograd keeps for the backward pass of one training forward, parameters aside."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x)
    return sum(storages.values())


@pytest.mark.parametrize("preset, vocab, attn_impl", [("gpt", 65, "sdpa"), ("llama", 65, "sdpa"),
                                                      ("moe", 65, "sdpa"), ("llama", 1024, "sdpa"),
                                                      ("gpt", 65, "manual")])
def test_the_activation_estimate_matches_what_autograd_saves(preset, vocab, attn_impl):
    torch.manual_seed(0)
    config = dataclasses.replace(PRESETS[preset], vocab_size=vocab, n_layer=2, block_size=32, attn_impl=attn_impl)
    model = Transformer(config)
    estimate = training_loop.memory_estimate(model, TrainConfig(batch_size=3), 32, "float32")["activations"]
    assert estimate == pytest.approx(saved_for_backward(model, torch.randint(vocab, (3, 32))), rel=0.15)
