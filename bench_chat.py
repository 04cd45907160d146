"""Benchmark of chat fine-tuning: the figures behind the README's chat recipe.

    python bench_chat.py out/chat --base out/base --scratch out/chat-scratch --lora out/chat-lora

Everything is measured on the conversations the fine-tuning run held out (and, for the synthetic set, on
probes asked in phrasings it never trained on), greedily (after a repetition penalty on the
reply's own tokens with --repetition-penalty P, as cli.py and the server apply it in a chat), English and
Japanese apart:

    ends      % of replies that end with <|end|> within 128 tokens
    no role   % of replies without a role token (<|system|>, <|user|>, <|assistant|>) before their end
    language  % of replies in the language of the prompt (clean_text.detect_language)
    bits/char held-out assistant content, <|end|> left out (the base never saw it), of the run, of the base
              with the template (zero-shot, its vocabulary grown as finetune.py grows it) and of the same
              fine-tuning from random weights (--scratch)
    facts     % of synthetic facts asked in a held-out phrasing answered exactly
    names     % of two-turn name recalls answered exactly

With --lora, the LoRA run is set beside the full one: trainable share, held-out assistant loss at the same
step, step time and peak memory (read from each run's metrics.jsonl and `peak_rss_mb` in run.json, which
`python bench_chat.py --time-run DIR -- COMMAND` writes). Like bench.py, it pins PyTorch to one thread.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import finetune
from chat_format import CHAT_TOKENS, chat_ids, encode_chat
from checkpoint import build_model, load_run, read_config, read_metrics
from clean_text import detect_language
from sample import generate

MAX_REPLY = 128  # tokens a reply may take to reach <|end|>


def reply(model, tok, messages, penalty=1.0, max_new_tokens=MAX_REPLY):
    """The greedy reply to `messages`, under a repetition `penalty` (1: none): (text before <|end|>, ended with
    <|end|>, held a role token)."""
    chat = chat_ids(tok)
    ids, _ = encode_chat(tok, messages, add_generation_prompt=True)
    out = generate(model, torch.tensor([ids]), max_new_tokens, temperature=0, repetition_penalty=penalty,
                   penalize_prompt=False, stop_ids=[chat["<|end|>"]])
    new = out[0, len(ids):].tolist()
    ended = chat["<|end|>"] in new
    body = new[:new.index(chat["<|end|>"])] if ended else new
    roles = {chat[t] for t in CHAT_TOKENS if t != "<|end|>"}
    return tok.decode([i for i in body if i not in roles]), ended, any(i in roles for i in body)


def language_of(messages):
    """The language a conversation is scored under: that of its first user message."""
    return detect_language(next(m["content"] for m in messages if m["role"] == "user"))


@torch.no_grad()
def assistant_nats(model, tok, chats, block_size, batch_size=32):
    """{lang: (nats, chars)} over the assistant content of `chats` (their <|end|> left out), each conversation
    scored on its own in consecutive windows of block_size, so every target is predicted exactly once."""
    end = chat_ids(tok)["<|end|>"]
    windows, totals = [], {}
    for messages in chats:
        ids, mask = encode_chat(tok, messages)
        ids = torch.tensor(ids)
        targets = torch.where(torch.tensor(mask) & (ids != end), ids, -1)
        lang = language_of(messages)
        for start in range(0, len(ids) - 1, block_size):
            x, y = ids[start:start + block_size], targets[start + 1:start + block_size + 1]
            windows.append((lang, x, y[:len(x)]))
        chars = sum(len(m["content"]) for m in messages if m["role"] == "assistant")
        totals[lang] = (0.0, totals.get(lang, (0.0, 0))[1] + chars)
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        x = torch.zeros(len(group), block_size, dtype=torch.long)  # padding after a short window is never read
        y = torch.full((len(group), block_size), -1)  # by its earlier positions, and never a target
        for row, (_, xs, ys) in enumerate(group):
            x[row, :len(xs)], y[row, :len(ys)] = xs, ys
        logits, _ = model(x)
        nats = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), y, ignore_index=-1,
                                                 reduction="none").sum(dim=1)  # (b, V, T) -> (b,)
        for (lang, _, _), value in zip(group, nats.tolist()):
            totals[lang] = (totals[lang][0] + value, totals[lang][1])
    return totals


def bits_per_char(model, tok, chats, block_size):
    return {lang: nats / chars / math.log(2) for lang, (nats, chars) in
            assistant_nats(model, tok, chats, block_size).items() if chars}


def zero_shot(base_dir, tok):
    """The base run with the chat template: its vocabulary grown by the chat tokens as finetune.py grows it."""
    model, _, _ = finetune.load_base(base_dir, "cpu")
    return finetune.grow_vocab(model, tok.vocab_size).eval()


def evenly_spaced(items, n):
    """Up to n of `items` at even steps from first to last, so that every file of a language is drawn from."""
    return [items[i * len(items) // n] for i in range(n)] if len(items) > n else list(items)


def reply_rates(model, tok, chats, n_per_lang, penalty=1.0):
    """{lang: {"n", "ends", "no_role", "language"}} over the first reply of up to n held-out conversations each,
    evenly spaced through the held-out ones, plus one transcript per language."""
    rates = {}
    for lang in finetune.LANGS:
        picked = evenly_spaced([m for m in chats if language_of(m) == lang], n_per_lang)
        ends = no_role = same = 0
        for k, messages in enumerate(picked):
            prompt = messages[:next(i for i, m in enumerate(messages) if m["role"] == "assistant")]
            text, ended, role = reply(model, tok, prompt, penalty)
            ends, no_role, same = ends + ended, no_role + (not role), same + (detect_language(text) == lang)
            if k == 0:
                rates.setdefault("transcripts", []).append((prompt, text))
        rates[lang] = {"n": len(picked), "ends": ends / max(1, len(picked)), "no_role": no_role / max(1, len(picked)),
                       "language": same / max(1, len(picked))}
    return rates


def probe_rates(model, tok, n_names=100, penalty=1.0):
    """{lang: {"facts": %, "names": %}}: exact answers to the synthetic probes (finetune.synthetic_probes)."""
    rates = {}
    for lang in finetune.LANGS:
        rates[lang] = {}
        for kind, chats in finetune.synthetic_probes(lang, n_names).items():
            hits = sum(reply(model, tok, m[:-1], penalty)[0].strip() == m[-1]["content"] for m in chats)
            rates[lang][kind] = hits / len(chats)
    return rates


def trainable_share(config):
    """The share of a run's parameters that its fine-tuning trained (LoRA: the adapters and the trained rows)."""
    model, args = build_model(config["model"]), config["args"]
    if not args["lora_rank"]:
        return 1.0
    total, n_old = model.num_params(), model.config.vocab_size - len(CHAT_TOKENS)
    rows = torch.arange(n_old - args.get("lora_rows", 0), model.config.vocab_size)  # which rows: no matter to a count
    return finetune.add_adapters(model, args, rows) / total


def run_facts(run_dir):
    """Step count, held-out loss at the end, seconds per step, trainable share and peak memory of a run."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    train_rows = [r for r in rows if "train_loss" in r]
    record = Path(run_dir) / "run.json"
    timing = json.loads(record.read_text(encoding="utf-8")) if record.exists() else {}
    return {"steps": train_rows[-1]["step"], "val_loss": [r["val_loss"] for r in rows if "val_loss" in r][-1],
            "s_per_step": train_rows[-1]["elapsed"] / train_rows[-1]["step"],
            "trainable": trainable_share(read_config(run_dir)), **timing}


def time_run(run_dir, command):
    """Run `command` (a list) and write its wall time and peak resident memory to run_dir/run.json."""
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    _, status, usage = os.wait4(proc.pid, 0)
    record = {"wall_s": round(time.perf_counter() - start, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
              "command": command}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "run.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return os.waitstatus_to_exitcode(status)


def measure(run_dir, base_dir=None, scratch_dir=None, n_replies=100, n_names=100, penalty=1.0):
    """Every figure of the module docstring for one fine-tuned run; returns them as a dict."""
    model, tok, config = load_run(run_dir)
    _, real = finetune.load_chats({**config["args"], "synthetic": 0})  # the files' split, the synthetic set left out
    block = config["block_size"]
    result = {"replies": reply_rates(model, tok, real, n_replies, penalty), "penalty": penalty,
              "probes": probe_rates(model, tok, n_names, penalty),
              "bits_per_char": {"fine-tuned": bits_per_char(model, tok, real, block)}}
    if base_dir:
        result["bits_per_char"]["base, zero-shot"] = bits_per_char(zero_shot(base_dir, tok), tok, real, block)
    if scratch_dir:
        result["bits_per_char"]["from random init"] = bits_per_char(load_run(scratch_dir)[0], tok, real, block)
    return result


def print_report(name, result):
    replies, probes = result["replies"], result["probes"]
    rule = "greedy" + (f", repetition penalty {result['penalty']}" if result["penalty"] != 1.0 else "")
    print(f"\n{name}: held-out replies ({rule}, ≤ {MAX_REPLY} tokens) and synthetic probes")
    print(f"{'lang':6}{'n':>5}{'ends':>8}{'no role':>9}{'language':>10}{'facts':>8}{'names':>8}")
    for lang in finetune.LANGS:
        r, p = replies[lang], probes[lang]
        print(f"{lang:6}{r['n']:>5}{r['ends']:>8.0%}{r['no_role']:>9.0%}{r['language']:>10.0%}"
              f"{p['facts']:>8.0%}{p['names']:>8.0%}")
    print("held-out assistant bits/char")
    for label, by_lang in result["bits_per_char"].items():
        print(f"  {label:18}" + "".join(f"{lang} {by_lang.get(lang, float('nan')):.3f}   " for lang in finetune.LANGS))
    for prompt, text in replies["transcripts"]:
        print("---\n" + "".join(f"{m['role']}: {m['content'][:200]}\n" for m in prompt) + f"assistant: {text}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Measure a chat fine-tuning run (see the module docstring).")
    p.add_argument("run", nargs="?", help="the fine-tuned run directory")
    p.add_argument("--base", help="the base run it was fine-tuned from: zero-shot bits/char")
    p.add_argument("--scratch", help="the same fine-tuning from random init (finetune.py --from-scratch)")
    p.add_argument("--lora", help="a LoRA run of the same data and steps, set beside the full one")
    p.add_argument("--replies", type=int, default=100, help="held-out replies per language (default: %(default)s)")
    p.add_argument("--names", type=int, default=100, help="name-recall probes per language (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="the replies' repetition penalty, on "
                   "their own tokens (default: %(default)s, none)")
    p.add_argument("--time-run", metavar="DIR", help="run the command after -- and record its time and peak "
                   "memory in DIR/run.json")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args, command = p.parse_args(argv[:cut]), argv[cut + 1:]
    if args.time_run:
        sys.exit(time_run(args.time_run, command))
    torch.set_num_threads(1)
    penalty = args.repetition_penalty
    print_report(args.run, measure(args.run, args.base, args.scratch, args.replies, args.names, penalty))
    if args.lora:
        print_report(args.lora, measure(args.lora, n_replies=args.replies, n_names=args.names, penalty=penalty))
        print(f"\n{'run':28}{'trained':>9}{'steps':>6}{'held-out loss':>15}{'s/step':>8}{'peak MB':>9}")
        for run_dir in (args.run, args.lora):
            f = run_facts(run_dir)
            print(f"{run_dir:28}{f['trainable']:>9.2%}{f['steps']:>6}{f['val_loss']:>15.4f}{f['s_per_step']:>8.3f}"
                  f"{f.get('peak_rss_mb', float('nan')):>9}")


if __name__ == "__main__":
    main()
