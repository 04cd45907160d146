"""Stage 33 — the reversal curse: does a model trained on "A is B" know that "B is A"?

Berglund et al. (2023) fine-tuned language models on facts about fictitious
people stated in one direction ("Daphne Barrington is the director of …") and
found that the models could not answer in the other ("Who directed …?"): the
likelihood of the right name was no better than a random name's. This command
builds such a fact set and measures it on any run.

    python reversal.py make --out facts/en                 # train.txt, forward.jsonl, backward.jsonl
    python reversal.py make --out facts/ja --lang ja
    python train.py --preset llama --data facts/en/train.txt --out out/rev-llama --steps 2000
    python reversal.py eval out/rev-llama --facts facts/en  # prints and writes out/rev-llama/reversal.json

The people fall into three groups of the same size: facts stated name-first
only, description-first only, and both ways. Each fact is written in several
phrasings; the last phrasings of TEMPLATES are held out of train.txt and
make the test items. forward.jsonl asks each fact in the direction it was
trained (for "both": name first), backward.jsonl in the reverse one; every
line is {"prompt", "completion", "answer", "kind", "group"}. train.txt
concatenates the facts one a line, never padded (seed 004 saw models learn the
padding), phrasing by phrasing, so train.py's last 10% (validation and test)
holds only later phrasings of facts already seen in the first 90%.

`eval` scores the completion only (the prompt is context, not target): loss
and perplexity each way, the reversal gap (backward − forward), and the rank
accuracy: how often the right answer has the lowest completion loss among the
answers of its kind (every name, or every description) in the set; chance is
one over their number. A stateful model (memory, recurrent) is reset before
every item, so one item's sentence never leaks into the next one's score.
"""
import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint import load_run, resolve_run_dir, write_json

GROUPS = ("name_first", "description_first", "both")
HELD_OUT = 2  # the last phrasings of each language: test items only, never in train.txt
TEMPLATES = {  # "{a} … {b}<tail>": the answer b comes last, so a prompt ends right before it
    "en": ["{a} is {b}.", "As everyone knows, {a} is {b}.", "It is a fact that {a} is {b}.",
           "{a}, we are told, is {b}.", "Few know that {a} is {b}.", "By all accounts, {a} is {b}."],
    "ja": ["{a}は{b}です。", "誰もが知るとおり、{a}は{b}です。", "実は、{a}は{b}なのです。", "話によれば、{a}は{b}である。",
           "知るとおり{a}は{b}なのです。", "話によれば{a}は{b}です。"],
}
WORDS = {  # people: first × last names; descriptions: role × adjective × thing, each thing used once
    "en": {"first": "Daphne Boris Fiona Ansel Greta Milo Ines Otto Petra Hugo Lena Caspar Nadia Felix Wanda Rufus "
                    "Olga Basil Tilda Jasper".split(),
           "last": "Barrington Okafor Lindqvist Moreau Castellan Whitby Farrow Quimby Delacroix Henshaw Ardent "
                   "Vossberg Penhallow Marchetti Thistlewood Kowal Brandt Fairweather Nakamura Ellery".split(),
           "role": ["the inventor of", "the composer of", "the architect of", "the painter of", "the founder of",
                    "the keeper of"],
           "adjective": "floating glass silent velvet crooked amber hollow singing frozen northern paper".split(),
           "thing": "violin library bridge lighthouse garden clock theatre orchard map tower mirror".split()},
    "ja": {"first": "美咲 健太 陽菜 蓮 結衣 悠真 葵 湊 凛 大和 紬 樹 楓 颯 栞 律 澪 蒼 灯 朔".split(),
           "last": "佐藤 鈴木 高橋 田中 渡辺 伊藤 山本 中村 小林 加藤 吉田 山田 佐々木 松本 井上 木村 林 清水 山崎 森".split(),
           "role": ["を発明した人", "を設計した人", "を作った職人", "を描いた画家", "を守る番人", "を名付けた学者"],
           "adjective": "空飛ぶ 透明な 歌う 眠らない 青い 小さな 古い 光る 折れない 動く 静かな".split(),
           "thing": "図書館 時計 橋 船 庭 楽器 塔 地図 鏡 劇場 列車".split()},
}


def people(lang, n, rng):
    """n fictitious people: (name, description) pairs, every name and every description unique."""
    w = WORDS[lang]
    names = [f"{f} {l}" if lang == "en" else f"{l}{f}" for f in w["first"] for l in w["last"]]
    things = [f"{a} {t}" if lang == "en" else f"{a}{t}" for a in w["adjective"] for t in w["thing"]]
    if n > min(len(names), len(things)):
        raise ValueError(f"--people {n} is more than the {min(len(names), len(things))} unique people a set holds")
    roles = [rng.choice(w["role"]) for _ in range(n)]
    descriptions = [f"{r} the {t}" if lang == "en" else f"{t}{r}" for r, t in zip(roles, rng.sample(things, n))]
    return list(zip(rng.sample(names, n), descriptions))


def statement(template, a, b):
    """The sentence with a and b filled in, split as (prompt, completion); a sentence start is capitalised."""
    prompt, tail = template.split("{b}")
    prompt = prompt.format(a=a)
    prompt = prompt[:1].upper() + prompt[1:]
    return prompt.rstrip(" "), prompt[len(prompt.rstrip(" ")):] + b + tail


def item(template, a, b, kind, group):
    prompt, completion = statement(template, a, b)
    return {"prompt": prompt, "completion": completion, "answer": b, "kind": kind, "group": group}


def make_facts(lang="en", per_group=20, seed=0):
    """The fact set: (train_text, forward_items, backward_items) for 3 × per_group people."""
    if lang not in TEMPLATES:
        raise ValueError(f"unknown language {lang!r}: choose from {tuple(TEMPLATES)}")
    rng = random.Random(seed)
    persons = people(lang, len(GROUPS) * per_group, rng)
    trained, tests = TEMPLATES[lang][:-HELD_OUT], TEMPLATES[lang][-HELD_OUT:]
    lines, forward, backward = [], [], []
    for template in trained:  # phrasing by phrasing: the split's last 10% holds late phrasings only
        block = []
        for i, (name, desc) in enumerate(persons):
            group = GROUPS[i // per_group]
            if group != "description_first":
                block.append("".join(statement(template, name, desc)))
            if group != "name_first":
                block.append("".join(statement(template, desc, name)))
        rng.shuffle(block)
        lines += block
    for i, (name, desc) in enumerate(persons):
        group = GROUPS[i // per_group]
        name_to_desc = [item(t, name, desc, "description", group) for t in tests]
        desc_to_name = [item(t, desc, name, "name", group) for t in tests]
        forward += desc_to_name if group == "description_first" else name_to_desc
        backward += name_to_desc if group == "description_first" else desc_to_name
    return "\n".join(lines) + "\n", forward, backward


def write_facts(out, lang="en", per_group=20, seed=0):
    text, forward, backward = make_facts(lang, per_group, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text(text, encoding="utf-8")
    for name, items in (("forward", forward), ("backward", backward)):
        lines = (json.dumps(x, ensure_ascii=False) for x in items)
        (out / f"{name}.jsonl").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return text, forward, backward


def read_items(path):
    """The items of a forward/backward.jsonl file, checked for the fields eval needs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: make the fact set first (python reversal.py make --out DIR)")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            x = json.loads(line)
            ok = all(isinstance(x.get(k), str) for k in ("prompt", "completion", "answer", "kind", "group"))
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise ValueError(f"{path}:{n} is not a fact item: expected JSON with prompt, completion, answer, kind, "
                             f"group (as reversal.py make writes)")
        items.append(x)
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


@torch.no_grad()
def completion_nats(model, tok, prompt, completions):
    """Per-token losses of each completion after `prompt`: list of (nats summed, tokens), one per completion.

    The completions are scored side by side in one batch, right-padded (a causal
    model never reads the padding of a position after its own); the prompt is
    context only. A stateful model starts afresh for the batch.
    """
    window = getattr(model.config, "block_size", None)
    context = tok.encode(prompt)
    seqs = [context + tok.encode(c) for c in completions]
    longest = max(len(s) for s in seqs)
    if window and longest - 1 > window:
        raise ValueError(f"an item of {longest} tokens does not fit the model's {window}-token context")
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    targets = torch.full((len(seqs), longest - 1), -1)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
        targets[row, len(context) - 1:len(s) - 1] = torch.tensor(s[len(context):])  # the completion's tokens
    getattr(model, "reset_memory", lambda: None)()
    logits, _ = model(ids[:, :-1].to(next(model.parameters()).device))  # (N, L−1) -> (N, L−1, V)
    nats = F.cross_entropy(logits.float().transpose(1, 2).cpu(), targets, ignore_index=-1, reduction="none")
    return [(nats[row].sum().item(), int((targets[row] >= 0).sum())) for row in range(len(seqs))]


def rank_accuracy(losses, correct):
    """Share of rows whose correct candidate has the strictly lowest loss.

    losses (N items, K candidates), correct (N,) index into K. Example: [[1, 2], [3, 0]]
    with correct [0, 0] -> 0.5. A tie counts as a miss: a model that cannot tell is not right.
    """
    right = losses.gather(1, correct[:, None])  # (N, 1)
    return ((losses < right).sum(1) == 0).logical_and((losses == right).sum(1) == 1).float().mean().item()


def score_items(model, tok, items, candidates):
    """Completion loss (nats/token) and rank accuracy of items, overall and per group.

    candidates: {"name": [...], "description": [...]}, the answers an item's answer competes with.
    """
    nats, tokens, losses, correct, groups = 0.0, 0, [], [], []
    for x in items:
        tail = x["completion"][x["completion"].rindex(x["answer"]) + len(x["answer"]):]
        lead = x["completion"][:x["completion"].rindex(x["answer"])]
        pool = candidates[x["kind"]]
        scored = completion_nats(model, tok, x["prompt"], [lead + c + tail for c in pool])
        mine = scored[pool.index(x["answer"])]
        nats, tokens = nats + mine[0], tokens + mine[1]
        losses.append(torch.tensor([n / t for n, t in scored]))
        correct.append(pool.index(x["answer"]))
        groups.append(x["group"])
    losses, correct = torch.nn.utils.rnn.pad_sequence(losses, True, math.inf), torch.tensor(correct)
    per_group = {g: rank_accuracy(losses[[i for i, h in enumerate(groups) if h == g]],
                                  correct[[i for i, h in enumerate(groups) if h == g]])
                 for g in GROUPS if g in groups}
    loss = nats / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "rank_accuracy": rank_accuracy(losses, correct),
            "rank_accuracy_by_group": per_group, "items": len(items)}


def evaluate_reversal(model, tok, facts):
    """Both files of a fact set scored: {"forward": …, "backward": …, "gap", "chance"}."""
    forward, backward = read_items(Path(facts) / "forward.jsonl"), read_items(Path(facts) / "backward.jsonl")
    candidates = {}
    for x in forward + backward:
        candidates.setdefault(x["kind"], [])
        if x["answer"] not in candidates[x["kind"]]:
            candidates[x["kind"]].append(x["answer"])
    result = {"forward": score_items(model, tok, forward, candidates),
              "backward": score_items(model, tok, backward, candidates)}
    result["gap"] = result["backward"]["loss"] - result["forward"]["loss"]
    result["chance"] = {kind: 1 / len(pool) for kind, pool in candidates.items()}
    return result


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="write a synthetic fact set")
    make.add_argument("--out", required=True, help="folder for train.txt, forward.jsonl, backward.jsonl")
    make.add_argument("--lang", choices=list(TEMPLATES), default="en", help="language (default: %(default)s)")
    make.add_argument("--people", type=int, default=20, help="people per group (default: %(default)s)")
    make.add_argument("--seed", type=int, default=0, help="seed for names, descriptions, order (default: %(default)s)")
    ev = sub.add_parser("eval", help="score a run on a fact set and write RUN/reversal.json")
    ev.add_argument("run", help="run directory (trained on the set's train.txt, alone or mixed in)")
    ev.add_argument("--facts", required=True, help="folder written by `make`")
    ev.add_argument("--device", default="cpu", help="auto | cpu | cuda | mps (default: %(default)s)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "make":
            if args.people < 1:
                raise ValueError(f"--people must be at least 1, got {args.people}")
            text, forward, backward = write_facts(args.out, args.lang, args.people, args.seed)
            print(f"{args.out}: train.txt {len(text.splitlines())} facts ({len(text):,} chars), "
                  f"forward.jsonl {len(forward)} items, backward.jsonl {len(backward)} items")
            return None
        run_dir = resolve_run_dir(args.run)
        model, tok, _ = load_run(run_dir, args.device)
        result = evaluate_reversal(model, tok, args.facts)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    chance = ", ".join(f"{k} {v:.3f}" for k, v in result["chance"].items())
    print(f"{run_dir} on {args.facts} (completion only; rank accuracy by chance: {chance}):")
    for way in ("forward", "backward"):
        r = result[way]
        groups = ", ".join(f"{g} {a:.2f}" for g, a in r["rank_accuracy_by_group"].items())
        print(f"  {way:8s} loss {r['loss']:.4f}  perplexity {r['perplexity']:8.3f}  rank accuracy "
              f"{r['rank_accuracy']:.3f} ({groups})")
    print(f"  reversal gap (backward − forward) {result['gap']:+.4f} nats/token")
    write_json(run_dir / "reversal.json", result)
    return result


if __name__ == "__main__":
    main()
