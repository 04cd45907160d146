"""Stages 8, 14, 21, 22 — the one training loop every model uses.

batch → forward → loss → backward → clip → optimizer step → log, repeated.
The model only has to answer `logits, loss = model(x, y)`; the loop owns the
rest: AdamW with weight decay on matrices only, linear warm-up then cosine
decay (over steps, or over wall-clock time with `max_time`), gradient
accumulation, mixed precision, a NaN guard, periodic evaluation, early
stopping, `metrics.jsonl`, a tqdm bar and a loss plot. Batches come from
`dataset.get_batch` (random offsets) or `epoch_batches` (shuffled epochs).
Its run-directory half, `saver` and `restore`, writes and reads back the
checkpoints, so that train.py and finetune.py save and resume alike.

New since stage 7: the optimizer and schedule (14), evaluation during
training (8), precision and accumulation (21), distributed-aware logging (22),
and fitting the machine: the precision its device supports, learning rates
scaled to the batch, and estimates of a run's FLOPs, memory and time.
Run the demo: `python training_loop.py` (a bigram model on a toy text).
"""
import contextlib
import ctypes
import dataclasses
import importlib.util
import json
import math
import mmap
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import checkpoint as ckpt
from char_tokenizer import replace_unencodable_output
from components import swiglu_hidden
from dataset import default_workers
from muon import Muon, param_groups

PLOT_SECONDS = 60  # loss.png is redrawn at most this often while training (and always at the end)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


class BlockDataset(torch.utils.data.Dataset):
    """Blocks of `block_size` tokens taken every `stride` tokens, as (x, y) pairs.

    stride = block_size (the default) tiles the data with no overlap and no position wasted: every token is a target
    exactly once (the first is only an input)."""

    def __init__(self, data, block_size, stride=None):
        self.data, self.block_size = data, block_size
        self.stride = stride or block_size
        if len(data) < block_size + 1:
            raise ValueError(f"{len(data)} tokens are fewer than one block needs ({block_size + 1})")
        self.n = (len(data) - 1 - block_size) // self.stride + 1

    def __len__(self):
        return self.n

    def __getstate__(self):
        """What a DataLoader worker receives: a memmap's file to open again, not a copy of the whole split (a
        worker started by spawn, as on macOS and Windows, gets its dataset pickled; one forked shares pages)."""
        state = dict(self.__dict__)
        if isinstance(self.data, np.memmap) and isinstance(self.data.base, mmap.mmap):  # a whole file, not a view
            state["data"] = (self.data.filename, self.data.dtype.str, self.data.offset, self.data.shape)
        return state

    def __setstate__(self, state):
        if isinstance(state["data"], tuple):
            filename, dtype, offset, shape = state["data"]
            state["data"] = np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)

    def __getitem__(self, i):
        start = i * self.stride
        window = torch.from_numpy(np.asarray(self.data[start:start + self.block_size + 1]).astype(np.int64))
        return window[:-1], window[1:]


def epoch_batches(data, block_size, batch_size, seed=0, rank=0, world=1, start=0, workers=None):
    """Shuffled epochs of non-overlapping blocks through a DataLoader, (x, y) forever: each epoch sees every block once,
    is shuffled by seed (seed, e) and dealt to the `world` ranks in disjoint shards; `start` skips batches (resume)."""
    blocks = BlockDataset(data, block_size)
    per_epoch = len(blocks) // world // batch_size
    if per_epoch < 1:
        raise ValueError(f"{len(blocks)} blocks make no batch of {batch_size} per process: "
                         f"lower --batch-size or use --sampler random")
    epoch, skip = divmod(start, per_epoch)
    workers = default_workers() if workers is None else workers
    while True:
        generator = torch.Generator().manual_seed(hash((seed, epoch)))
        order = torch.randperm(len(blocks), generator=generator)
        shard = order[rank::world][skip * batch_size:per_epoch * batch_size].tolist()
        # Its own generator also keeps the DataLoader from drawing on torch's global RNG (dropout's).
        yield from torch.utils.data.DataLoader(torch.utils.data.Subset(blocks, shard), batch_size=batch_size,
                                               num_workers=workers, generator=generator)
        epoch, skip = epoch + 1, 0


def keep_freed_memory():
    """Have glibc's malloc keep what a training step frees for the next (Linux glibc; True when it applied): by
    default each freed block over 128 KiB goes back to the kernel and is faulted in again, zero-filled, ~1,000 faults
    a step in the gpt recipe (its step alone is 2–7 % faster without). Blocks up to 32 MiB (glibc's most) now come
    from the heap, given back only past 1 GiB free, as preloading jemalloc would do."""
    try:
        libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    except OSError:  # a libc other than glibc (musl)
        libc = None
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


@dataclass
class TrainConfig:
    """How to train; train.py makes one flag per field, its help the trailing comment."""

    steps: int = 2000  # total optimizer steps of the run
    batch_size: int = 12  # sequences per micro-batch
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # steps of linear warm-up
    weight_decay: float = 0.1  # AdamW decay, on matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    grad_clip: float = 1.0  # clip the gradient norm to this (0: off)
    grad_accum: int = 1  # micro-batches summed per optimizer step
    eval_interval: int = 250  # evaluate every N steps
    eval_iters: int = 20  # validation batches per evaluation
    log_interval: int = 10  # write a metrics row every N steps
    ckpt_every: int = 0  # also checkpoint every N steps (0: at each evaluation and at the end only)
    max_time: float = 0.0  # seconds of training; the schedule then runs on time, --steps only caps it (0: off)
    patience: int = 0  # stop after N evaluations without a better val loss (0: never)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (autocast); auto: fp32 on CPU/MPS, bf16/fp16 on CUDA
    optimizer: str = "adamw"  # adamw | muon (Muon for the matrices in the blocks, AdamW for the rest: muon.py)
    lr_scaling: str = "none"  # none | sqrt | linear: fit --lr, --min-lr to the tokens per step (vs the preset's)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"--optimizer {self.optimizer!r} is not one of adamw, muon")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= --min-lr <= --lr and --lr > 0, got lr {self.lr}, min-lr {self.min_lr}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {self.dtype!r} is not one of auto, float32, bfloat16, float16")
        if self.lr_scaling not in ("none", "sqrt", "linear"):
            raise ValueError(f"--lr-scaling {self.lr_scaling!r} is not one of none, sqrt, linear")


def lr_at(step, progress, cfg):
    """Learning rate: linear warm-up over `warmup_steps`, then cosine from lr to min_lr.

    `progress` in [0, 1] is how far the run is through its decay: by steps, (step − warmup) / (steps − warmup),
    or by time, elapsed / max_time. Example with lr 1e-3, min_lr 1e-4: progress 0 -> 1e-3, 0.5 -> 5.5e-4, 1 -> 1e-4."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = min(max(progress, 0.0), 1.0)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def step_progress(step, cfg):
    return (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)


def make_optimizer(model, cfg, device_type="cpu"):
    """AdamW, or Muon for the matrices in the blocks (muon.py); decay on matrices, not norms, biases or scales."""
    kind, fused = (Muon if cfg.optimizer == "muon" else torch.optim.AdamW), device_type in ("cpu", "cuda")
    return kind(param_groups(model, cfg.weight_decay, kind is Muon), cfg.lr, (cfg.beta1, cfg.beta2), fused=fused)


def autocast_for(device_type, dtype):
    """An autocast context for `dtype`, or a no-op for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def choose_precision(device_type, bf16_supported, compile_works, dtype="auto", compile="auto"):
    """(dtype, compile?) for a device and what it reports it can do; "auto" picks, a named choice is checked.

    auto: float32 on a CPU (autocast there has bfloat16 only, and a CPU without bf16 matrix units runs it
    slower) and on MPS (where float16 autocast has given silently wrong losses); on CUDA bfloat16, or float16
    with the gradient scaler on a GPU without bfloat16 (a T4). --compile auto compiles where `compile_works`.
    """
    if dtype == "auto":
        dtype = "float32" if device_type != "cuda" else "bfloat16" if bf16_supported else "float16"
    elif dtype == "float16" and device_type == "cpu":
        raise ValueError("--dtype float16: autocast on a CPU supports bfloat16 only; use --dtype float32 (or auto)")
    elif dtype == "bfloat16" and device_type == "cuda" and not bf16_supported:
        raise ValueError("--dtype bfloat16: this GPU has no bfloat16; use --dtype float16 (with the gradient "
                         "scaler) or auto")
    return dtype, compile_works if compile == "auto" else compile in ("on", True)  # True: a run from before auto


def device_capabilities(device_type):
    """What the device reports: (bfloat16 supported, torch.compile expected to work). Compiling needs Triton
    and a GPU of compute capability 7.0 or more; on a CPU it takes ~20 s before the first step, worth it only
    for long runs (--compile on), and on MPS it is not dependable."""
    if device_type != "cuda":
        return False, False
    triton = importlib.util.find_spec("triton") is not None
    return torch.cuda.is_bf16_supported(), triton and torch.cuda.get_device_capability() >= (7, 0)


def scaled_lr(cfg, tokens_per_step, reference_tokens):
    """(lr, min_lr) of `cfg` scaled by `cfg.lr_scaling` for `tokens_per_step` against `reference_tokens`, the
    tokens per step at which cfg.lr was chosen: "sqrt" multiplies by √ratio (the rule for Adam, whose update
    noise falls as 1/√batch), "linear" by the ratio (SGD's rule), "none" keeps them.
    Example: lr 1e-3 tuned at 2,048 tokens, run at 8,192: sqrt 2e-3, linear 4e-3.
    """
    ratio = tokens_per_step / reference_tokens
    factor = {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[cfg.lr_scaling]
    return cfg.lr * factor, cfg.min_lr * factor


def flops_per_token(model, block_size):
    """Training FLOPs per token: 6 per parameter (2 forward, 4 backward) plus attention's 12·L·C·T, the
    PaLM estimate. Example: 10 M parameters, 4 layers of 128 channels, T 256: 6e7 + 1.6e6."""
    cfg = getattr(model, "config", None)  # a bigram table has no layers
    attention = 12 * cfg.n_layer * cfg.n_embd * block_size if cfg else 0
    return 6 * sum(p.numel() for p in model.parameters()) + attention


def activation_elements(model, block_size):
    """Values per token that autograd keeps for the backward pass. Per layer: the inputs of both norms and of
    every Linear, q/k/v (again after RoPE), the attention output, and the feed-forward's hidden units (2 per
    unit for GELU, 4 for SwiGLU, for each of the top-k experts of an MoE); then the last norm's, and the
    logits with their log-softmax. test_training_loop checks it against the tensors autograd saves."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return 2 * model.vocab_size  # logits and their log-softmax
    C, kv = cfg.n_embd, cfg.kv_heads * cfg.head_dim
    attention = 6 * C + (C + 2 * kv) + (C + kv if cfg.pos == "rope" else 0) + (C if cfg.norm == "rmsnorm" else 0)
    if cfg.attn_impl == "manual":
        attention += 2 * cfg.n_head * block_size  # each query's row of scores and of weights, per head
    hidden = cfg.ffn_hidden or (4 * C if cfg.mlp == "gelu" else swiglu_hidden(C))
    mlp = {"gelu": 2 * hidden, "swiglu": 4 * hidden,
           "moe": cfg.moe_top_k * (4 * hidden + 2 * C) + cfg.n_experts}[cfg.mlp]
    return cfg.n_layer * (attention + mlp) + 2 * C + 2 * cfg.vocab_size


def memory_estimate(model, cfg, block_size, dtype):
    """Bytes a training step holds, as a dict: weights; gradients and AdamW's two moments for each trainable
    value (float32); the activations of one micro-batch (2 bytes a value under 16-bit autocast)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_value = 2 if dtype in ("bfloat16", "float16") else 4
    return {"weights": weights, "gradients": 4 * trainable, "optimizer": 8 * trainable,
            "activations": per_value * cfg.batch_size * block_size * activation_elements(model, block_size)}


def reset_memory(model, rows=None):
    """A stateful model (memory.py) forgets what the rows (bool (B,); None: all) carried: a new text starts."""
    reset = getattr(getattr(model, "module", model), "reset_memory", None)  # DistributedDataParallel's .module
    if reset is not None:
        reset(rows)


@torch.no_grad()
def estimate_loss(model, batches, device_type="cpu", dtype="float32"):
    """Mean loss over a fixed list of (x, y) batches, in eval mode (no dropout); a memory is put back after."""
    was_training, inner = model.training, getattr(model, "module", model)
    carried = inner.get_memory_state() if hasattr(inner, "get_memory_state") else None
    model.eval()
    total = 0.0
    for x, y in batches:
        reset_memory(model)
        with autocast_for(device_type, dtype):
            _, loss = model(x, y)
        total += loss.item()
    if carried is not None:
        inner.set_memory_state(carried)
    model.train(was_training)
    return total / len(batches)


def loss_terms(model, loss_value):
    """What one micro-batch logs: {"train_loss": loss_value}, or, for a model whose training loss adds more to
    the cross-entropy (MoE), the terms it kept apart in `loss_terms` (train_loss then the cross-entropy)."""
    inner = getattr(model, "module", model)  # DistributedDataParallel wraps the model as .module
    terms = getattr(inner, "loss_terms", None)  # torch.compile's wrapper passes it on
    return {name: value.item() for name, value in terms.items()} if terms else {"train_loss": loss_value}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class LoopState:
    """What the loop carries from step to step, and what a resume restores."""
    step: int = 0
    elapsed: float = 0.0  # training seconds so far (evaluation excluded), for --max-time
    best_val: float = math.inf
    evals_since_best: int = 0
    tokens: int = 0


def train_loop(model, optimizer, cfg, next_batch, val_batches, *, state=None, run_dir=None, save=None,
               device_type="cpu", is_main=True, world_size=1, on_eval=None, step_seed=None, clock=time.perf_counter):
    """Train `model` until `cfg.steps` (or `cfg.max_time`) and return the LoopState.

    next_batch() -> (x, y) gives one micro-batch. save(state, val_loss, last) is called at every evaluation, at the
    end and on Ctrl-C (then KeyboardInterrupt is re-raised). With DistributedDataParallel, gradients are only
    synchronised on the last micro-batch of a step (`no_sync`); only the main process logs and saves.
    step_seed(step) -> int, when given, re-seeds torch's generator (dropout) before each step, so the masks of step s
    are the same in a resumed run and differ between ranks, with no generator state to save. `clock` measures
    training time (tests fake it)."""
    state = state or LoopState()
    keep_freed_memory()
    if cfg.dtype == "auto":  # a TrainConfig made in code: the device decides, as on the command line
        cfg = dataclasses.replace(cfg, dtype=choose_precision(device_type, *device_capabilities(device_type))[0])
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world_size
    # The bar counts steps, or training seconds when the run has a time budget.
    bar = tqdm(total=cfg.max_time or cfg.steps, initial=state.elapsed if cfg.max_time else state.step,
               disable=not is_main, dynamic_ncols=True, unit="s" if cfg.max_time else "step",
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}" + (" s" if cfg.max_time else "")
               + " [{elapsed}<{remaining}{postfix}]")
    model.train()
    t_last, recent = clock(), []
    try:
        while state.step < cfg.steps and not (cfg.max_time and state.elapsed >= cfg.max_time):
            if step_seed is not None:
                torch.manual_seed(step_seed(state.step))  # every device's generator, CUDA's included
            progress = state.elapsed / cfg.max_time if cfg.max_time else step_progress(state.step, cfg)
            lr = lr_at(state.step, progress, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, logged, block = 0.0, {}, 0
            for micro in range(cfg.grad_accum):
                x, y, *new_rows = next_batch()  # a document pipeline adds the rows (B,) that start a document
                reset_memory(model, *new_rows)
                block = x.shape[1]
                sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    with autocast_for(device_type, cfg.dtype):
                        _, loss = model(x, y)
                    scaler.scale(loss / cfg.grad_accum).backward()  # the mean over N·B sequences
                loss_item = loss.item()
                loss_sum += loss_item
                for name, value in loss_terms(model, loss_item).items():
                    logged[name] = logged.get(name, 0.0) + value / cfg.grad_accum
            loss_value = loss_sum / cfg.grad_accum
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"loss became {loss_value} at step {state.step + 1}: training stopped, "
                                       f"the last good checkpoint is kept; try a lower --lr")
            # The norm is computed even with clipping off (max_norm inf leaves the gradients as they are):
            # a finite loss can still give an inf gradient, and one AdamW step would then write NaN weights.
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            if not scaler.is_enabled() and not torch.isfinite(grad_norm):  # float16's scaler skips such steps
                raise TrainingDiverged(f"the gradient norm became {grad_norm.item()} at step {state.step + 1} (the "
                                       f"loss was {loss_value:.4f}): training stopped before the update, the last "
                                       f"good checkpoint is kept; try a lower --lr or a --grad-clip")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            now = clock()
            state.elapsed += now - t_last
            t_step, t_last = t_last, now
            state.step += 1
            state.tokens += tokens_per_step * block
            recent.append(logged)
            if is_main and (state.step % cfg.log_interval == 0 or state.step == cfg.steps):
                tok_s = tokens_per_step * block * state.step / max(state.elapsed, 1e-9)
                means = {name: sum(r[name] for r in recent) / len(recent) for name in logged}
                row = {"step": state.step, **means, "lr": lr,
                       "tokens_per_sec": round(tok_s), "tokens": state.tokens, "elapsed": round(state.elapsed, 2)}
                ckpt.append_metrics(run_dir, row)
                aux = f" aux {row['aux_loss']:.3f}" if "aux_loss" in row else ""
                bar.set_postfix_str(f"loss {row['train_loss']:.4f}{aux} lr {lr:.2e} {tok_s:,.0f} tok/s")
                recent = []
            bar.update(min(now - t_step, cfg.max_time - bar.n) if cfg.max_time else 1)

            last = state.step >= cfg.steps or bool(cfg.max_time and state.elapsed >= cfg.max_time)
            if state.step % cfg.eval_interval == 0 or last:
                val = estimate_loss(model, val_batches, device_type, cfg.dtype)
                if not math.isfinite(val):
                    raise TrainingDiverged(f"the validation loss became {val} at step {state.step}: training "
                                           f"stopped, the last good checkpoint is kept; try a lower --lr")
                improved = val < state.best_val
                state.best_val = min(val, state.best_val)
                state.evals_since_best = 0 if improved else state.evals_since_best + 1
                if is_main:
                    row = {"step": state.step, "val_loss": val, "tokens": state.tokens,
                           **(on_eval(model) if on_eval else {})}
                    ckpt.append_metrics(run_dir, row)
                    bar.write(f"step {state.step}: val loss {val:.4f}" + (" (best)" if improved else ""))
                    if save:
                        save(state, val if improved else None, last)
                if cfg.patience and state.evals_since_best >= cfg.patience:
                    bar.write(f"no better val loss for {cfg.patience} evaluations: stopping early")
                    break
                t_last = clock()  # evaluating and saving do not count against --max-time
            elif cfg.ckpt_every and state.step % cfg.ckpt_every == 0 and is_main and save:
                save(state, None, False)
                t_last = clock()
    except KeyboardInterrupt:
        if is_main and save:
            bar.write(f"interrupted at step {state.step}: saving a checkpoint …")
            save(state, None)
        raise
    finally:
        bar.close()
    return state


def restore(run_dir, model, optimizer, is_main):
    """Load checkpoint_latest.pt into model and optimizer; drop metrics rows from after it and the temporary files
    of writes that a kill cut short. A run stopped before its first checkpoint starts again at step 0."""
    state = LoopState()
    if (run_dir / ckpt.STATE).exists():
        saved = ckpt.load_training_state(run_dir)
        ckpt.check_state_dict(saved["model"], model, run_dir / ckpt.STATE)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        ckpt.set_rng_state(saved["rng"])
        if saved.get("memory"):  # a document pipeline's rows continue their documents where they stopped
            model.set_memory_state(saved["memory"])
        state = LoopState(**saved["loop"])
    elif is_main:
        print(f"{run_dir} has no {ckpt.STATE} yet (it stopped before its first checkpoint): starting at step 0")
    if is_main:
        for tmp in run_dir.glob(".*.tmp"):  # dataset.atomic_write's names
            tmp.unlink()
        if (run_dir / ckpt.METRICS).exists():
            rows = ckpt.read_metrics(run_dir / ckpt.METRICS)
            kept = [json.dumps(r) + "\n" for r in rows if r["step"] <= state.step]
            ckpt.atomic_write_bytes(run_dir / ckpt.METRICS, "".join(kept).encode())
    return state


def saver(run_dir, model, optimizer, weights_of=None):
    """save(state, best_val, last) for the loop: latest and best weights (of `weights_of(model)` when given: a LoRA
    run saves them merged), the training state (of `model` itself, to resume it) and the plot: drawn at the last
    save, and before it at most once every PLOT_SECONDS (a plot costs a checkpoint's time many times over)."""
    plot_note = ["note: pip install matplotlib to get loss.png"]  # said once
    plotted = [-math.inf]  # when loss.png was last drawn

    def save(state, best_val, last=True):
        tensors = {**model.state_dict(), **{f"optimizer.{i}.{k}": v for i, slots in
                                            optimizer.state_dict()["state"].items() for k, v in slots.items()}}
        bad = next((name for name, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()), None)
        if bad is not None:  # the loop stops before this happens; this guard keeps any path from saving it
            raise TrainingDiverged(f"{bad} holds NaN or inf at step {state.step}: nothing was saved, the last "
                                   f"good checkpoint is kept; try a lower --lr")
        weights = weights_of(model) if weights_of else model
        ckpt.save_weights(weights, run_dir / ckpt.WEIGHTS)
        if best_val is not None:
            ckpt.save_weights(weights, run_dir / ckpt.BEST_WEIGHTS)
        ckpt.save_training_state(run_dir, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                           "loop": dataclasses.asdict(state), "rng": ckpt.rng_state(),
                                           "memory": getattr(model, "get_memory_state", dict)()})
        if not last and time.monotonic() - plotted[0] < PLOT_SECONDS:
            return
        plotted[0] = time.monotonic()
        rows = ckpt.read_metrics(run_dir / ckpt.METRICS)
        if not ckpt.plot_losses({run_dir.name: rows}, run_dir / "loss.png") and plot_note:
            print(plot_note.pop())
    return save


def run_command(run, argv=None):
    """main() of a training command: a user's error is one line and exit 2, divergence 1, Ctrl-C 130."""
    replace_unencodable_output()
    try:
        run(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted: the checkpoint was saved; continue with --resume", file=sys.stderr)
        sys.exit(130)


def _demo():
    from bigram_lm import BigramLM
    from char_tokenizer import CharTokenizer
    from dataset import as_tensor, get_batch

    text = "to be or not to be, that is the question. " * 50
    tok = CharTokenizer.train(text)
    data = as_tensor(tok.encode(text))
    g = torch.Generator().manual_seed(0)
    cfg = TrainConfig(steps=200, batch_size=16, lr=1e-2, warmup_steps=10, eval_interval=100, log_interval=20)
    model = BigramLM(tok.vocab_size)
    val = [get_batch(data, 16, 16, torch.Generator().manual_seed(1))]
    print(f"val loss before: {estimate_loss(model, val):.3f}")
    train_loop(model, make_optimizer(model, cfg), cfg, lambda: get_batch(data, 16, 16, g), val)
    print(f"val loss after:  {estimate_loss(model, val):.3f}")


if __name__ == "__main__":
    _demo()
