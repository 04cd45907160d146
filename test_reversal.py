"""reversal.py: the fact set's structure, completion-only loss, rank accuracy, the eval command end to end."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import reversal
import train
from char_tokenizer import CharTokenizer
from dataset import split_bounds
from transformer import PRESETS, Transformer


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_fact_set_groups_phrasings_and_no_padding(tmp_path, lang):
    text, forward, backward = reversal.write_facts(tmp_path, lang, per_group=6, seed=1)
    assert (tmp_path / "train.txt").read_text(encoding="utf-8") == text
    assert [json.loads(x) for x in (tmp_path / "forward.jsonl").read_text(encoding="utf-8").splitlines()] == forward
    lines = text.splitlines()
    assert text == "\n".join(lines) + "\n" and all(line.strip() == line != "" for line in lines)  # no padding
    trained = reversal.TEMPLATES[lang][:-reversal.HELD_OUT]
    assert len(lines) == len(trained) * 6 * (1 + 1 + 2)  # each phrasing once per fact; "both" states two facts
    for way, items in (("forward", forward), ("backward", backward)):
        assert len(items) == 3 * 6 * reversal.HELD_OUT
        for x in items:
            sentence = x["prompt"] + x["completion"]
            assert sentence not in text  # held-out phrasings only
            assert x["completion"].startswith(x["answer"]) or x["completion"].startswith(" " + x["answer"])
        for group in reversal.GROUPS:
            mine = [x for x in items if x["group"] == group]
            asked = {x["kind"] for x in mine}  # "name": the description was given, the name asked for
            name_first_trained = group != "description_first"
            assert asked == ({"description"} if (way == "forward") == name_first_trained else {"name"})
            for x in mine:  # was the fact trained in the direction this item asks it?
                other = next(y["answer"] for y in forward + backward if y["group"] == group and y["kind"] != x["kind"]
                             and (y["answer"] in x["prompt"]))
                a, b = (other, x["answer"])
                seen = any(line.index(a) < line.index(b) for line in lines if a in line and b in line)
                assert seen == (way == "forward" or group == "both")
    train_part = text[:split_bounds(len(text))[0][1]]  # what train.py trains on and builds a char vocabulary from
    assert set("".join(x["prompt"] + x["completion"] for x in forward + backward)) <= set(train_part)


def test_make_is_seeded_and_rejects_bad_input(tmp_path, capsys):
    assert reversal.make_facts("en", 4, seed=3) == reversal.make_facts("en", 4, seed=3) != reversal.make_facts("en", 4)
    for argv in (["make", "--out", str(tmp_path), "--people", "0"], ["make", "--out", str(tmp_path), "--people",
                                                                        "999"],
                 ["eval", str(tmp_path / "no-run"), "--facts", str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            reversal.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def tiny_model(kind):
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS[kind], vocab_size=30, block_size=48, n_layer=2, n_embd=16, n_head=2)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("kind", ["llama", "recurrent"])
def test_completion_loss_counts_the_completion_only_and_starts_afresh(kind):
    model, tok = tiny_model(kind), CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .")
    prompt, completion = "the cat is", " a tabby."
    ids = torch.tensor([tok.encode(prompt + completion)])
    with torch.no_grad():
        model.reset_memory()
        logp = F.log_softmax(model(ids[:, :-1])[0][0], dim=-1)  # (T−1, V): position t predicts ids[t+1]
        model(torch.tensor([tok.encode("junk to leave a state behind")]))
    n = len(prompt)
    want = -sum(logp[t, ids[0, t + 1]].item() for t in range(n - 1, ids.shape[1] - 1))
    got = reversal.completion_nats(model, tok, prompt, [completion, " no."])
    assert got[0][1] == len(completion) and got[0][0] == pytest.approx(want, rel=1e-5)
    assert got[1][1] == 4  # a shorter candidate in the same batch: its padding is not scored


def test_rank_accuracy_on_a_hand_made_case():
    losses = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.2, 0.9], [1.0, 1.0, 2.0], [2.0, 1.0, math.inf]])
    # right: lowest; right: lowest; a tie is a miss; wrong: another is lower
    assert reversal.rank_accuracy(losses, torch.tensor([0, 1, 0, 0])) == pytest.approx(2 / 4)


def test_eval_writes_reversal_json(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    reversal.main(["make", "--out", "facts", "--people", "5"])
    train.run(["--preset", "recurrent", "--data", "facts/train.txt", "--out", "run", "--block-size", "80",
               "--batch-size", "4", "--n-layer", "1", "--n-embd", "16", "--steps", "3", "--eval-iters", "1"])
    printed = reversal.main(["eval", "run", "--facts", "facts"])
    saved = json.loads((tmp_path / "run" / "reversal.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(printed))
    assert saved["gap"] == pytest.approx(saved["backward"]["loss"] - saved["forward"]["loss"])
    assert saved["chance"] == {"description": 1 / 15, "name": 1 / 15}
    for way in ("forward", "backward"):
        r = saved[way]
        assert r["items"] == 3 * 5 * reversal.HELD_OUT and r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert 0 <= r["rank_accuracy"] <= 1 and set(r["rank_accuracy_by_group"]) == set(reversal.GROUPS)
    assert "reversal gap" in capsys.readouterr().out
    (tmp_path / "facts" / "backward.jsonl").write_text('{"prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        reversal.main(["eval", "run", "--facts", "facts"])
    assert e.value.code == 2 and "backward.jsonl:1 is not a fact item" in capsys.readouterr().err
