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

A model with memory (memory.py) reads each document (text between blank
lines) from its start, segment by segment, its memory carried from one segment
to the next and reset at each new document; `--reset-memory` scores the same
segments with the memory reset before each one, to see what the memory is worth.

`--check` runs the sanity checks a perplexity needs before it is believed: no
causal leak, a fresh model's loss near ln V, the train/val gap, and what the
loss means in bits per character for this run's tokenizer.

    python evaluate.py out/gpt --split test [--stride 32]
    python evaluate.py out/infini --split heldout [--reset-memory]
    python evaluate.py out/gpt --check
"""
import argparse
import math
import sys

import torch

from char_tokenizer import replace_unencodable_output
from checkpoint import build_model, load_run, read_metrics, resolve_run_dir
from dataset import (CACHE_DIR, as_tensor, encode_cached, parts_text, recorded_sources, resolve_paths, scan_source,
                     split_parts)
from memory import document_starts
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


@torch.no_grad()
def score_documents(model, ids, starts, segment, reset_memory=False, device="cpu"):
    """A model with memory: (total nats, targets, nats and targets of segments after a document's first).

    Document i holds ids[starts[i] : starts[i+1] + 1], so every target 1 … len(ids) − 1 is scored once;
    it is read in segments of `segment` tokens, the memory reset at its start (and before every segment
    with reset_memory).
    """
    ends = starts[1:].tolist() + [len(ids) - 1]
    total, count, later, later_count = 0.0, 0, 0.0, 0
    for begin, end in zip(starts.tolist(), ends):
        model.reset_memory()
        for s in range(begin, end, segment):
            if reset_memory:
                model.reset_memory()
            x, y = ids[s:min(s + segment, end)], ids[s + 1:min(s + segment, end) + 1]
            _, loss = model(x[None].long().to(device), y[None].long().to(device))
            nats = loss.item() * len(y)
            total, count = total + nats, count + len(y)
            if s > begin:
                later, later_count = later + nats, later_count + len(y)
    return total, count, later, later_count


def evaluate_text(model, tok, text, block_size, stride=None, batch_size=32, device="cpu", reset_memory=False):
    """Loss, perplexity and bits per character of `model` on `text` (a model with memory: document by document)."""
    ids = as_tensor(encode_cached(text, tok))
    if len(ids) < 2:
        raise ValueError(f"the split has {len(ids)} tokens: nothing to score")
    later = None
    if getattr(model, "has_memory", False):
        total, count, *later = score_documents(model, ids, document_starts(ids, tok), block_size, reset_memory,
                                               device)
    else:
        total, count = score(model, ids, block_size, stride, batch_size, device)
    chars = len(text) - len(tok.decode(ids[:1].tolist()))  # the first token is never a target
    loss = total / count
    result = {"loss": loss, "perplexity": math.exp(loss), "bits_per_char": total / chars / math.log(2),
              "tokens": count, "chars": chars}
    if later and later[1]:
        result["later_segments"] = {"loss": later[0] / later[1], "tokens": later[1]}
    return result


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


LEAK_TOLERANCE = 1e-4  # float32 rounding moves logits by ~1e-6; a leak moves them by far more
TABLE_LOSSES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


@torch.no_grad()
def causal_leak(model, idx):
    """How far any output at positions ≤ t moves when token t+1 alone changes (t at the start, middle and end of
    idx (1, T)): 0, to rounding, for a causal model. A model with memory starts each pass from a reset memory."""
    reset = getattr(model, "reset_memory", lambda: None)
    reset()
    base, _ = model(idx)  # (1, T, V)
    worst = 0.0
    for t in sorted({0, idx.shape[1] // 2, idx.shape[1] - 2}):
        changed = idx.clone()
        changed[0, t + 1] = (changed[0, t + 1] + 1) % base.shape[-1]
        reset()
        out, _ = model(changed)
        worst = max(worst, (out[:, :t + 1] - base[:, :t + 1]).abs().max().item())
    return worst


@torch.no_grad()
def fresh_loss(model_config, x, y, seed=0):
    """The loss of an untrained model of this configuration on (x, y): about ln V, since it knows nothing yet."""
    torch.manual_seed(seed)
    model = build_model(model_config).eval()
    return model(x, y)[1].item()


def bits_per_char(loss, chars_per_token):
    """What a loss in nats per token means per character: loss / ln 2 / chars per token.

    bits_per_char(1.61, 1.0) = 2.32 (a char model at perplexity 5: ordinary), bits_per_char(1.61, 4.0) = 0.58
    (a 50k-token BPE at perplexity 5 on English: better than any compressor, so suspicious)."""
    return loss / math.log(2) / chars_per_token


def sanity_checks(model, tok, config, run_dir, text, device="cpu"):
    """The findings of --check: [(ok, what was measured, what to look at when not ok)]."""
    ids = as_tensor(encode_cached(text, tok))
    T = min(config["block_size"], len(ids) - 1)
    x, y = ids[None, :T].long().to(device), ids[None, 1:T + 1].long().to(device)
    V, findings = config["model"]["vocab_size"], []
    leak = causal_leak(model, x)
    findings.append((leak < LEAK_TOLERANCE, f"causal leak: changing token t+1 moved outputs at ≤ t by {leak:.1e}",
                     "the model sees the future: look at the attention mask and every layer that mixes positions"))
    if config["model"].get("model", "transformer") == "transformer":
        fresh = fresh_loss(config["model"], x.cpu(), y.cpu())
        findings.append((abs(fresh - math.log(V)) < 0.1 * math.log(V),
                         f"initial loss: a fresh model of this config scores {fresh:.3f}, ln V = {math.log(V):.3f}",
                         "far above ln V: the initialisation is too large (look at _init_weights and the head); "
                         "far below: the targets leak into the inputs"))
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    train = [r["train_loss"] for r in rows if "train_loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    if train and val:
        gap = val[-1] - train[-1]
        findings.append((-0.1 < gap < 0.3, f"train/val gap: val {val[-1]:.4f} − train {train[-1]:.4f} = {gap:+.4f}",
                         "val far above train: overfitting (more data, dropout, --patience, a smaller model); "
                         "val below train: the splits overlap or val is easier text"))
        per_token = len(text) / len(ids)
        bpc = bits_per_char(val[-1], per_token)
        findings.append((bpc > 0.5, f"bits/char: val loss {val[-1]:.4f} = perplexity {math.exp(val[-1]):.2f} at "
                         f"{per_token:.2f} chars/token = {bpc:.3f} bits/char",
                         "under 0.5 bits/char is better than text allows at this scale: look for a causal leak "
                         "and for val text that is also in train"))
    return findings


def print_checks(findings, tok_kind, chars_per_token):
    for ok, measured, advice in findings:
        print(f"[{'ok' if ok else 'LOOK'}] {measured}" + ("" if ok else f"\n       -> {advice}"))
    print("\nwhat a loss means (bits/char = loss / ln 2 / chars per token); a perplexity rule such as "
          "'under 5 is suspicious' holds only for ~4 chars/token:")
    header = ["loss", "perplexity", "char (1 char/token)", f"this run: {tok_kind} ({chars_per_token:.2f})",
              "50k BPE, English (~4)"]
    print("  " + " | ".join(header))
    for loss in TABLE_LOSSES:
        cells = [f"{loss:.1f}", f"{math.exp(loss):.1f}"] + [f"{bits_per_char(loss, c):.3f}"
                                                           for c in (1.0, chars_per_token, 4.0)]
        print("  " + " | ".join(cell.rjust(len(h)) for cell, h in zip(cells, header)))


def main(argv=None):
    replace_unencodable_output()
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
    p.add_argument("--reset-memory", action="store_true", help="a model with memory: reset it before every "
                   "segment, to compare with the memory carried (the default)")
    p.add_argument("--check", action="store_true", help="run the sanity checks (causal leak, initial loss, "
                   "train/val gap, bits/char) instead of scoring")
    args = p.parse_args(argv)
    try:
        run_dir = resolve_run_dir(args.run)
        model, tok, config = load_run(run_dir, args.device, weights=f"{args.weights}.safetensors")
        block_size = config["block_size"]
        if args.stride is not None and not 0 < args.stride <= block_size:
            raise ValueError(f"--stride must be in 1..{block_size} (the block size), got {args.stride}")
        if args.stride is not None and getattr(model, "has_memory", False):
            raise ValueError("a model with memory reads whole documents segment by segment: drop --stride")
        device = next(model.parameters()).device
        sources = run_sources(config)
        text = split_of(config, args.split, sources)
        if args.check:
            findings = sanity_checks(model, tok, config, run_dir, text, device)
            print_checks(findings, config["tokenizer"], len(text) / len(encode_cached(text, tok)))
            return findings
        result = evaluate_text(model, tok, text, block_size, args.stride, args.batch_size, device, args.reset_memory)
        if len(sources) > 1:  # and each source's own part: its first token is context, not a target
            result["sources"] = {s.path: evaluate_text(model, tok, split_of(config, args.split, [s]), block_size,
                                                       args.stride, args.batch_size, device, args.reset_memory)
                                 for s in sources}
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    how = f"sliding window, stride {args.stride}" if args.stride else "non-overlapping blocks"
    if getattr(model, "has_memory", False):
        how = f"documents in segments of {block_size}, memory " + ("reset each segment" if args.reset_memory
                                                                   else "carried")
    print(f"{run_dir} on {args.split} ({result['tokens']:,} tokens, {result['chars']:,} chars; {how}):")
    print(f"  loss       {result['loss']:.4f} nats/token")
    print(f"  perplexity {result['perplexity']:.3f}")
    print(f"  bits/char  {result['bits_per_char']:.4f}")
    if "later_segments" in result:
        later = result["later_segments"]
        print(f"  segments after each document's first: loss {later['loss']:.4f} ({later['tokens']:,} tokens)")
    for path, r in result.get("sources", {}).items():
        print(f"  {path}: loss {r['loss']:.4f}, bits/char {r['bits_per_char']:.4f} "
              f"({r['tokens']:,} tokens, {r['chars']:,} chars)")
    if not args.no_samples:
        write_samples(model, tok, text, run_dir / "samples.txt")
        print(f"samples: {run_dir / 'samples.txt'}")
    return result


if __name__ == "__main__":
    main()
