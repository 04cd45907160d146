"""Stage 24 — chat: talk to a trained model in the terminal.

Each line you type is a prompt; the answer streams back as it is generated,
one complete character at a time (StreamDecoder), so Japanese prints cleanly.
The conversation so far, your lines and its answers, stays in the context up
to block_size tokens; when it grows past that, the oldest turns are dropped.
A base model does not "reply": it continues the text, so a turn is your line,
a newline, then its continuation up to a blank line (--stop) or /max tokens.

New since stage 19: a loop around `sample.stream_text` with settings that
change as you talk. Run it:

    python cli.py out/gpt
    > ROMEO:
    (the answer streams here)
    > /temp 0.8

Commands: /temp T, /top-k K, /top-p P, /max N, /seed S, /reset, /help,
/quit (or Ctrl-D). Ctrl-C stops the current answer, not the program.
"""
import argparse
import sys
from dataclasses import dataclass

import torch

from checkpoint import load_run
from sample import check_sampling_args, context_window, stream_text

HELP = """commands:
  /temp T     temperature (0 = greedy)        /top-k K   keep the K most likely tokens (0 = off)
  /top-p P    nucleus probability in (0, 1]    /max N     longest answer, in tokens
  /seed S     restart the random numbers       /reset     forget the conversation
  /help       this text                        /quit      leave (Ctrl-D too)
Ctrl-C stops an answer."""


@dataclass
class Settings:
    """What the slash commands change; the flags of the same names set the start values."""

    temperature: float = 0.8  # 0 is greedy
    top_k: int | None = None  # None or 0: off
    top_p: float | None = None  # None or 1: off
    max_new_tokens: int = 200  # longest answer, in tokens
    seed: int = 0  # the random generator restarts from it on /seed


COMMANDS = {  # command -> (Settings field, type)
    "/temp": ("temperature", float),
    "/top-k": ("top_k", int),
    "/top-p": ("top_p", float),
    "/max": ("max_new_tokens", int),
    "/seed": ("seed", int),
}


class Chat:
    """One conversation with one model: the turns so far and the sampling settings."""

    def __init__(self, model, tok, settings, stop_text="\n\n"):
        self.model, self.tok, self.settings, self.stop_text = model, tok, settings, stop_text
        self.turns = []  # "line\nanswer\n\n" per finished turn, oldest first
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(settings.seed)

    def context(self, line):
        """The prompt for `line`: as many recent turns as fit in block_size tokens, then the line."""
        window = context_window(self.model)
        while self.turns and len(self.tok.encode("".join(self.turns) + line + "\n")) > window:
            self.turns.pop(0)  # the oldest turn goes first
        return "".join(self.turns) + line + "\n"

    def answer(self, line, write):
        """Stream the answer to `line` through write(text); Ctrl-C ends it early. Returns the answer."""
        s, pieces = self.settings, []
        try:
            for piece in stream_text(self.model, self.tok, self.context(line), s.max_new_tokens,
                                     stop_text=self.stop_text, temperature=s.temperature, top_k=s.top_k,
                                     top_p=s.top_p, generator=self.generator):
                pieces.append(piece)
                write(piece)
        except KeyboardInterrupt:
            write(" [stopped]")
        self.turns.append(line + "\n" + "".join(pieces) + "\n\n")
        return "".join(pieces)

    def command(self, line):
        """Apply a slash command; returns the message to show, or None for /quit."""
        name, _, value = line.partition(" ")
        if name == "/quit":
            return None
        if name == "/help":
            return HELP + "\nnow: " + ", ".join(f"{k}={v}" for k, v in vars(self.settings).items())
        if name == "/reset":
            self.turns = []
            return "(conversation forgotten)"
        if name not in COMMANDS:
            return f"unknown command {name}: /help lists them"
        field, kind = COMMANDS[name]
        try:
            new = Settings(**{**vars(self.settings), field: kind(value)})
            check_sampling_args(new.temperature, new.top_k, new.top_p)
            if new.max_new_tokens < 1:
                raise ValueError(f"/max must be >= 1, got {new.max_new_tokens}")
        except ValueError as e:
            return f"not changed: {e if value else f'{name} needs a value, e.g. {name} 1'}"
        self.settings = new
        if field == "seed":
            self.generator.manual_seed(new.seed)
        return f"{field} = {getattr(new, field)}"


def chat_loop(chat, out=None):
    """Read lines until EOF or /quit, answering each on `out` (default stdout). input() also reads a pipe."""
    out = out or sys.stdout

    def write(text):
        out.write(text)
        out.flush()

    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n(Ctrl-D or /quit to leave)\n")
            continue
        if not line:
            continue
        if line.startswith("/"):
            message = chat.command(line)
            if message is None:
                return
            write(message + "\n")
            continue
        chat.answer(line, write)
        write("\n")


def build_parser():
    p = argparse.ArgumentParser(description="Chat with a trained run in the terminal.")
    p.add_argument("run", help="run directory (or a file in it), e.g. out/gpt")
    p.add_argument("--temperature", type=float, default=Settings.temperature,
                   help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus probability in (0, 1] (default: off)")
    p.add_argument("--max-new-tokens", type=int, default=Settings.max_new_tokens,
                   help="longest answer (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--stop", default="\\n\\n",
                   help='an answer ends at this text (default: "%(default)s"; "" for none)')
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | mps (default: %(default)s)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    settings = Settings(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.seed)
    try:
        check_sampling_args(settings.temperature, settings.top_k, settings.top_p)
        if settings.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {settings.max_new_tokens}")
        model, tok, _ = load_run(args.run, device=args.device)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # not on every platform; input() works without it
            pass
    stop = args.stop.replace("\\n", "\n").replace("\\t", "\t") or None
    print(f"{args.run}: context {context_window(model)} tokens. /help for commands, Ctrl-D to leave.")
    chat_loop(Chat(model, tok, settings, stop))


if __name__ == "__main__":
    main()
