"""Benchmarks of memory beyond the window (memory.py) — the figures behind the README's memory section.

The same runner as bench.py (one thread, a small table each). Character-level Japanese (ja_aozora.txt,
whose works are separated by blank lines): the held-out works are the last 10% of the corpus.

    python bench_memory.py --list         # what there is
    python bench_memory.py memory         # llama vs infini at 177 s each, memory carried vs reset, RSS, speed
    python bench_memory.py memory-short   # 60 s each, generation RSS at 1k and 4k tokens (a loaded machine)
"""
import io
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout

import torch

import evaluate
from bench import JA_CORPUS, PRESET_BUDGET, PRESET_RECIPES, main, median_time, print_table, run_child, train_and_score
from checkpoint import load_run
from sample import generate

BENCHES = {}
RSS_TOKENS = (1_000, 10_000, 100_000)


def state_bytes(model):
    """Bytes of the carried memory per sequence (the float32 tensors and the bank counter)."""
    return sum(t.numel() * t.element_size() for t in model.get_memory_state().values())


def generation_tok_s(model, new_tokens=500, runs=3):
    """Tokens/s of generating from a 1-token prompt with the KV cache (median of `runs`)."""
    start, gen = torch.zeros(1, 1, dtype=torch.long), torch.Generator().manual_seed(0)

    return new_tokens / median_time(lambda: generate(model, start, new_tokens, generator=gen), runs)[0]


def bench_memory(budget=PRESET_BUDGET, rss_tokens=RSS_TOKENS, gen_tokens=500):
    """llama vs infini trained for the same time; infini's memory carried vs reset; state bytes, RSS, speed."""
    recipes = {"llama": [*PRESET_RECIPES["llama"]],
               "infini": [*PRESET_RECIPES["llama"], "--preset", "infini", "--sampler", "documents"]}
    runs, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe in recipes.items():
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                runs[name] = train_and_score([*recipe, "--data", JA_CORPUS, "--max-time", str(budget),
                                              "--eval-interval", "100000", "--eval-iters", "10"], f"{tmp}/{name}")
        model, tok, config = load_run(f"{tmp}/infini")
        text = evaluate.split_of(config, "heldout")
        reset = evaluate.evaluate_text(model, tok, text, config["block_size"], reset_memory=True)
        for name, r in runs.items():
            later = r.get("later_segments", {}).get("loss")
            rows.append([name, f"{r['model'].num_params():,}", r["steps"], f"{r['train_tokens'] / r['train_s']:,.0f}",
                         f"{generation_tok_s(r['model'].eval(), gen_tokens):,.0f}", f"{r['loss']:.4f}",
                         f"{r['bits_per_char']:.3f}", "" if later is None else f"{later:.4f}"])
        rows.append(["infini, memory reset each segment", "", "", "", "", f"{reset['loss']:.4f}",
                     f"{reset['bits_per_char']:.3f}", f"{reset['later_segments']['loss']:.4f}"])
        model.reset_memory()
        ids = torch.tensor([tok.encode(text[:20_000])])
        sizes = []
        for n in (128, 1280, 12800):
            model.reset_memory()
            with torch.no_grad():
                model(ids[:, :n])
            sizes.append(f"{state_bytes(model):,} after {n:,} tokens")
        rss = [run_child([sys.executable, "sample.py", "--run", f"{tmp}/infini", "--max-new-tokens", str(n),
                          "--prompt", "　"]) for n in rss_tokens]
    print(f"{budget:.0f} s of training each (evaluation excluded), one thread; generation {gen_tokens} tokens from a "
          f"1-token prompt; character-level ja_aozora.txt; "
          f"scored over the held-out works (last 10%), each read from its start in {config['block_size']}-token "
          f"segments (llama: the same non-overlapping blocks, no memory)\n")
    print_table(["model", "params", "steps", "train tokens/s", "generate tokens/s (KV cache)", "heldout loss",
                 "bits/char", "loss, segments after a work's first"], rows)
    print(f"\ninfini memory state per sequence: {'; '.join(sizes)} bytes")
    print_table(["tokens generated (sample.py, infini)", *map(lambda n: f"{n:,}", rss_tokens)],
                [["peak RSS (MB)", *(f"{mb:,.0f}" for mb in rss)]])
    print("targets: carried below reset by ≥ 0.01 nats on segments after the first; RSS flat in the tokens")


BENCHES["memory"] = bench_memory
BENCHES["memory-short"] = lambda: bench_memory(60.0, (1_000, 4_000), 200)
BENCHES["memory-short"].__doc__ = "the memory benchmark at 60 s per model, RSS at 1k and 4k tokens, for a loaded machine"

if __name__ == "__main__":
    main(BENCHES, __doc__)
