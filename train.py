"""Stage 7 — the training command line: it composes every stage into one run.

    python train.py                                   # gpt preset on Tiny Shakespeare
    python train.py --model bigram --block-size 128 --batch-size 64 --steps 2000
    python train.py --preset llama --tokenizer bpe --vocab-size 1024 --out out/llama-bpe
    python train.py --resume out/llama-bpe            # continue exactly where it stopped
    python train.py --data notes/ books/*.txt chat.jsonl   # many sources: files, folders, globs
    torchrun --nproc_per_node=2 train.py ...          # data-parallel on 2 processes
    python train.py --preset llama --estimate         # parameters, FLOPs, memory and time of the run, then exit
    python train.py --config out/llama/config.json --out out/again   # that run's settings again
    python train.py --preset llama --batch-size 64 --lr-scaling sqrt  # --lr scaled to 4× the tokens per step

Every flag is built from a dataclass field (`TrainConfig` in training_loop.py,
`ModelConfig` in transformer.py), so `--help` lists every setting with its
default; `--config FILE.json` reads flags from a file (typed ones win). The resolved configuration, with
the precision (`--dtype auto`: float32 on CPU and MPS, bfloat16 or float16 on CUDA) and learning rates the
machine and batch led to, is printed and saved in the run directory.
"""
import argparse
import dataclasses
import hashlib
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import checkpoint as ckpt
from bigram_lm import BigramLM
from bpe_tokenizer import TOKENIZER_FILES, load_tokenizer, train_tokenizer
from checkpoint import add_dataclass_flags, flag, parse_flags, seed_everything
from dataset import (CACHE_DIR, DEFAULT_CORPUS, SAMPLE_WINDOWS, TOKENIZER_SAMPLE_CHARS, default_workers,
                     encode_parts, get_batch, parts_key, parts_text, recorded_sources, resolve_paths, sample_text,
                     scan_source, split_bounds, split_parts)
from memory import document_batches, document_starts
from training_loop import (LoopState, TrainConfig, choose_precision, device_capabilities, epoch_batches,
                           estimate_loss, flops_per_token, make_optimizer, memory_estimate, restore, run_command, saver,
                           scaled_lr, train_loop)
from transformer import PRESETS, ModelConfig, Transformer

# A bigram table learns from zero, one logit at a time: it wants a larger step and no decay.
BIGRAM_DEFAULTS = {"lr": 1e-2, "min_lr": 1e-3, "weight_decay": 0.0}
# fixed for a run's life (a resume that changes one refuses)
RUN_FLAGS = ("model", "preset", "data", "tokenizer", "vocab_size", "seed", "sampler", "optimizer")
# The tokens per optimizer step at which each preset's learning rate was chosen (batch × block): gpt's is
# nanoGPT's CPU recipe (12 × 64 at 1e-3), llama's and moe's bench.py's recipes (16 × 128 at 3e-3).
# --lr-scaling scales --lr from there to a run's batch × block × accumulation × processes.
REFERENCE_TOKENS = {"gpt": 12 * 64, "llama": 16 * 128, "moe": 16 * 128}


def build_parser(suppress=False):
    """The parser; with suppress=True it returns only the flags typed on the command line."""
    s = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS
                                if suppress else None, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Model flags default to the chosen preset's values.")
    run = p.add_argument_group("run")
    run.add_argument("--model", choices=["transformer", "bigram"], default=s("transformer"),
                     help="model family (default: %(default)s)")
    run.add_argument("--preset", default=s("gpt"), help=f"one of {', '.join(PRESETS)} (default: %(default)s)")
    run.add_argument("--data", nargs="+", metavar="PATH", default=s([DEFAULT_CORPUS]),
                     help="UTF-8 text: files, folders (every .txt/.jsonl below them) and globs; a .jsonl line "
                     "gives its \"text\"; each source splits 90/5/5 on its own (default: %(default)s, "
                     "downloaded when missing)")
    run.add_argument("--out", default=s(None), help="run directory (default: out/<preset> or out/bigram)")
    run.add_argument("--tokenizer", choices=list(TOKENIZER_FILES), default=s("char"),
                     help="char, own byte-level BPE, or sentencepiece (default: %(default)s)")
    run.add_argument("--vocab-size", type=int, default=s(1024), help="vocabulary size for bpe/spm "
                     "(default: %(default)s)")
    run.add_argument("--seed", type=int, default=s(1337), help="seed for every random number "
                     "(default: %(default)s)")
    run.add_argument("--device", default=s("auto"), help="auto | cpu | cuda | mps (default: %(default)s)")
    run.add_argument("--config", default=s(None), metavar="FILE.json", help="flags from a JSON file: "
                     "{\"lr\": 0.003, ...} or a run's config.json (it reproduces that run); flags typed win")
    run.add_argument("--compile", nargs="?", const="on", choices=["auto", "on", "off"], default=s("auto"),
                     help="torch.compile the model; auto: on CUDA GPUs that support it (default: %(default)s)")
    run.add_argument("--estimate", action="store_true", default=s(False), help="print the parameters, FLOPs, "
                     "memory and expected time of the run (from a few timed steps here), then exit")
    run.add_argument("--sampler", choices=["random", "epoch", "documents"], default=s("random"),
                     help="random-offset blocks (fast), shuffled epochs of whole blocks through a DataLoader, or "
                     "documents: each batch row reads its document on, for a memory (default: %(default)s)")
    run.add_argument("--threads", type=int, default=s(0), help="CPU threads per process; 0: one per core less "
                     "the cores other programs keep busy at the start (default: %(default)s)")
    run.add_argument("--workers", type=int, default=s(None), help="processes that tokenize the data, and "
                     "DataLoader workers for --sampler epoch (default: CPU count − 1, at most 4)")
    run.add_argument("--resume", default=s(None), metavar="DIR", help="continue the run in DIR")
    run.add_argument("--overwrite", action="store_true", default=s(False),
                     help="start afresh in an --out directory that already holds a run, replacing its files")
    add_dataclass_flags(p.add_argument_group("training"), TrainConfig, {}, suppress)
    model_defaults = {f.name: None for f in dataclasses.fields(ModelConfig)}
    add_dataclass_flags(p.add_argument_group("model (default: the chosen preset's value)"), ModelConfig,
                        model_defaults, suppress, skip=("vocab_size",), presets=PRESETS)  # tokenizer sets vocab
    return p


def tokenizer_text(kind, train_parts):
    """What the tokenizer learns from: for char every character of the training text (a set is cheap,
    and a character left out would become <unk>), for bpe and spm `dataset.sample_text`."""
    if kind != "char":
        return sample_text(train_parts)
    seen = set()
    for piece in parts_text(train_parts):
        seen.update(piece)
    return "".join(sorted(seen))


def check_sources_fit(sources, block_size):
    """Each source's 5% validation part (and so its test part) must hold one block plus its target."""
    for source in sources:
        _, (start, end), _ = split_bounds(source.chars)
        if end - start < block_size + 1:
            raise ValueError(f"{source.path} has {source.chars:,} characters: its validation part ({end - start}) "
                             f"is fewer than one block ({block_size + 1}); use more text or a smaller --block-size")


def cached_tokenizer(kind, train_parts, vocab_size):
    """Train a tokenizer on `tokenizer_text(kind, train_parts)`, or reuse the one trained before on the same
    parts and settings: the key names the parts (their sources' SHA-256 and ranges), so a second run on a
    large corpus reads none of its text again."""
    vocab_size = 0 if kind == "char" else vocab_size  # the char vocabulary is the text's
    settings = f"{kind}:{vocab_size}:{TOKENIZER_SAMPLE_CHARS}:{SAMPLE_WINDOWS}:".encode()
    path = CACHE_DIR / f"tokenizer-{hashlib.sha256(settings + parts_key(train_parts)).hexdigest()[:24]}-" \
                       f"{TOKENIZER_FILES[kind]}"
    if path.exists():
        print(f"reusing the {kind} tokenizer trained before ({path})")
        return load_tokenizer(path)
    tok = train_tokenizer(kind, tokenizer_text(kind, train_parts), vocab_size)
    ckpt.atomic_write(path, tok.save)
    return tok


def resolve_args(argv):
    """Flags, with a resumed run's saved settings under the ones typed now."""
    args, typed, overwrite = parse_flags(build_parser, argv)
    if args["resume"]:
        run_dir = ckpt.resolve_run_dir(args["resume"])
        config = ckpt.read_config(run_dir)
        saved = config["args"]
        if isinstance(saved.get("data"), str):  # a run from before --data took a list
            saved["data"] = [saved["data"]]
        check_resume_flags(typed, saved, config["model"], run_dir)
        # defaults first: a flag added since the run was saved takes its default
        args = {**args, **saved, **typed, "resume": str(run_dir), "out": str(run_dir)}
    if args["model"] == "bigram":
        args.update({k: v for k, v in BIGRAM_DEFAULTS.items() if k not in typed})
    if args["max_time"] and "steps" not in typed and not args["resume"]:
        args["steps"] = 10**12  # a time budget alone: --steps would only be a cap
    if args["preset"] not in PRESETS:
        raise ValueError(f"unknown preset {args['preset']!r}: choose one of {', '.join(PRESETS)}")
    if args["lr_scaling"] != "none" and (args["model"] != "transformer" or args["preset"] not in REFERENCE_TOKENS):
        what = "the bigram model" if args["model"] != "transformer" else f"preset {args['preset']}"
        raise ValueError(f"--lr-scaling {args['lr_scaling']}: {what} has no reference batch to scale from; "
                         f"use --lr-scaling none and choose --lr yourself")
    args["out"] = args["out"] or str(Path("out") / (args["preset"] if args["model"] == "transformer" else "bigram"))
    if not args["resume"] and not args["estimate"] and (Path(args["out"]) / ckpt.CONFIG).exists():
        if not overwrite:
            raise ValueError(f"{args['out']} already holds a run: continue it with --resume {args['out']}, "
                             f"or start it again with --overwrite (its files are replaced)")
        args["overwrite"] = True
    return args


def check_resume_flags(typed, saved, saved_model, run_dir):
    """A resumed run keeps its model and data: a typed flag that would change them is an error.

    Training flags (--steps, --max-time, --lr, --eval-interval, ...) may change; they are recorded.
    """
    fixed = {k: saved.get(k) for k in RUN_FLAGS}
    fixed.update({f.name: saved_model.get(f.name, saved.get(f.name)) for f in dataclasses.fields(ModelConfig)})
    if fixed["n_head"]:  # n_kv_head None or 0 means one key/value head per query head
        fixed["n_kv_head"] = fixed["n_kv_head"] or fixed["n_head"]
        typed = {**typed, "n_kv_head": typed.get("n_kv_head") or fixed["n_head"]} if "n_kv_head" in typed else typed
    for name, value in typed.items():
        if name in fixed and value != fixed[name]:
            raise ValueError(f"{flag(name)} {value} differs from the run's {fixed[name]}: --resume {run_dir} keeps "
                             f"the run's model and data; start a new run (--out) to change {flag(name)}")


def build_model(args, vocab_size):
    overrides = {f.name: args[f.name] for f in dataclasses.fields(ModelConfig)
                 if f.name != "vocab_size" and args.get(f.name) is not None}
    cfg = dataclasses.replace(PRESETS[args["preset"]], **overrides, vocab_size=vocab_size)
    if args["model"] == "bigram":
        return BigramLM(vocab_size), cfg.block_size
    return Transformer(cfg), cfg.block_size


def val_batches(ids, block_size, batch_size, n_batches, device):
    """A fixed set of validation batches: blocks spread evenly over the whole split."""
    n_blocks = (len(ids) - 1) // block_size
    if n_blocks < 1:
        raise ValueError(f"the validation split has {len(ids)} tokens, fewer than one block "
                         f"({block_size + 1}); use more text or a smaller --block-size")
    want = min(n_batches * batch_size, n_blocks)
    starts = torch.linspace(0, n_blocks - 1, want).long() * block_size  # (N,)
    index = starts[:, None] + torch.arange(block_size + 1)  # (N, 1) + (T+1,) -> (N, T+1)
    window = torch.from_numpy(ids[index.numpy()].astype(np.int64))  # read from the memmap: only these blocks
    xs, ys = window[:, :-1].to(device), window[:, 1:].to(device)
    return [(xs[i:i + batch_size], ys[i:i + batch_size]) for i in range(0, want, batch_size)]


def setup_distributed(device):
    """Join the torchrun process group when launched by torchrun; returns (device, rank, world size)."""
    if "RANK" not in os.environ:
        return device, 0, 1
    torch.distributed.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return device, torch.distributed.get_rank(), torch.distributed.get_world_size()


def batch_stream(args, ids, block_size, batch_size, rank, world, start, device, tok):
    """next_batch() for the loop, starting at micro-batch `start` (non-zero when resuming).

    Random offsets: micro-batch i of rank r is drawn from its own seed (seed, r, i), so a
    resumed run, or any rank, starts at batch i with no generator state to restore.
    Epochs: the DataLoader path of training_loop.epoch_batches, which skips to batch i itself.
    Documents: memory.document_batches, whose batch i is also a function of i (blank lines, in `tok`'s ids,
    split documents).
    """
    if args["sampler"] == "epoch":
        batches = epoch_batches(ids, block_size, batch_size, args["seed"], rank, world, start, args["workers"])
        return lambda: tuple(t.to(device) for t in next(batches))
    if args["sampler"] == "documents":
        starts = document_starts(ids, tok)
        batches = document_batches(ids, starts, block_size, batch_size, args["seed"], rank, world, start)
        return lambda: tuple(t.to(device) for t in next(batches))
    counter = iter(range(start, 2**62))
    generator = torch.Generator()

    def next_batch():
        generator.manual_seed(hash((args["seed"], rank, next(counter))))
        return get_batch(ids, block_size, batch_size, generator, device)
    return next_batch


def seconds_per_step(model, optimizer, cfg, next_batch, device_type, world_size=1, warmup=2, timed=8):
    """Seconds an optimizer step takes on this device, through the one training loop: `warmup` steps (memory,
    caches, compilation) and then the mean of `timed` more. It trains the model: --estimate exits after it."""
    quick = dataclasses.replace(cfg, steps=warmup, max_time=0.0, eval_interval=10**9, patience=0)
    probe = [next_batch()]  # the loop evaluates after its last step; this one batch keeps that short
    state = train_loop(model, optimizer, quick, next_batch, probe, device_type=device_type, is_main=False,
                       world_size=world_size)
    before = state.elapsed
    train_loop(model, optimizer, dataclasses.replace(quick, steps=warmup + timed), next_batch, probe, state=state,
               device_type=device_type, is_main=False, world_size=world_size)
    return (state.elapsed - before) / timed


def expected_seconds(cfg, step_seconds, eval_seconds):
    """How long a run takes: its steps (or --max-time), plus an evaluation every eval_interval steps and at the end."""
    steps = min(cfg.steps, cfg.max_time / step_seconds) if cfg.max_time else cfg.steps
    return steps * step_seconds + math.ceil(steps / cfg.eval_interval) * eval_seconds


def learning_rate_line(args, tcfg, tokens_per_step):
    """The learning rates the run uses, and how --lr-scaling got them."""
    line = f"learning rate {tcfg.lr:.3g} → {tcfg.min_lr:.3g}; {tokens_per_step:,} tokens per step"
    if tcfg.lr_scaling == "none":
        return line
    reference = REFERENCE_TOKENS[args["preset"]]
    return (line + f": --lr-scaling {tcfg.lr_scaling} from --lr {args['lr']:.3g} at the {args['preset']} preset's "
            f"{reference:,} (×{tokens_per_step / reference:.3g} tokens)")


def memory_line(model, tcfg, block_size):
    """Parameters, FLOPs per token and the memory a step holds (training_loop.memory_estimate)."""
    memory = memory_estimate(model, tcfg, block_size, tcfg.dtype)
    parts = ", ".join(f"{name} {value / 2**20:,.1f}" for name, value in memory.items())
    return (f"{sum(p.numel() for p in model.parameters()):,} parameters, {flops_per_token(model, block_size):,} "
            f"FLOPs per token; memory in MB: {parts} (batch {tcfg.batch_size} × {block_size}) = "
            f"{sum(memory.values()) / 2**20:,.1f}")


def process_memory():
    """This process's resident memory in bytes: now where /proc tells it (Linux), else its peak so far."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text(encoding="utf-8").split()[1]) * os.sysconf("SC_PAGE_SIZE")
    import resource  # not on Windows: there the device memory alone is estimated
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def estimate(model, net, optimizer, tcfg, next_batch, val_set, device_type, world, is_main):
    """--estimate: time a few steps of `net` (the model as trained: compiled, data-parallel) and one evaluation
    here, print what the whole run will take, and return it."""
    memory = memory_estimate(model, tcfg, val_set[0][0].shape[1], tcfg.dtype)
    now = process_memory() if device_type == "cpu" else 0
    step_s = seconds_per_step(net, optimizer, tcfg, next_batch, device_type, world)
    t0 = time.perf_counter()
    estimate_loss(net, val_set, device_type, tcfg.dtype)
    eval_s = time.perf_counter() - t0
    seconds = expected_seconds(tcfg, step_s, eval_s)
    result = {"seconds_per_step": step_s, "seconds_per_eval": eval_s, "seconds": seconds, "memory": memory,
              "peak_rss": now + memory["gradients"] + memory["optimizer"] + memory["activations"]}
    if is_main:
        took = f"{seconds:,.0f} s" if seconds < 120 else f"{seconds / 60:,.1f} min"
        rss = f"; peak process memory about {result['peak_rss'] / 2**20:,.0f} MB ({now / 2**20:,.0f} MB now)"
        print(f"estimate: {step_s * 1000:,.1f} ms per step and {eval_s:.2f} s per evaluation here: the run takes "
              f"about {took}" + (rss if now else ""))
    return result


def run(argv=None):
    """Train as the flags say; returns the final LoopState (with --estimate, the estimate's dict)."""
    args = resolve_args(argv)
    device, rank, world = setup_distributed(ckpt.pick_device(args["device"]))
    is_main, device_type = rank == 0, device.split(":")[0]
    threads = ckpt.set_cpu_threads(args["threads"]) if device_type == "cpu" else None
    tcfg = TrainConfig(**{f.name: args[f.name] for f in dataclasses.fields(TrainConfig)})
    tcfg.dtype, use_compile = choose_precision(device_type, *device_capabilities(device_type), tcfg.dtype,
                                               args["compile"])
    seed_everything(args["seed"] + rank)
    run_dir = Path(args["out"])

    saved = ckpt.read_config(run_dir) if args["resume"] else {}
    # A resumed run reads the very files it recorded, checked unchanged; a new one resolves --data.
    sources = recorded_sources(saved["data"], CACHE_DIR) if "data" in saved else [
        scan_source(p, CACHE_DIR) for p in resolve_paths(args["data"])]
    train_parts = split_parts(sources, 0)
    if args["resume"]:
        tok = load_tokenizer(run_dir / TOKENIZER_FILES[args["tokenizer"]])
        model, block_size = ckpt.build_model(saved["model"]), saved["block_size"]
    else:
        tok = cached_tokenizer(args["tokenizer"], train_parts, args["vocab_size"])
        model, block_size = build_model(args, tok.vocab_size)
    check_sources_fit(sources, block_size)
    # A memory model reads memory_segments segments of block_size per row and step, its memory carried through them.
    window = block_size * model.config.memory_segments if getattr(model, "has_memory", False) else block_size
    workers = default_workers() if args["workers"] is None else args["workers"]
    train_ids = encode_parts(train_parts, tok, workers=workers)  # a memmap, read in place by the batches
    val_ids = encode_parts(split_parts(sources, 1), tok, workers=workers)  # a memmap too: only N blocks are read
    if len(train_ids) < block_size + 1:
        raise ValueError(f"the training split has {len(train_ids)} tokens, fewer than one block "
                         f"({block_size + 1}); use more text or a smaller --block-size")
    tokens_per_step = tcfg.batch_size * block_size * tcfg.grad_accum * world
    if tcfg.lr_scaling != "none":
        tcfg.lr, tcfg.min_lr = scaled_lr(tcfg, tokens_per_step, REFERENCE_TOKENS[args["preset"]])
    model.to(device)
    optimizer = make_optimizer(model, tcfg, device_type)
    state = restore(run_dir, model, optimizer, is_main) if args["resume"] else LoopState()
    if is_main:
        if args.pop("overwrite", False) and not args["estimate"]:
            for name in (ckpt.METRICS, ckpt.WEIGHTS, ckpt.BEST_WEIGHTS, ckpt.STATE, "loss.png", "samples.txt"):
                (run_dir / name).unlink(missing_ok=True)
        config = {"model": ckpt.model_config_dict(model), "block_size": block_size, "tokenizer": args["tokenizer"],
                  "tokenizer_file": TOKENIZER_FILES[args["tokenizer"]], "args": args,
                  "data": [source.record() for source in sources],
                  "resolved": {"dtype": tcfg.dtype, "compile": use_compile, "lr": tcfg.lr, "min_lr": tcfg.min_lr,
                               "tokens_per_step": tokens_per_step}}
        if not args["estimate"]:
            ckpt.save_run_files(run_dir, config, tok, config["tokenizer_file"])
        unused = {"vocab_size"} if args["tokenizer"] == "char" else set()  # the char vocabulary is the text's
        print("config:", {k: v for k, v in args.items() if v is not None and k not in unused})
        print(f"{args['model']} model: {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"vocab {tok.vocab_size}; {len(train_ids):,} train tokens; device {device}, {tcfg.dtype}"
              + (f", {threads}" if threads else "") + "; "
              f"batch {tcfg.batch_size}×{tcfg.grad_accum} accum×{world} proc = "
              f"{tcfg.batch_size * tcfg.grad_accum * world} sequences of {block_size}"
              + (f"; resuming at step {state.step} of {tcfg.steps}" if args["resume"] else ""))
        print(learning_rate_line(args, tcfg, tokens_per_step) + "\n" + memory_line(model, tcfg, block_size))

    net = torch.compile(model) if use_compile else model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net)
    val_set = val_batches(val_ids, window, tcfg.batch_size, tcfg.eval_iters, device)
    report = getattr(model, "moe_report", None)
    next_batch = batch_stream(args, train_ids, window, tcfg.batch_size, rank, world, state.step * tcfg.grad_accum,
                              device, tok)
    if args["estimate"]:
        return estimate(model, net, optimizer, tcfg, next_batch, val_set, device_type, world, is_main)
    state = train_loop(net, optimizer, tcfg, next_batch, val_set, state=state, run_dir=run_dir,
                       save=saver(run_dir, model, optimizer), device_type=device_type, is_main=is_main,
                       world_size=world, on_eval=lambda m: report(val_set[0][0]) if report else {},
                       step_seed=lambda step: hash((args["seed"], rank, step, 0)))  # 4 numbers: not a batch seed
    if is_main:
        print(f"done: step {state.step}, best val loss {state.best_val:.4f}; weights in {run_dir}/\n"
              f"next: python sample.py --model-checkpoint {run_dir}")
    if world > 1:  # every rank waits for rank 0's last save, then all close gloo together: a rank
        torch.distributed.barrier()  # that exits while the other still talks to it can abort at exit
        torch.distributed.destroy_process_group()
    return state


def main(argv=None):
    run_command(run, argv)


if __name__ == "__main__":
    main()
