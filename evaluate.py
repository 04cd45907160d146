"""Stage 20 — evaluation: one honest number for a trained model.

Loss during training is estimated from a few batches; here we score every
token of a whole split. Three views of the same total:

    loss        = total nats / scored tokens            (what training minimises)
    perplexity  = exp(loss)                             ("choosing among N tokens")
    bits/char   = total nats / characters / ln 2        (compares any two tokenizers)

Blocks are non-overlapping by default, so the first tokens of each block are
predicted with little context. `--stride S` slides a full-length window by S
tokens and scores only its last S positions, so every token (after the first
block) sees block_size − S tokens of context at least: slower, and the honest
figure. Every target is scored exactly once either way.

A run trained on several sources (`train.py --data a.txt b.txt`) is scored on
the whole split and on each source's own part of it: a mixed Japanese and
English model shows how it does on each language.

    python evaluate.py out/gpt --split test [--stride 32]
"""
import argparse
import math
import sys

import torch

from checkpoint import load_run, resolve_run_dir
from dataset import (CACHE_DIR, as_tensor, encode_cached, parts_text, recorded_sources, resolve_paths, scan_source,
                     split_parts)
from sample import generate, prompt_ids

SPLITS = ("val", "test", "heldout")  # heldout = val + test: the last 10%, where nanoGPT validates
PARTS = {"val": (1,), "test": (2,), "heldout": (1, 2)}  # the parts of dataset.split_parts in each


def windows(n_tokens, block_size, stride):
    """Windows (start, end, first_new) covering targets 1 … n_tokens − 1 exactly once.

    A window's inputs are ids[start:end] and its targets ids[start+1:end+1]; only
    targets past `first_new` (an index into ids) are new. Every window is a full
    block (when the data allows) so that they batch together.
    >>> windows(10, 4, 4)
    [(0, 4, 0), (4, 8, 4), (5, 9, 8)]
    """
    T = min(block_size, n_tokens - 1)
    ends = list(range(T, n_tokens - 1, stride)) + [n_tokens - 1]
    out, prev_end = [], 0
    for end in ends:
        out.append((end - T, end, prev_end))
        prev_end = end
    return out


@torch.no_grad()
def score(model, ids, block_size, stride=None, batch_size=32, device="cpu"):
    """Total nats and number of scored targets over a 1-D tensor of token ids."""
    spans = windows(len(ids), block_size, stride or block_size)
    offsets = torch.arange(spans[0][1] - spans[0][0] + 1)  # (T+1,)
    total, count = 0.0, 0
    for i in range(0, len(spans), batch_size):
        chunk = torch.tensor(spans[i:i + batch_size])  # (b, 3): start, end, first_new
        window = ids[chunk[:, :1] + offsets].long()  # (b, 1) + (T+1,) -> (b, T+1)
        x, y = window[:, :-1], window[:, 1:].clone()
        target_index = chunk[:, :1] + 1 + offsets[:-1]  # (b, T) index of each target in ids
        y[target_index <= chunk[:, 2:3]] = -1  # already scored by an earlier window
        n = int((y >= 0).sum())
        getattr(model, "reset_memory", lambda: None)()  # every window starts afresh, as it would without memory
        _, loss = model(x.to(device), y.to(device))
        total += loss.item() * n
        count += n
    return total, count


def evaluate_text(model, tok, text, block_size, stride=None, batch_size=32, device="cpu"):
    """Loss, perplexity and bits per character of `model` on `text`."""
    ids = as_tensor(encode_cached(text, tok))
    if len(ids) < 2:
        raise ValueError(f"the split has {len(ids)} tokens: nothing to score")
    total, count = score(model, ids, block_size, stride, batch_size, device)
    chars = len(text) - len(tok.decode(ids[:1].tolist()))  # the first token is never a target
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_char": total / chars / math.log(2),
            "tokens": count, "chars": chars}


def run_sources(config):
    """The run's sources, checked unchanged; a run from before sources were recorded names its --data."""
    if "data" in config:
        return recorded_sources(config["data"], CACHE_DIR)
    return [scan_source(p, CACHE_DIR) for p in resolve_paths(config["args"]["data"])]


def split_of(config, split, sources=None):
    """The text of a split of the run's own corpus: every source's part of it, in --data order
    (heldout: all the val parts, then all the test parts, as one text)."""
    sources = run_sources(config) if sources is None else sources
    return "".join(parts_text([p for k in PARTS[split] for p in split_parts(sources, k)]))


def write_samples(model, tok, text, path, n=3, max_new_tokens=200, seed=0):
    """Continue `n` fixed prompts (line starts spread over `text`) and save them, to read side by side."""
    lines = [line for line in text.splitlines() if line.strip()]
    prompts = [lines[i * len(lines) // n][:24] for i in range(n)] if lines else [""]
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for prompt in prompts:
        idx = torch.tensor([prompt_ids(tok, prompt)], device=next(model.parameters()).device)
        out = generate(model, idx, max_new_tokens, temperature=0.8, top_k=50, generator=g)
        blocks.append(f"### prompt: {prompt!r}\n{tok.decode(out[0].tolist())}\n")
    path.write_text("\n".join(blocks), encoding="utf-8")


def main(argv=None):
    p = argparse.ArgumentParser(description="Score a trained run on a whole split.")
    p.add_argument("run", help="run directory (or a file in it)")
    p.add_argument("--split", choices=SPLITS, default="val", help="which part of the corpus (default: %(default)s)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: none, "
                   "non-overlapping blocks)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--weights", choices=["model", "best"], default="model", help="latest or best weights "
                   "(default: %(default)s)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | mps (default: %(default)s)")
    p.add_argument("--no-samples", action="store_true", help="do not write samples.txt")
    args = p.parse_args(argv)
    try:
        run_dir = resolve_run_dir(args.run)
        model, tok, config = load_run(run_dir, args.device, weights=f"{args.weights}.safetensors")
        block_size = config["block_size"]
        if args.stride is not None and not 0 < args.stride <= block_size:
            raise ValueError(f"--stride must be in 1..{block_size} (the block size), got {args.stride}")
        device = next(model.parameters()).device
        sources = run_sources(config)
        text = split_of(config, args.split, sources)
        result = evaluate_text(model, tok, text, block_size, args.stride, args.batch_size, device)
        if len(sources) > 1:  # and each source's own part: its first token is context, not a target
            result["sources"] = {s.path: evaluate_text(model, tok, split_of(config, args.split, [s]), block_size,
                                                       args.stride, args.batch_size, device) for s in sources}
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    how = f"sliding window, stride {args.stride}" if args.stride else "non-overlapping blocks"
    print(f"{run_dir} on {args.split} ({result['tokens']:,} tokens, {result['chars']:,} chars; {how}):")
    print(f"  loss       {result['loss']:.4f} nats/token")
    print(f"  perplexity {result['perplexity']:.3f}")
    print(f"  bits/char  {result['bits_per_char']:.4f}")
    for path, r in result.get("sources", {}).items():
        print(f"  {path}: loss {r['loss']:.4f}, bits/char {r['bits_per_char']:.4f} "
              f"({r['tokens']:,} tokens, {r['chars']:,} chars)")
    if not args.no_samples:
        write_samples(model, tok, text, run_dir / "samples.txt")
        print(f"samples: {run_dir / 'samples.txt'}")
    return result


if __name__ == "__main__":
    main()
