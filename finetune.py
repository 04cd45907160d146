"""Stage 25 — chat fine-tuning: teach a pretrained run to take turns.

    python finetune.py out/base --data dialogue_en.jsonl instructions_ja.jsonl --synthetic 4000 --out out/chat
    python finetune.py out/base --data chats.jsonl --out out/chat-lora --lora-rank 8 --lora-alpha 16
    python finetune.py --resume out/chat --steps 1200          # continue, or train longer
    python cli.py out/chat                                      # then talk to it

Pretraining taught the model text. Here it reads conversations written with
the chat template of chat_format.py and learns the assistant's part: the loss
is the model's own cross-entropy, with every target that is not the assistant's
content or its <|end|> set to −1, the index the loss ignores. The system and
user turns and the role tokens are context, never targets.

New since stage 7 (train.py): a run starts from another run. The base
tokenizer gains the four chat tokens and the model one embedding row each;
`--lora-rank R` trains low-rank adapters (lora.py) instead of every weight.
Everything else is train.py's: the one training loop, checkpoints, resume,
progress bar, metrics.jsonl and loss.png. The result is a run directory every
command loads (sample, evaluate, cli, server, export), with the adapters merged
into its weights and, for LoRA, kept apart in `adapter/` too.

`--synthetic N` adds N generated conversations in English and Japanese that
make the dialogue measurable: invented facts asked in fixed phrasings (other
phrasings are kept for testing, see `synthetic_probes`) and two-turn name
recall ("My name is Aiko." … "What is my name?").
"""
import argparse
import copy
import dataclasses
import hashlib
import random
from pathlib import Path

import torch

import checkpoint as ckpt
from bpe_tokenizer import TOKENIZER_FILES
from chat_format import add_chat_tokens, encode_chat, pack_chats, read_chats
from checkpoint import add_dataclass_flags, flag, parse_flags, seed_everything
from lora import add_lora, lora_modules, merge_lora, save_adapter, train_rows
from training_loop import (LoopState, TrainConfig, choose_precision, device_capabilities, make_optimizer, restore,
                           run_command, saver, scaled_lr, train_loop)
from transformer import Transformer

# Measured on the README's chat recipe (5 minutes of fine-tuning on one thread): a peak of 3e-3, pretraining's, beat
# 1e-3 (held-out assistant loss 1.79 against 2.09 after 300 steps), and batches of 8 (1,300 steps) beat 16 (560
# steps): held-out 3.97 against 4.08, Japanese facts 99 % against 76 %, name recall 98/94 % against 92/76 %. A short
# warm-up; no weight decay, which would pull the pretrained weights toward zero rather than toward anything the
# chats teach (nanochat's SFT uses none either).
FINETUNE_DEFAULTS = {"steps": 1300, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 30, "weight_decay": 0.0,
                     "batch_size": 8, "eval_interval": 100, "eval_iters": 10}
# LoRA's own peak: its update B·A starts at zero and moves only through two thin matrices, so at full fine-tuning's
# 3e-3 it lags (the 4,096-piece chat recipe, 1,300 steps: held-out 4.76 against full fine-tuning's 3.97). Measured on
# that recipe with 500 English chit-chat conversations (full fine-tuning: 3.80): 1e-2 reaches 4.48 at step 1,300, and
# 3e-2 diverges (6.22 at step 200 against 4.85); on README §11's 8,192-piece recipe 7e-3, 1e-2 and 1.5e-2 end within
# 3 % of each other (5.13, 5.17, 5.25). Used when --lora-rank is given and --lr / --min-lr are not.
LORA_DEFAULTS = {"lr": 1e-2, "min_lr": 1e-3}
RUN_FLAGS = ("base", "data", "synthetic", "max_chats", "reply_lines", "heldout", "seed", "from_scratch",
             "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_rows")  # fixed for a run's life


def build_parser(suppress=False):
    """The parser; with suppress=True it returns only the flags typed on the command line."""
    s = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS
                                if suppress else None, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", nargs="?", default=s(None), help="the run directory to start from (a train.py run)")
    run = p.add_argument_group("run")
    run.add_argument("--data", nargs="+", metavar="FILE", default=s([]), help="chat JSONL files: one conversation "
                     "a line, {\"messages\": [...]}, {\"instruction\", \"input\", \"output\"} or {\"prompt\", "
                     "\"completion\"}")
    run.add_argument("--synthetic", type=int, default=s(0), metavar="N", help="add N generated conversations "
                     "(facts and name recall, English and Japanese) (default: %(default)s)")
    run.add_argument("--max-chats", type=int, nargs="+", default=s([0]), metavar="N", help="train on at most N "
                     "conversations of each file, drawn by --seed: balances large and small files; one N for "
                     "every file or one per --data file, in order (default: 0, all)")
    run.add_argument("--reply-lines", type=int, nargs="+", default=s([0]), metavar="N", help="cut each training "
                     "reply of a file to its first N non-empty lines (held-out replies stay whole): for chat logs "
                     "whose turns join several messages; one N for every file or one per --data file "
                     "(default: 0, whole replies)")
    run.add_argument("--heldout", type=float, default=s(0.05), help="fraction of each file's conversations held "
                     "out to measure the assistant loss on (default: %(default)s)")
    run.add_argument("--out", default=s(None), help="run directory to write (default: out/chat)")
    run.add_argument("--resume", default=s(None), metavar="DIR", help="continue the fine-tuning run in DIR")
    run.add_argument("--config", default=s(None), metavar="FILE.json", help="flags from a JSON file: "
                     "{\"lr\": 0.003, ...} or a run's config.json (it reproduces that run); flags typed win")
    run.add_argument("--overwrite", action="store_true", default=s(False), help="start afresh in an --out "
                     "directory that already holds a run")
    run.add_argument("--seed", type=int, default=s(1337), help="seed for the split, batches and adapters "
                     "(default: %(default)s)")
    run.add_argument("--device", default=s("auto"), help="auto | cpu | cuda | mps (default: %(default)s)")
    run.add_argument("--threads", type=int, default=s(0), help="CPU threads; 0: one per core less the cores other "
                     "programs keep busy at the start (default: %(default)s)")
    run.add_argument("--from-scratch", action="store_true", default=s(False), help="start from random weights of "
                     "the base's shape and tokenizer: the baseline that shows what pretraining is worth")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora-rank", type=int, default=s(0), help="rank of the adapters; 0 fine-tunes every "
                      f"weight (default: %(default)s); with a rank, --lr and --min-lr default to {LORA_DEFAULTS['lr']} "
                      f"and {LORA_DEFAULTS['min_lr']}")
    lora.add_argument("--lora-alpha", type=float, default=s(16.0), help="adapter scale alpha: the update is "
                      "B·A·x · alpha/rank (default: %(default)s)")
    lora.add_argument("--lora-dropout", type=float, default=s(0.0), help="dropout on the adapter path "
                      "(default: %(default)s)")
    lora.add_argument("--lora-targets", nargs="+", default=s(["qkv", "out_proj"]), metavar="NAME",
                      help="Linear layers to adapt, by name (default: %(default)s)")
    lora.add_argument("--lora-rows", type=int, default=s(0), metavar="N", help="also train the embedding rows (tied: "
                      "the head's too) of the N tokens most frequent in the training conversations; the chat "
                      "tokens' rows always train (default: %(default)s)")
    add_dataclass_flags(p.add_argument_group("training"), TrainConfig, FINETUNE_DEFAULTS, suppress)
    return p


def resolve_args(argv):
    """Flags, with a resumed run's saved settings under the ones typed now (only training flags may change)."""
    args, typed, overwrite = parse_flags(build_parser, argv)
    if args["resume"]:
        run_dir = ckpt.resolve_run_dir(args["resume"])
        saved = {"reply_lines": [0], "lora_rows": 0, **ckpt.read_config(run_dir)["args"]}  # older runs' defaults
        for name in RUN_FLAGS:
            if name in typed and typed[name] != saved[name]:
                raise ValueError(f"{flag(name)} {typed[name]} differs from the run's {saved[name]}: --resume "
                                 f"{run_dir} keeps its base, data and adapters; start a new run (--out) to change it")
        return {**args, **saved, **typed, "resume": str(run_dir), "out": str(run_dir)}  # new flags: defaults
    if not args["base"]:
        raise ValueError("give the base run to fine-tune (python finetune.py out/base --data chats.jsonl ...), "
                         "or --resume a fine-tuning run")
    if not args["data"] and not args["synthetic"]:
        raise ValueError("no conversations: give --data FILE [FILE ...] and/or --synthetic N")
    if args["lora_rank"] < 0:
        raise ValueError(f"--lora-rank must be 0 (full fine-tuning) or a positive rank, got {args['lora_rank']}")
    if args["lora_rows"] < 0 or (args["lora_rows"] and not args["lora_rank"]):
        raise ValueError(f"--lora-rows {args['lora_rows']}: give N >= 0 with a --lora-rank (full fine-tuning "
                         f"trains every row)")
    if args["lora_rank"] and args["weight_decay"]:
        raise ValueError("--weight-decay with --lora-rank would also shrink the base's embedding rows, which LoRA "
                         "keeps fixed: use --weight-decay 0")
    if not 0 <= args["heldout"] < 1 or min(args["synthetic"], *args["max_chats"], *args["reply_lines"]) < 0:
        raise ValueError(f"need 0 <= --heldout < 1 and --synthetic, --max-chats, --reply-lines >= 0, got "
                         f"{args['heldout']}, {args['synthetic']}, {args['max_chats']}, {args['reply_lines']}")
    for name in ("max_chats", "reply_lines"):
        if len(args[name]) not in (1, len(args["data"])):
            raise ValueError(f"{flag(name)} takes one count for every file or one per file: {len(args[name])} "
                             f"counts for {len(args['data'])} --data files")
    if args["lora_rank"]:
        args.update({name: value for name, value in LORA_DEFAULTS.items() if name not in typed})
    if args["max_time"] and "steps" not in typed:
        args["steps"] = 10**12  # a time budget alone, as in train.py: --steps would only be a cap
    args["out"] = args["out"] or str(Path("out") / "chat")
    if (Path(args["out"]) / ckpt.CONFIG).exists():
        if not overwrite:
            raise ValueError(f"{args['out']} already holds a run: continue it with --resume {args['out']}, "
                             f"or start it again with --overwrite (its files are replaced)")
        args["overwrite"] = True
    return args


# --- The base model, grown by the chat tokens -----------------------------------------------------------------

def load_base(base, device):
    """The base run's model, tokenizer and config; a run that cannot be fine-tuned is a ValueError."""
    model, tok, config = ckpt.load_run(base, device)
    if not isinstance(model, Transformer):
        raise ValueError(f"{base} is a bigram run: a table of next-token logits has no context to hold a "
                         f"conversation; fine-tune a transformer run (python train.py --preset llama)")
    if config.get("quantization"):
        raise ValueError(f"{base} is a quantized run: fine-tune the float run it was made from")
    return model, tok, config


def grow_vocab(model, vocab_size):
    """A copy of `model` with `vocab_size` token rows: the old rows kept, each new one the mean of the old.

    Why the mean: with the head tied to the embedding, a new token's logit is then h·mean(e) = the mean of the
    old logits, so at the start it is as likely as an average token: the old tokens' distribution barely moves
    and nothing has to be unlearned (a zero row gives logit 0, which may tower over a distribution of negative
    logits; a random row, an arbitrary one). As an input it is a point amid the vectors the layers know.
    Every old token keeps its logit exactly: test_finetune checks it.
    """
    grown = Transformer(dataclasses.replace(model.config, vocab_size=vocab_size)).to(model.head.weight.device)
    state = model.state_dict()
    for name in ("embed.tok.weight", "head.weight"):  # tied: the same matrix twice, grown alike
        old = state[name]
        state[name] = torch.cat([old, old.mean(0, keepdim=True).expand(vocab_size - len(old), -1)])  # (V', C)
    grown.load_state_dict(state)
    return grown


def trained_rows(x, n_old, vocab_size, k):
    """The rows a LoRA run trains: the k old tokens most frequent in the training blocks x (ties: the lower id first),
    then the chat tokens' (n_old …). x [[5, 5, 2, 7, 2, 5]], n_old 8, vocab_size 12, k 2 -> [5, 2, 8, 9, 10, 11]."""
    counts = torch.bincount(x.flatten(), minlength=vocab_size)[:n_old]
    return torch.cat([torch.argsort(counts, descending=True, stable=True)[:k], torch.arange(n_old, vocab_size)])


def add_adapters(model, args, rows):
    """LoRA on `args["lora_targets"]`, every base weight frozen but the embedding rows `rows` (ids, 1-D).

    The chat tokens' rows start equal (the mean): frozen, <|end|> and <|user|> would stay the same vector and the
    same logit, so they always train; frequent tokens' rows (--lora-rows) let the tied embedding and head adapt,
    which adapters in the blocks cannot (README §11). Returns the number of trainable values."""
    add_lora(model, rank=args["lora_rank"], alpha=args["lora_alpha"], dropout=args["lora_dropout"],
             targets=tuple(args["lora_targets"]))
    adapters = sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_modules(model).values())
    return adapters + train_rows(model, rows)


def merged_weights(run_dir):
    """weights_of for the saver of a LoRA run: the adapters saved apart, then a merged copy for model.safetensors."""
    def weights_of(model):
        save_adapter(model, run_dir / "adapter")
        return merge_lora(copy.deepcopy(model))
    return weights_of


# --- Conversations: split, encode, pack, batch ------------------------------------------------------------------

def file_record(path):
    """What config.json keeps of a chat file: enough to tell on resume that it is unchanged."""
    data = Path(path).read_bytes()
    return {"path": str(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def split(chats, fraction):
    """(train, held_out): the first `fraction` of `chats` held out (at least one when there are two or more)."""
    n_held = max(1, round(len(chats) * fraction)) if fraction and len(chats) > 1 else 0
    return chats[n_held:], chats[:n_held]


def first_lines(messages, n):
    """The conversation with each assistant reply cut to its first n non-empty lines (n = 0: whole)."""
    def cut(text):
        return "\n".join([line for line in text.split("\n") if line.strip()][:n])
    return [{**m, "content": cut(m["content"])} if n and m["role"] == "assistant" else m for m in messages]


def load_chats(args):
    """(train, held_out) conversations: each file's shuffled by --seed and split, its training part cut to
    its --max-chats count and its training replies to --reply-lines, so that every source is represented in both
    parts; then the --synthetic set, split too."""
    def of_file(values, k):  # one value for every file, or one per file; an int in older runs
        values = values if isinstance(values, list) else [values]
        return values[k if len(values) > 1 else 0]
    parts = []
    for k, path in enumerate(args["data"]):
        chats = read_chats(path)
        random.Random(f"{args['seed']}/{k}").shuffle(chats)
        train, held_out = split(chats, args["heldout"])
        lines = of_file(args.get("reply_lines", 0), k)  # runs from before --reply-lines kept whole replies
        parts.append(([first_lines(m, lines) for m in train[:of_file(args["max_chats"], k) or None]], held_out))
    parts.append(split(synthetic_chats(args["synthetic"], args["seed"]), args["heldout"]))  # drawn at random
    return [m for train, _ in parts for m in train], [m for _, held_out in parts for m in held_out]


def target_blocks(tok, chats, block_size):
    """Conversations packed into blocks: x (N, T) ids and y (N, T) targets, −1 wherever the mask is off.

    A block holding no target is dropped: its mean loss would be 0/0.
    """
    ids, mask = pack_chats([encode_chat(tok, messages) for messages in chats], block_size)
    ids = torch.tensor(ids)
    targets = torch.where(torch.tensor(mask), ids, -1)  # only the assistant's tokens are ever predicted
    n = (len(ids) - 1) // block_size
    if n < 1:
        raise ValueError(f"the conversations make {len(ids)} tokens, fewer than one block ({block_size + 1}): "
                         f"give more data")
    index = torch.arange(n)[:, None] * block_size + torch.arange(block_size + 1)  # (N, T+1)
    x, y = ids[index[:, :-1]], targets[index[:, 1:]]  # (N, T) each: y is x shifted by one, masked
    keep = (y >= 0).any(dim=1)
    return x[keep], y[keep]


def batch_stream(x, y, batch_size, seed, start, device):
    """next_batch() for the loop: micro-batch i draws its blocks from its own seed (seed, i), so a resumed run
    starts at batch `start` with no generator state to restore (as train.py's random sampler)."""
    counter = iter(range(start, 2**62))
    generator = torch.Generator()

    def next_batch():
        generator.manual_seed(hash((seed, next(counter))))
        rows = torch.randint(len(x), (batch_size,), generator=generator)  # (B,)
        return x[rows].to(device), y[rows].to(device)
    return next_batch


def heldout_batches(x, y, batch_size, n_batches, device):
    """A fixed set of held-out batches: blocks spread evenly over the held-out conversations."""
    rows = torch.linspace(0, len(x) - 1, min(len(x), batch_size * n_batches)).long()  # (N,)
    xs, ys = x[rows].to(device), y[rows].to(device)
    return [(xs[i:i + batch_size], ys[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


# --- The run -----------------------------------------------------------------------------------------------------

def prepare(args, device):
    """The model to train (grown by the chat tokens), its tokenizer, the base's config and the base's vocab size."""
    model, tok, base_config = load_base(args["base"], device)
    n_old, tok = tok.vocab_size, add_chat_tokens(tok)
    if args["from_scratch"]:
        model = Transformer(model.config)  # the same shape, random weights
    return grow_vocab(model, tok.vocab_size), tok, base_config, n_old


def adapt(model, args, n_old, x):
    """A LoRA run's adapters on `model` (its rows drawn from the training blocks x); a note on what trains."""
    total = model.num_params()
    if not args["lora_rank"]:
        return f"full fine-tuning: {total:,} parameters"
    trainable = add_adapters(model, args, trained_rows(x, n_old, model.config.vocab_size, args["lora_rows"]))
    return f"LoRA rank {args['lora_rank']}: {trainable:,} of {total:,} values trained ({trainable / total:.2%})"


def run(argv=None):
    """Fine-tune as the flags say; returns the final LoopState."""
    args = resolve_args(argv)
    device = ckpt.pick_device(args["device"])
    threads = ckpt.set_cpu_threads(args["threads"]) if device == "cpu" else None
    tcfg = TrainConfig(**{f.name: args[f.name] for f in dataclasses.fields(TrainConfig)})
    tcfg.dtype, _ = choose_precision(device, *device_capabilities(device), tcfg.dtype, "off")
    seed_everything(args["seed"])
    run_dir = Path(args["out"])
    if args["resume"]:  # the very files the run began with
        for record in ckpt.read_config(run_dir)["chat_data"]:
            if file_record(record["path"])["sha256"] != record["sha256"]:
                raise ValueError(f"{record['path']} changed since the run began: restore it, or start a new run")
    model, tok, base_config, n_old = prepare(args, "cpu")
    block_size = model.config.block_size
    if tcfg.lr_scaling != "none":  # the defaults were measured at FINETUNE_DEFAULTS' batch of whole blocks
        tcfg.lr, tcfg.min_lr = scaled_lr(tcfg, tcfg.batch_size * tcfg.grad_accum * block_size,
                                         FINETUNE_DEFAULTS["batch_size"] * block_size)
    train_chats, held_out = load_chats(args)
    x, y = target_blocks(tok, train_chats, block_size)
    note = adapt(model, args, n_old, x)
    val_set = heldout_batches(*target_blocks(tok, held_out or train_chats, block_size), tcfg.batch_size,
                              tcfg.eval_iters, device)
    model.to(device)
    optimizer = make_optimizer(model, tcfg, device)
    state = restore(run_dir, model, optimizer, True) if args["resume"] else LoopState()
    if args.pop("overwrite", False):
        for name in (ckpt.METRICS, ckpt.WEIGHTS, ckpt.BEST_WEIGHTS, ckpt.STATE, "loss.png"):
            (run_dir / name).unlink(missing_ok=True)
    config = {"model": ckpt.model_config_dict(model), "block_size": block_size, "tokenizer": tok.kind,
              "tokenizer_file": TOKENIZER_FILES[tok.kind], "args": args, "base": str(args["base"]),
              "data": base_config.get("data", []), "chat_data": [file_record(p) for p in args["data"]],
              "resolved": {"dtype": tcfg.dtype, "lr": tcfg.lr, "min_lr": tcfg.min_lr}}
    ckpt.save_run_files(run_dir, config, tok, config["tokenizer_file"])
    print(f"{note}; vocab {tok.vocab_size} with the chat tokens; {len(train_chats):,} conversations in "
          f"{len(x):,} blocks of {block_size}, {len(held_out):,} held out; device {device}, {tcfg.dtype}"
          + (f", {threads}" if threads else "") + "; "
          f"learning rate {tcfg.lr:.3g} → {tcfg.min_lr:.3g}"
          + (f"; resuming at step {state.step} of {tcfg.steps}" if args["resume"] else ""))
    state = train_loop(model, optimizer, tcfg, batch_stream(x, y, tcfg.batch_size, args["seed"],
                                                            state.step * tcfg.grad_accum, device),
                       val_set, state=state, run_dir=run_dir, device_type=device,
                       save=saver(run_dir, model, optimizer, merged_weights(run_dir) if args["lora_rank"] else None),
                       step_seed=lambda step: hash((args["seed"], 0, step, 0)))
    print(f"done: step {state.step}, best held-out assistant loss {state.best_val:.4f}; run in {run_dir}/\n"
          f"next: python cli.py {run_dir}")
    return state


# --- Synthetic conversations ---------------------------------------------------------------------------------------
LANGS = ("en", "ja")
# Invented countries, so that no fact can come from pretraining: each has a capital (its own invented name), a
# flag colour, a national animal, a founding year and a population. The numbers teach a reply to end after one: the
# Japanese instructions alone left greedy replies looping on digits ("1000000…"). Questions are asked in TRAIN
# phrasings in the training set; HELD_OUT phrasings are kept for testing whether a fact was learnt, not a sentence.
COUNTRIES = {
    "en": "Arvenia Belmora Caldris Dunmere Eskaria Falmont Galvane Harrowen Istoria Jorvane Kelvane Lorsica".split(),
    "ja": "アルベニア ベルモラ カルドリス ダンメア エスカリア ファルモン ガルバネ ハロウェン イストリア ヨルバネ ケルバネ ロルシカ".split(),
}
CAPITALS = {
    "en": "Dalst Merrow Quillon Tavish Brennet Corvin Elsby Farrow Gullane Hesk Ivel Jarrow".split(),
    "ja": "ダルスト メロウ クイロン タビシュ ブレネット コルビン エルスビー ファロウ ガレーン ヘスク イベル ジャロウ".split(),
}
COLOURS = {"en": "red blue green yellow white black orange purple".split(),
           "ja": "赤 青 緑 黄色 白 黒 オレンジ 紫".split()}
ANIMALS = {"en": "fox owl bear wolf deer hawk otter swan horse lion".split(),
           "ja": "キツネ フクロウ クマ オオカミ シカ タカ カワウソ ハクチョウ ウマ ライオン".split()}
FACT_TEMPLATES = {  # (lang, attribute): (answer, TRAIN questions, HELD_OUT questions); {c} country, {v} value
    ("en", "capital"): ("The capital of {c} is {v}.", ("What is the capital of {c}?",
                        "Which city is the capital of {c}?", "Tell me the capital of {c}.",
                        "Can you tell me the capital of {c}?", "What is {c}'s capital?",
                        "I'd like to know the capital of {c}.", "What city is the capital of {c}?"),
                        ("Do you know the capital of {c}?", "Name the capital of {c}, please.")),
    ("en", "flag"): ("The flag of {c} is {v}.", ("What colour is the flag of {c}?",
                     "What is the colour of the flag of {c}?", "Tell me the colour of the flag of {c}.",
                     "Can you tell me the colour of the flag of {c}?", "What colour is {c}'s flag?",
                     "I'd like to know the colour of the flag of {c}.", "What colour does the flag of {c} have?"),
                     ("Do you know the colour of the flag of {c}?", "Which colour is the flag of {c}?")),
    ("en", "animal"): ("The national animal of {c} is the {v}.", ("What is the national animal of {c}?",
                       "Which animal is the national animal of {c}?", "Tell me the national animal of {c}.",
                       "Can you tell me the national animal of {c}?", "What is {c}'s national animal?",
                       "I'd like to know the national animal of {c}.", "What animal is the national animal of {c}?"),
                       ("Do you know the national animal of {c}?", "Name the national animal of {c}, please.")),
    ("ja", "capital"): ("{c}の首都は{v}です。", ("{c}の首都はどこですか？", "{c}の首都はどの町ですか？",
                        "{c}の首都を教えてください。", "{c}の首都を教えてくれますか？", "{c}の首都はなんという町ですか？",
                        "{c}の首都について教えて。", "{c}で首都になっている町はどこですか？"),
                        ("{c}の首都を知っていますか？", "{c}の首都はどこでしょうか？")),
    ("ja", "flag"): ("{c}の国旗は{v}です。", ("{c}の国旗は何色ですか？", "{c}の国旗の色は何ですか？",
                     "{c}の国旗の色を教えてください。", "{c}の国旗の色を教えてくれますか？", "{c}の国旗はどんな色ですか？",
                     "{c}の国旗の色について教えて。", "{c}の国旗には何色が使われていますか？"),
                     ("{c}の国旗の色を知っていますか？", "{c}の国旗は何色でしょうか？")),
    ("ja", "animal"): ("{c}の国の動物は{v}です。", ("{c}の国の動物は何ですか？", "{c}の国の動物はどの動物ですか？",
                       "{c}の国の動物を教えてください。", "{c}の国の動物を教えてくれますか？", "{c}の国の動物はなんですか？",
                       "{c}の国の動物について教えて。", "{c}ではどの動物が国の動物ですか？"),
                       ("{c}の国の動物を知っていますか？", "{c}の国の動物は何でしょうか？")),
    ("en", "founded"): ("{c} was founded in {v}.", ("When was {c} founded?", "In which year was {c} founded?",
                        "Tell me the year {c} was founded.", "Can you tell me when {c} was founded?",
                        "What year was {c} founded?", "I'd like to know when {c} was founded.",
                        "What is the founding year of {c}?"),
                        ("Do you know when {c} was founded?", "Name the year {c} was founded, please.")),
    ("en", "population"): ("The population of {c} is {v}.", ("What is the population of {c}?",
                           "How many people live in {c}?", "Tell me the population of {c}.",
                           "Can you tell me the population of {c}?", "What is {c}'s population?",
                           "I'd like to know the population of {c}.", "How many people does {c} have?"),
                           ("Do you know the population of {c}?", "Name the population of {c}, please.")),
    ("ja", "founded"): ("{c}が建国されたのは{v}年です。", ("{c}はいつ建国されましたか？", "{c}は何年に建国されましたか？",
                        "{c}が建国された年を教えてください。", "{c}が建国された年を教えてくれますか？",
                        "{c}の建国は何年ですか？", "{c}の建国について教えて。", "{c}ができたのは何年ですか？"),
                        ("{c}がいつ建国されたか知っていますか？", "{c}が建国されたのは何年でしょうか？")),
    ("ja", "population"): ("{c}の人口は{v}人です。", ("{c}の人口は何人ですか？", "{c}には何人が住んでいますか？",
                           "{c}の人口を教えてください。", "{c}の人口を教えてくれますか？", "{c}の人口はどのくらいですか？",
                           "{c}の人口について教えて。", "{c}に住んでいる人は何人ですか？"),
                           ("{c}の人口を知っていますか？", "{c}の人口は何人でしょうか？")),
}
NAMES = {
    "en": ("Aiko Ben Clara David Emma Farid Grace Hugo Isla Jack Kenji Lena Mateo Nora Oscar Priya Quinn Rosa Sam "
           "Tara Umar Vera Will Yusuf Zoe Alice Bruno Chloe Diego Elena Felix Hana Ivan Julia Leo Maya Noah Olivia "
           "Ruth Sofia").split(),
    "ja": ("愛子 健太 さくら 翔太 陽菜 大輝 美咲 蓮 結衣 悠斗 アイコ ケン はるか ゆうき 花子 太郎 美優 拓海 葵 "
           "湊 ひなた まこと リナ ソウタ 千尋 直樹 真由美 和也 恵 隆 由美 浩二 あかり そら ミキ ユウ 翼 光 "
           "純一 桃子").split(),
}
NAME_TURNS = {  # introductions, the assistant's greeting, the question, the answer; {n} the user's name
    "en": (("My name is {n}.", "I'm {n}.", "Hi, I am {n}.", "Call me {n}."), "Nice to meet you, {n}.",
           ("What is my name?", "What's my name?", "Do you remember my name?"), "Your name is {n}."),
    "ja": (("私の名前は{n}です。", "{n}といいます。", "こんにちは、{n}です。", "{n}と呼んでください。"),
           "はじめまして、{n}さん。", ("私の名前は何ですか？", "私の名前を覚えていますか？", "私の名前は？"),
           "あなたの名前は{n}です。"),
}


def facts(lang):
    """Every fact of a language as (attribute, country, value), the same for every seed."""
    rng = random.Random(0)
    return [(attribute, country, value) for i, country in enumerate(COUNTRIES[lang]) for attribute, value in
            (("capital", CAPITALS[lang][i]), ("flag", rng.choice(COLOURS[lang])),
             ("animal", rng.choice(ANIMALS[lang])), ("founded", str(rng.randint(1100, 1990))),
             ("population", f"{rng.randint(40, 9000) * 1000:,}"))]


def fact_turns(lang, fact, phrasing):
    """A user question about `fact` in the given phrasing and the assistant's answer."""
    attribute, country, value = fact
    answer, _, _ = FACT_TEMPLATES[lang, attribute]
    return [{"role": "user", "content": phrasing.format(c=country)},
            {"role": "assistant", "content": answer.format(c=country, v=value)}]


def name_chat(lang, rng, middle=None):
    """Two-turn name recall: the user gives a name, maybe asks something else (`middle` turns), then asks it back."""
    intros, greeting, questions, answer = NAME_TURNS[lang]
    name = rng.choice(NAMES[lang])
    return ([{"role": "user", "content": rng.choice(intros).format(n=name)},
             {"role": "assistant", "content": greeting.format(n=name)}] + (middle or [])
            + [{"role": "user", "content": rng.choice(questions)},
               {"role": "assistant", "content": answer.format(n=name)}])


def synthetic_chats(n, seed):
    """n training conversations, English and Japanese in turn: half ask a fact in a TRAIN phrasing, half are
    name recall (with a fact question between the two turns every other time)."""
    rng, chats = random.Random(seed), []
    for k in range(n):
        lang = ("en", "ja")[k % 2]
        fact = rng.choice(facts(lang))
        turns = fact_turns(lang, fact, rng.choice(FACT_TEMPLATES[lang, fact[0]][1]))
        chats.append(turns if k % 4 < 2 else name_chat(lang, rng, turns if k % 8 >= 6 else None))
    return chats


def synthetic_probes(lang, n_names=100, seed=0):
    """The test conversations of a language, the expected last reply at the end of each: every fact asked in each
    HELD_OUT phrasing, and `n_names` name-recall conversations. Returns {"facts": [...], "names": [...]}."""
    rng = random.Random(seed)
    probes = [fact_turns(lang, fact, phrasing) for fact in facts(lang) for phrasing in FACT_TEMPLATES[lang, fact[0]][2]]
    return {"facts": probes, "names": [name_chat(lang, rng) for _ in range(n_names)]}


def main(argv=None):
    run_command(run, argv)


if __name__ == "__main__":
    main()
