"""Benchmarks of the fixed-memory models (recurrent.py) and the reversal curse (reversal.py) behind the README.

The same runner as bench.py (one thread, a small table each). Training goes
through train.py (`bench.train_and_score`), so nothing here repeats its loop.

    python bench_recurrent.py --list          # what there is
    python bench_recurrent.py equal-time      # held-out loss at equal training time (about 45 min on 2 cores)
    python bench_recurrent.py lct             # LCT against exact training of the seed's updater
    python bench_recurrent.py state           # generation state and memory at 1k / 10k / 100k tokens
    python bench_recurrent.py reversal        # the reversal curse, English and Japanese
"""
import io
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

import reversal
from bench import CORPUS, PEAK_RSS_LAUNCHER, PRESET_BUDGET, PRESET_RECIPES, main, print_table, train_and_score
from checkpoint import load_run
from recurrent import model_attractor_stats

BENCHES = {}
SHAKESPEARE = ["--data", str(Path(__file__).resolve().parent.parent / "shared/data" / CORPUS)]
# llama's recipe at twice its learning rate (177 s, seed 1337: 1.801 at 6e-3, 1.803 at 1e-2, 1.873 at llama's 3e-3)
RECURRENT = [*PRESET_RECIPES["llama"][2:], "--preset", "recurrent", "--lr", "6e-3", "--min-lr", "6e-4"]
VARIANTS = {  # every flag takes a value
    "gpt": PRESET_RECIPES["gpt"],
    "llama": PRESET_RECIPES["llama"],
    "recurrent (minLSTM scan)": RECURRENT,
    "gated, exact (BPTT)": [*RECURRENT, "--recurrent-cell", "gated", "--recurrent-train", "exact"],
    "gated, LCT (2 passes)": [*RECURRENT, "--recurrent-cell", "gated", "--recurrent-train", "lct"],
    "infini": [*PRESET_RECIPES["llama"][2:], "--preset", "infini"],
}
SEEDS = (1337, 1338, 1339, 1340, 1341)


def load():
    """The machine's load averages (1, 5, 15 minutes), printed beside every figure measured here."""
    return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


def quiet_train(argv, seed, budget):
    """train.py with `argv` for `budget` seconds on one thread, scored on the whole held-out part."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp, redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        r = train_and_score([*SHAKESPEARE, *argv, "--seed", str(seed), "--max-time", str(budget),
                             "--eval-interval", "100000", "--eval-iters", "10"], tmp)
        model, cfg = r["model"], r["model"].config
        attractor = None
        if "recurrent" in cfg.layer_kinds:
            ids = torch.arange(cfg.vocab_size)
            stats = model_attractor_stats(model, ids[:1].repeat(32), ids[1:33], warn=False).values()
            attractor = (min(s["l2"] for s in stats), max(s["cosine"] for s in stats))
    return {"steps": r["steps"], "tok_s": r["train_tokens"] / r["train_s"], "loss": r["loss"],
            "ms_per_step": r["ms_per_iter"], "attractor": attractor}


def pin_to_a_core(cores):
    """A worker process's initializer: run on one core of its own (Linux; elsewhere the system decides)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cores.get()})


def bench_equal_time(budget=PRESET_BUDGET, seeds=SEEDS, variants=tuple(VARIANTS)):
    """gpt, llama, infini, the recurrent preset and the seed's gated updater (exact, LCT) at equal training time."""
    jobs = min(2, os.cpu_count() or 1)
    print(f"{budget:.0f} s of training each, one thread, {jobs} run(s) at a time, each pinned to a core of its own; "
          f"seeds {', '.join(map(str, seeds))}; whole held-out 10% of Tiny Shakespeare; {load()} at the start\n")
    context = multiprocessing.get_context("spawn")
    cores = context.Manager().Queue()
    for core in sorted(os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(jobs))[:jobs]:
        cores.put(core)
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=pin_to_a_core, initargs=(cores,)) as pool:
        futures = {name: [pool.submit(quiet_train, VARIANTS[name], seed, budget) for seed in seeds]
                   for name in variants}
        runs = {name: [f.result() for f in fs] for name, fs in futures.items()}
    rows = []
    for name in variants:
        losses = [r["loss"] for r in runs[name]]
        att = runs[name][0]["attractor"]
        rows.append([name, f"{statistics.median(r['steps'] for r in runs[name]):.0f}",
                     f"{statistics.median(r['tok_s'] for r in runs[name]):,.0f}",
                     f"{statistics.median(losses):.4f} ({min(losses):.4f}–{max(losses):.4f})",
                     "" if att is None else f"L2 {att[0]:.3f}, cos {att[1]:.3f}"])
    print_table(["model", "steps", "tokens/s", "heldout loss, median (min–max)",
                 "attractor check (worst layer)"], rows)
    if "llama" in runs and "recurrent (minLSTM scan)" in runs:
        ratio = (statistics.median(r["loss"] for r in runs["recurrent (minLSTM scan)"])
                 / statistics.median(r["loss"] for r in runs["llama"]))
        print(f"\nrecurrent / llama loss: {ratio:.3f} (goal ≤ 1.05); {load()} at the end")


BENCHES["equal-time"] = bench_equal_time


def bench_lct(budget=60.0, seed=1337, steps=20, passes=(1, 2, 4, 8)):
    """LCT against exact training of the seed's updater: time per step and held-out loss at equal time."""
    gated = [*RECURRENT, "--recurrent-cell", "gated"]
    ways = {"exact": [*gated, "--recurrent-train", "exact"]}
    for p in passes:
        ways[f"lct, {p} pass" + "es" * (p > 1)] = [*gated, "--recurrent-train", "lct", "--lct-passes", str(p)]
    print(f"recurrent preset with the gated cell; ms/step over {steps} steps; loss after {budget:.0f} s; "
          f"one thread; seed {seed}; {load()} at the start\n")
    rows, exact_ms = [], None
    for name, argv in ways.items():
        timed = quiet_train([*argv, "--steps", str(steps)], seed, 0)
        scored = quiet_train(argv, seed, budget)
        exact_ms = exact_ms or timed["ms_per_step"]
        rows.append([name, f"{timed['ms_per_step']:.0f}", f"{exact_ms / timed['ms_per_step']:.1f}×",
                     scored["steps"], f"{scored['loss']:.4f}"])
    print_table(["training", "ms/step", "speed-up", f"steps in {budget:.0f} s", "heldout loss"], rows)
    print(f"\n{load()} at the end")


BENCHES["lct"] = bench_lct

GENERATE = """import json, sys, time, torch
import dataclasses
from sample import next_token
from transformer import PRESETS, Transformer
torch.set_num_threads(1)
torch.manual_seed(0)
name, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = PRESETS[name]
if name == "llama":  # the whole text in the KV cache: what attention must keep to read all of it
    cfg = dataclasses.replace(cfg, block_size=n + 1)
model = Transformer(cfg).eval()
idx, g = torch.zeros(1, 1, dtype=torch.long), torch.Generator().manual_seed(0)
cache = model.new_kv_cache(1, capacity=n + 1) if name == "llama" else None
t0 = time.perf_counter()
with torch.inference_mode():
    for _ in range(n):  # one token in, one token out: the recurrent state or the growing cache carries the rest
        logits, _ = model(idx, cache=cache)
        idx = next_token(logits[:, -1], idx, generator=g)[:, None]
state = cache.nbytes() if cache else sum(
    v.nbytes for m in model.modules() if hasattr(m, "memory_state") for v in m.memory_state().values())
open(out, "w").write(json.dumps({"tok_s": n / (time.perf_counter() - t0), "state_bytes": state}))
"""


def generate_child(name, n):
    """Generate n tokens in a fresh process: (tokens/s, state bytes, peak RSS MB of that process)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "out.json")
        subprocess.run([sys.executable, "-c", PEAK_RSS_LAUNCHER, f"{tmp}/rss.json", sys.executable, "-c", GENERATE,
                        name, str(n), str(out)], check=True, stdout=subprocess.DEVNULL,
                       cwd=Path(__file__).resolve().parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
        r = json.loads(out.read_text(encoding="utf-8"))
        return r["tok_s"], r["state_bytes"], json.loads(Path(tmp, "rss.json").read_text(encoding="utf-8"))["rss_mb"]


def bench_state(lengths=(1_000, 10_000, 100_000), llama_lengths=(1_000, 10_000)):
    """Generation state bytes, peak RSS and tokens/s at 1k / 10k / 100k tokens: recurrent against llama."""
    print(f"random weights (speed and memory do not depend on them), 1 thread, batch 1, one token per step; "
          f"llama keeps its whole text in a KV cache (RoPE, window = text); {load()} at the start\n")
    rows = []
    for name, ns in (("recurrent", lengths), ("llama", llama_lengths)):
        for n in ns:
            tok_s, state, rss = generate_child(name, n)
            rows.append([name, f"{n:,}", f"{state:,}", f"{rss:.0f}", f"{tok_s:,.0f}"])
    print_table(["model", "tokens", "state bytes", "peak RSS MB", "tokens/s"], rows)
    print(f"\n{load()} at the end")


BENCHES["state"] = bench_state


def bench_reversal(steps=1500, seed=1337, langs=("en", "ja"), presets=("llama", "recurrent")):
    """The reversal curse: small llama and recurrent runs on the same fact set, English and Japanese."""
    print(f"{steps} steps of batch 16 × 96 characters on train.txt alone (char tokenizer), one thread, seed {seed}; "
          f"completion-only loss in nats/char; {load()} at the start\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lang in langs:
            facts = Path(tmp, lang)
            reversal.write_facts(facts, lang)
            for preset in presets:
                recipe = [*PRESET_RECIPES["llama"][2:], "--preset", preset]
                run = Path(tmp, f"{lang}-{preset}")
                torch.set_num_threads(1)
                with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                    t0 = time.perf_counter()
                    train_and_score(["--data", str(facts / "train.txt"), *recipe, "--block-size", "96",
                                     "--steps", str(steps), "--seed", str(seed), "--eval-interval", "100000",
                                     "--eval-iters", "5"], run)
                    wall = time.perf_counter() - t0
                    model, tok, _ = load_run(run)
                    r = reversal.evaluate_reversal(model, tok, facts)
                f, b = r["forward"], r["backward"]
                by = b["rank_accuracy_by_group"]
                rows.append([lang, preset, f"{wall:.0f}", f"{f['loss']:.3f}", f"{b['loss']:.3f}", f"{r['gap']:+.3f}",
                             f"{f['rank_accuracy']:.2f}", f"{b['rank_accuracy']:.2f}",
                             f"{by['name_first']:.2f} / {by['description_first']:.2f} / {by['both']:.2f}",
                             f"{r['chance']['name']:.3f}"])
    print_table(["lang", "model", "train s", "forward loss", "backward loss", "gap", "forward rank acc",
                 "backward rank acc", "backward by group (name-first / desc-first / both)", "chance"], rows)
    print(f"\n{load()} at the end")


BENCHES["reversal"] = bench_reversal


if __name__ == "__main__":
    main(BENCHES, __doc__)
