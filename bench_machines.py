"""Benchmarks of fitting the learner's machine — learning-rate scaling, --estimate, the hardware table.

The same runner as bench.py; every run is a fresh `python train.py` process pinned with taskset, so its
time and peak memory are its own.

    python bench_machines.py --list           # what there is
    python bench_machines.py lr-scaling       # llama at 1×, 4×, 16× tokens per step, none/sqrt/linear
    python bench_machines.py estimate         # --estimate against the measured time and peak RSS
    python bench_machines.py hardware         # the README's table: CPU measured, T4 / L4 / A100 estimated
"""
import dataclasses
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench import CORPUS, PEAK_RSS_LAUNCHER, main, print_table
from checkpoint import read_metrics
from train import REFERENCE_TOKENS
from training_loop import TrainConfig, flops_per_token, make_optimizer, memory_estimate
from transformer import PRESETS, Transformer

BENCHES = {}
ROOT = Path(__file__).resolve().parent
# Tiny Shakespeare at the repo root (train.py fetches it there), else the shared copy beside the checkout.
DATA = next((str(p) for p in (ROOT / CORPUS, ROOT.parent / "shared/data" / CORPUS) if p.exists()), CORPUS)
RULES = ("none", "sqrt", "linear")
PRESET_LR = {"gpt": 1e-3, "llama": 3e-3, "moe": 3e-3}  # the rates chosen at REFERENCE_TOKENS (bench.py's recipes)
RECIPE = ["--lr", "3e-3", "--min-lr", "3e-4", "--weight-decay", "0.1", "--beta2", "0.99", "--grad-clip", "1.0"]


def train_child(flags, out, cores="0", threads=1):
    """`python train.py FLAGS --out OUT` pinned to `cores` with `threads` threads: (wall s, peak RSS MB, stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        command = [sys.executable, "train.py", "--data", DATA, *flags, "--out", str(out)]
        done = subprocess.run(["taskset", "-c", cores, sys.executable, "-c", PEAK_RSS_LAUNCHER, f"{tmp}/rss.json",
                               *command], env=env, capture_output=True, text=True, encoding="utf-8")
        wall = time.perf_counter() - t0
        result = json.loads(Path(tmp, "rss.json").read_text(encoding="utf-8"))
    diverged = result["code"] == 1 and "error: " in done.stderr  # the learning-rate benchmark reports it
    if result["code"] and not diverged:
        raise RuntimeError(f"train.py {' '.join(flags)} failed:\n{done.stderr[-2000:]}")
    return wall, result["rss_mb"], done.stdout + done.stderr


def bench_lr_scaling(micro_batches=128, batch=16):
    """llama at 1×, 4× and 16× its reference tokens per step (by --grad-accum), each over the same tokens."""
    jobs = [(factor, rule) for factor in (1, 4, 16) for rule in (("none",) if factor == 1 else RULES)]

    def run(job):
        factor, rule = job
        steps = micro_batches // factor
        flags = ["--preset", "llama", "--batch-size", str(batch), "--grad-accum", str(factor), *RECIPE, "--steps",
                 str(steps), "--warmup-steps", str(max(1, steps // 10)), "--eval-interval", str(steps),
                 "--eval-iters", "40", "--lr-scaling", rule]
        out, core = Path(tmp) / f"{factor}-{rule}", free_cores.get()
        wall, _, log = train_child(flags, out, cores=core)
        free_cores.put(core)
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
        vals = [r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
        return [f"{factor}× ({batch * 128 * factor:,})", rule, steps, f"{config['resolved']['lr']:.2g}",
                f"{vals[-1]:.4f}" if vals and "error: " not in log else "diverged", f"{wall:.0f} s"]

    free_cores = queue.Queue()
    for core in ("0", "1"):  # one run on each core
        free_cores.put(core)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(run, jobs))
    print(f"llama preset, {micro_batches} micro-batches of {batch} × 128 tokens ({micro_batches * batch * 128:,} "
          f"tokens) for every row, --lr 3e-3 at the reference {REFERENCE_TOKENS['llama']:,} tokens per step, warm-up "
          f"a tenth of the steps; two runs at a time, one thread each pinned to its own core, one seed; load "
          f"average {os.getloadavg()[0]:.1f} at the end\n")
    print_table(["tokens per step", "--lr-scaling", "steps", "peak lr", "val loss", "wall"], rows)


BENCHES["lr-scaling"] = bench_lr_scaling


def parse_estimate(log):
    """(seconds per step, seconds per evaluation, peak RSS MB) from train.py --estimate's last line."""
    found = re.search(r"estimate: ([\d,.]+) ms per step and ([\d.]+) s per evaluation .* about ([\d,]+) MB", log)
    ms, eval_s, rss = (float(g.replace(",", "")) for g in found.groups())
    return ms / 1000, eval_s, rss


def bench_estimate(steps=200):
    """--estimate of a 200-step gpt and llama run against the run itself: training time and peak RSS."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("gpt", "llama"):
            flags = ["--preset", preset, "--steps", str(steps)]
            _, _, log = train_child([*flags, "--estimate"], Path(tmp) / f"{preset}-estimate")
            step_s, eval_s, rss_estimate = parse_estimate(log)
            _, rss, _ = train_child(flags, Path(tmp) / preset)
            rows_of_run = read_metrics(Path(tmp) / preset / "metrics.jsonl")
            train_s = [r["elapsed"] for r in rows_of_run if "elapsed" in r][-1]
            rows.append([preset, f"{step_s * steps:.1f} s", f"{train_s:.1f} s", f"{step_s * steps / train_s - 1:+.0%}",
                         f"{rss_estimate:,.0f} MB", f"{rss:,.0f} MB", f"{rss_estimate / rss - 1:+.0%}",
                         f"{eval_s:.2f} s"])
    print(f"{steps} steps, default flags, one thread pinned to core 0; load average {os.getloadavg()[0]:.1f}. "
          "Training time excludes evaluation (its estimate is the last column, once per --eval-interval)\n")
    print_table(["preset", "estimated training time", "measured", "error", "estimated peak RSS", "measured",
                 "error", "estimated evaluation"], rows)
    print("\ngoal: within ±25 %")


BENCHES["estimate"] = bench_estimate


# Published dense peak rates (no sparsity) and memory: NVIDIA's T4, L4 and A100 (40 GB SXM) data sheets. --dtype
# auto trains in float16 on a T4 (no bfloat16) and bfloat16 on the others.
GPUS = {"T4": {"tflops": 65, "gb_s": 320, "gb": 16, "dtype": "float16"},
        "L4": {"tflops": 121, "gb_s": 300, "gb": 24, "dtype": "bfloat16"},
        "A100": {"tflops": 312, "gb_s": 1555, "gb": 40, "dtype": "bfloat16"}}
FLOP_UTILISATION, BANDWIDTH_UTILISATION = 0.3, 0.6  # assumed: what small models reach in eager PyTorch
SECONDS_PER_OP = 10e-6  # assumed host cost of launching one operator in eager mode (no CUDA graphs)
# A small model leaves a GPU idle at 16 sequences: 4× the batch costs a launch-bound step almost nothing. Its rate
# stays the preset's: in `lr-scaling` here neither rule beat keeping it at equal tokens (4×: none 2.71, sqrt 2.79).
GPU_BATCH = 64
CUDA_CONTEXT_MB = 500  # what the CUDA runtime and its kernels take before the first tensor


class CountOps(TorchDispatchMode):
    """Counts the operators one training step runs: on a GPU each is at least one kernel launch."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(model, cfg, block_size):
    optimizer = make_optimizer(model, cfg, "cuda")  # the fused kernel the GPU would run: a few launches
    x = torch.randint(model.config.vocab_size, (2, block_size))
    with CountOps() as counter:
        model(x, x)[1].backward()
    return counter.ops + len(optimizer.param_groups)


def gpu_estimate(preset, gpu, vocab=65):
    """(seconds per 1,000 steps, GB) for `preset` at GPU_BATCH on `gpu`: the larger of compute time and memory
    traffic (weights, gradients and AdamW's moments read and written; activations written and read), plus
    the eager launch cost of every operator."""
    spec, config = GPUS[gpu], PRESETS[preset]
    model = Transformer(dataclasses.replace(config, vocab_size=vocab))
    cfg = TrainConfig(batch_size=GPU_BATCH, dtype=spec["dtype"])
    memory = memory_estimate(model, cfg, config.block_size, spec["dtype"])
    flops = flops_per_token(model, config.block_size) * GPU_BATCH * config.block_size
    traffic = 2 * (memory["weights"] + memory["gradients"] + memory["optimizer"] + memory["activations"])
    seconds = max(flops / (spec["tflops"] * 1e12 * FLOP_UTILISATION), traffic / (spec["gb_s"] * 1e9 *
                  BANDWIDTH_UTILISATION)) + ops_per_step(model, cfg, config.block_size) * SECONDS_PER_OP
    return 1000 * seconds, sum(memory.values()) / 2**30 + CUDA_CONTEXT_MB / 1024


def bench_hardware(steps=50):
    """Each preset: time per 1,000 steps and peak memory here (1 and 2 threads), and estimated on T4, L4, A100."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in REFERENCE_TOKENS:  # the presets with a reference batch and rate
            batch, lr = REFERENCE_TOKENS[preset] // PRESETS[preset].block_size, PRESET_LR[preset]
            for threads, cores in ((1, "0"), (2, "0,1")):
                flags = ["--preset", preset, "--batch-size", str(batch), "--lr", str(lr), "--min-lr", str(lr / 10),
                         "--steps", str(steps), "--eval-interval", str(steps), "--eval-iters", "1"]
                _, rss, _ = train_child(flags, Path(tmp) / f"{preset}{threads}", cores, threads)
                elapsed = [r["elapsed"] for r in read_metrics(Path(tmp) / f"{preset}{threads}" / "metrics.jsonl")
                           if "elapsed" in r][-1]
                rows.append([preset, f"CPU, {threads} thread{'s' * (threads > 1)} (measured)", batch, f"{lr:g}",
                             f"{elapsed / steps * 1000 / 60:.1f} min", f"{rss:,.0f} MB"])
            for gpu in GPUS:
                seconds, gb = gpu_estimate(preset, gpu)
                rows.append([preset, f"{gpu}, {GPUS[gpu]['dtype']} (estimate)", GPU_BATCH, f"{lr:g}",
                             f"{seconds:.0f} s", f"{gb:.1f} GB"])
    print(f"CPU rows: {steps}-step runs at each preset's reference batch and rate, scaled to 1,000 steps, training "
          "time only; "
          f"peak RSS of the whole process; load average {os.getloadavg()[0]:.1f} at the end. GPU rows: estimates, "
          f"not measured: {FLOP_UTILISATION:.0%} of the published peak FLOP/s, {BANDWIDTH_UTILISATION:.0%} of the "
          f"memory bandwidth, {SECONDS_PER_OP * 1e6:.0f} µs per operator launched, {CUDA_CONTEXT_MB} MB of CUDA "
          "context\n")
    print_table(["preset", "machine", "batch", "learning rate", "1,000 steps", "peak memory"], rows)


BENCHES["hardware"] = bench_hardware


if __name__ == "__main__":
    main(BENCHES, __doc__)
