"""The chat, driven as a person would: through a pipe, a pseudo-terminal (Ctrl-C, Ctrl-D), and in Japanese."""
import contextlib
import io
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
from bigram_lm import BigramLM
from bpe_tokenizer import BPETokenizer
from char_tokenizer import CharTokenizer
from chat_format import add_chat_tokens, chat_ids, render_chat
from checkpoint import WEIGHTS, load_run, model_config_dict, save_run_files, save_weights
from transformer import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parent


def write_run(run_dir, model, tok):
    config = {"model": model_config_dict(model), "tokenizer": tok.kind, "tokenizer_file": "tokenizer.json"}
    save_run_files(run_dir, config, tok, "tokenizer.json")
    save_weights(model, run_dir / WEIGHTS)
    return run_dir


@pytest.fixture
def run(tmp_path):
    torch.manual_seed(0)
    tok = CharTokenizer.train("to be or not to be\n")
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32))
    return write_run(tmp_path / "run", model, tok)


REPLY = "猫だ!"  # its UTF-8 bytes are all different, so a bigram can spell it byte by byte


def scripted_chat_run(run_dir, block_size=64):
    """A chat run with a byte-level tokenizer whose greedy answer to any conversation is REPLY, then <|end|>.

    Were generation not stopped there, it would go on "<|user|>more…". After "h" it says "i<|system|>"
    (a role token inside an answer). The model is a transformer whose blocks write nothing (their output
    projections are zero), so the next token depends on the current one alone: a bigram table, written
    into the head. Off these paths the table is random, so sampling still depends on the seed.
    """
    tok = add_chat_tokens(BPETokenizer([]))  # bytes: "猫" takes three tokens, each alone decodes to U+FFFD
    ids = chat_ids(tok)
    paths = ([ids["<|assistant|>"], *tok.encode(REPLY), ids["<|end|>"], ids["<|user|>"], *tok.encode("more")],
             [*tok.encode("hi"), ids["<|system|>"]])
    V = tok.vocab_size
    C = V + (-V) % 4  # a channel per token, rounded up so that 2 heads have an even size (RoPE)
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(0))  # row i: logits after token i
    for path in paths:
        for a, b in zip(path, path[1:]):
            table[a, b] = 30.0
    model = Transformer(ModelConfig(vocab_size=V, block_size=block_size, n_layer=1, n_head=2, n_embd=C,
                                    pos="rope", norm="rmsnorm", tie_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("out_proj.weight"):
                p.zero_()  # the block adds nothing to the residual stream
        model.embed.tok.weight.copy_(torch.eye(V, C))  # token i -> channel i
        model.head.weight.zero_()
        model.head.weight[:, :V] = table.T / C ** 0.5  # RMSNorm turns the one-hot e_i into √C·e_i
    return write_run(run_dir, model, tok)


@pytest.fixture
def chat_run(tmp_path):
    return scripted_chat_run(tmp_path / "chat")


def chat_command(run, *flags):
    return [sys.executable, str(ROOT / "cli.py"), str(run), *flags]


def test_two_prompts_temp_reset_and_eof_through_a_pipe(run):
    lines = "/temp 0\nto be\nor not\n/reset\nto be\n/top-p 2\n/nope\n/system be brief\n"
    result = subprocess.run(chat_command(run, "--max-new-tokens", "12", "--stop", ""), input=lines,
                            capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert result.returncode == 0, result.stderr
    header, *replies = result.stdout.split("> ")  # one reply per line read; the prompt is not echoed by a pipe
    assert "context 32 tokens" in header
    assert replies[0] == "temperature = 0.0\n"
    first, second, reset, again = replies[1:5]
    assert len(first) == 13 and len(second) == 13  # 12 one-character tokens and a newline each
    assert reset == "(conversation forgotten)\n"
    assert again == first  # greedy from the same fresh context: /reset forgot the earlier turns
    assert replies[5].startswith("not changed: top-p must be in (0, 1]")
    assert replies[6].startswith("unknown command /nope")
    assert replies[7].startswith("not changed: /system needs a chat run")
    assert replies[8] == "\n"  # EOF (Ctrl-D) ends the program cleanly


def test_a_chat_run_takes_turns_through_a_pipe(chat_run):
    lines = "/system 短く答えて\n猫は?\nand you?\n/reset\n/system\nhello\n"
    result = subprocess.run(chat_command(chat_run, "--max-new-tokens", "30"), input=lines,
                            capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert result.returncode == 0, result.stderr
    header, *replies = result.stdout.split("> ")
    assert "a chat run" in header
    assert replies == ["system: 短く答えて\n", REPLY + "\n", REPLY + "\n", "(conversation forgotten)\n",
                       "(system message removed)\n", REPLY + "\n", "\n"]  # each answer stopped at <|end|>


def test_the_penalty_counts_a_chat_answers_own_tokens_and_a_base_runs_whole_text(tmp_path, run, monkeypatch):
    asked = []

    def stream_text(model, tok, prompt, max_new_tokens, **rules):
        asked.append((rules["repetition_penalty"], rules["penalize_prompt"]))
        yield "x"

    monkeypatch.setattr(cli, "stream_text", stream_text)
    for run_dir in (scripted_chat_run(tmp_path / "chat"), run):
        model, tok, _ = load_run(run_dir)
        chat = cli.Chat(model, tok, cli.Settings(temperature=0))
        assert chat.command("/penalty 0").startswith("not changed: repetition penalty must be > 0")
        assert chat.command("/penalty 1.3") == "repetition_penalty = 1.3"
        chat.answer("hi", lambda text: None)
    assert asked == [(1.3, False), (1.3, True)]


def test_chat_history_keeps_the_system_message_and_the_newest_whole_turns(tmp_path, monkeypatch):
    model, tok, _ = load_run(scripted_chat_run(tmp_path / "chat", block_size=48))
    chat = cli.Chat(model, tok, cli.Settings(temperature=0, max_new_tokens=30))
    said = ["one", "two", "three", "four"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("/system be brief\n" + "".join(f"{s}\n" for s in said)))
    cli.chat_loop(chat, io.StringIO())
    assert chat.turns[-1] == ("four", REPLY) and chat.system == "be brief"
    context = chat.context("five")
    kept = len(chat.turns)
    assert 1 <= kept < 4 and chat.turns == list(zip(said, [REPLY] * 4))[-kept:]

    def messages(turns):
        said = [{"role": "system", "content": "be brief"}]
        for line, answer in turns:
            said += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
        return said + [{"role": "user", "content": "five"}]

    def size(messages):  # bytes are tokens here: a role token, the content's bytes and <|end|>, then <|assistant|>
        return sum(2 + len(m["content"].encode()) for m in messages) + 1

    assert tok.decode(context) == render_chat(messages(chat.turns), add_generation_prompt=True)
    assert len(context) == size(messages(chat.turns)) <= 48
    assert size(messages([(said[-kept - 1], REPLY), *chat.turns])) > 48  # the newest dropped turn did not fit
    chat.command("/reset")
    assert tok.decode(chat.context("five")) == render_chat(messages([]), add_generation_prompt=True)


class Terminal:
    """The parent's end of a pseudo-terminal: expect(text) reads on until `text` appears past the last match."""

    def __init__(self, fd):
        self.fd, self.seen, self.pos = fd, bytearray(), 0

    def expect(self, text, min_bytes=0, timeout=30):
        deadline = time.monotonic() + timeout
        while (at := self.seen.find(text.encode(), self.pos)) < 0 or len(self.seen) - self.pos < min_bytes:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout}s; got {bytes(self.seen[self.pos:])[-300:]!r}")
            if select.select([self.fd], [], [], 0.5)[0]:
                self.seen += os.read(self.fd, 4096)
        self.pos = at + len(text)

    def wait_exit(self, pid, timeout=30):
        """Type Ctrl-D until the child exits (one typed while readline switches the terminal's mode can be lost)
        and return its exit code, reading its output meanwhile so that it never blocks on a full terminal."""
        deadline, typed = time.monotonic() + timeout, 0.0
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"the chat did not exit within {timeout}s; got {bytes(self.seen[-300:])!r}")
            try:
                if time.monotonic() - typed > 1.0:
                    os.write(self.fd, b"\x04")
                    typed = time.monotonic()
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.seen += os.read(self.fd, 4096)
            except OSError:  # the terminal closed as the child exited
                time.sleep(0.01)
        return os.waitstatus_to_exitcode(done[1])


@contextlib.contextmanager
def terminal(command):
    """Run `command` (a Python command line) on a pseudo-terminal and yield the parent's end; at the end type
    Ctrl-D and expect exit status 0. Through a terminal, Ctrl-C (byte 3) becomes SIGINT and Ctrl-D (byte 4) EOF."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:
        # As in a person's terminal, SIGINT starts at its default; a runner started in the background
        # (`cmd &` in a script) ignores it, every child would inherit that, and Ctrl-C would do nothing.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(sys.executable, command)
    term, status = Terminal(fd), None
    try:
        yield term
        status = term.wait_exit(pid)
        assert status == 0
    finally:
        if status is None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_ctrl_c_stops_the_answer_not_the_program(run):
    with terminal(chat_command(run, "--max-new-tokens", "1000000", "--stop", "")) as term:
        term.expect("> ")
        os.write(term.fd, b"to be\n")
        term.expect("to be", min_bytes=400)  # the echo, then the endless answer streaming
        os.write(term.fd, b"\x03")
        term.expect("[stopped]")
        term.expect("> ")
        os.write(term.fd, b"/max 5\n")
        term.expect("max_new_tokens = 5")
        os.write(term.fd, b"or not\n")
        term.expect("or not")  # past the prompt this line was typed at, so the next "> " is the one after the answer
        term.expect("> ")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_a_chat_run_answers_in_japanese_in_a_terminal(chat_run):
    with terminal(chat_command(chat_run, "--temperature", "0")) as term:
        term.expect("> ")
        os.write(term.fd, "/system 日本語で\n".encode())
        term.expect("system: 日本語で")
        term.expect("> ")
        os.write(term.fd, "猫は?\n".encode())
        term.expect(REPLY + "\r\n> ")  # the answer ended at <|end|>: a new line and the next prompt follow
        assert "\ufffd" not in bytes(term.seen).decode("utf-8")  # strict: a split character would raise


def test_japanese_in_and_out(tmp_path, monkeypatch, capsys):
    tok = CharTokenizer.train("吾輩は猫である。名前はまだ無い。\n")
    model = BigramLM(tok.vocab_size)
    with torch.no_grad():  # a bigram that surely continues a line with "である。"
        model.table.weight.fill_(-10.0)
        for a, b in zip("\nである", "である。"):
            model.table.weight[tok.encode(a)[0], tok.encode(b)[0]] = 10.0
    run = write_run(tmp_path / "ja", model, tok)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/temp 0\n吾輩は猫\n"))
    cli.main([str(run), "--stop", "。"])
    assert capsys.readouterr().out.endswith("> temperature = 0.0\n> である\n> \n")


def test_context_keeps_recent_turns_within_block_size(run):
    model, tok, _ = load_run(run)
    chat = cli.Chat(model, tok, cli.Settings(temperature=0, max_new_tokens=4))
    for i in range(6):
        chat.answer("to be" if i % 2 else "or not", lambda text: None)
    before = list(chat.turns)
    context = chat.context("to be")
    kept = len(chat.turns)
    assert 1 <= kept < 6 and chat.turns == before[-kept:]  # the oldest turns went first
    as_text = ["{}\n{}\n\n".format(*turn) for turn in before]  # a base model's turn: line, answer, blank line
    assert context == "".join(as_text[-kept:]) + "to be\n" and len(tok.encode(context)) <= 32
    assert len(tok.encode(as_text[-kept - 1] + context)) > 32  # the newest dropped turn did not fit


def test_bad_flags_exit_2(run, capsys):
    for flags in (["--temperature", "-1"], ["--max-new-tokens", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([str(run), *flags])
        assert exit_info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
