"""Stages 24, 25 — chat: talk to a trained model in the terminal.

Each line you type is a prompt; the answer streams back as it is generated,
one complete character at a time (StreamDecoder), so Japanese prints cleanly.
The conversation so far, your lines and its answers, stays in the context up
to block_size tokens; when it grows past that, the oldest whole turns are
dropped. A base model does not "reply": it continues the text, so a turn is
your line, a newline, then its continuation up to a blank line (--stop) or
/max tokens. A chat run (its tokenizer has the chat tokens, see finetune.py)
takes turns: the conversation goes through the chat template, the answer ends
at <|end|>, and /system sets a system message that is never dropped.

New since stage 19: a loop around `sample.stream_text` with settings that
change as you talk; since stage 25, turns through the chat template. Run it:

    python cli.py out/gpt
    > ROMEO:
    (the answer streams here)
    > /temp 0.8

Commands: /temp T, /top-k K, /top-p P, /penalty P, /max N, /seed S, /system TEXT,
/reset, /help, /quit (or Ctrl-D). Ctrl-C stops the current answer, not the program.
"""
import argparse
import sys
from dataclasses import dataclass

import torch

from char_tokenizer import replace_unencodable_output
from chat_format import chat_ids, encode_chat
from checkpoint import load_run
from sample import check_sampling_args, compile_for_generation, context_window, stream_text

HELP = """commands:
  /temp T     temperature (0 = greedy)        /top-k K   keep the K most likely tokens (0 = off)
  /top-p P    nucleus probability in (0, 1]    /max N     longest answer, in tokens
  /penalty P  repetition penalty (1 = off; a chat run's answers count only their own tokens)
  /seed S     restart the random numbers       /reset     forget the conversation (not /system)
  /system T   the system message (chat runs; /system alone removes it)
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
    repetition_penalty: float = 1.0  # > 1 discourages repeats; in a chat, of the answer's own tokens only


COMMANDS = {  # command -> (Settings field, type)
    "/temp": ("temperature", float),
    "/top-k": ("top_k", int),
    "/top-p": ("top_p", float),
    "/max": ("max_new_tokens", int),
    "/seed": ("seed", int),
    "/penalty": ("repetition_penalty", float),
}


class Chat:
    """One conversation with one model: the turns so far, the system message and the sampling settings."""

    def __init__(self, model, tok, settings, stop_text=None):
        self.model, self.tok, self.settings = model, tok, settings
        self.chat_tokens = chat_ids(tok)  # None: a base model, which continues text
        # a base model's turn ends at a blank line; a chat model's at <|end|>, or at any other chat token,
        # which is never text (a role token would be the model speaking for the user)
        self.stop_text = stop_text if stop_text is not None or self.chat_tokens else "\n\n"
        self.stop_ids = list((self.chat_tokens or {}).values())
        self.turns = []  # (line, answer) per finished turn, oldest first
        self.system = ""  # the system message of a chat run; "" for none
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(settings.seed)

    def prompt(self, line):
        """The prompt for `line` after self.turns: text for a base model, the chat template's ids for a chat one."""
        if self.chat_tokens is None:
            return "".join(f"{said}\n{answer}\n\n" for said, answer in self.turns) + line + "\n"
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for said, answer in self.turns:
            messages += [{"role": "user", "content": said}, {"role": "assistant", "content": answer}]
        ids, _ = encode_chat(self.tok, messages + [{"role": "user", "content": line}], add_generation_prompt=True)
        return ids

    def context(self, line):
        """The prompt for `line`: as many recent turns as fit in block_size tokens, then the line."""
        window = context_window(self.model)

        def size(prompt):
            return len(prompt) if isinstance(prompt, list) else len(self.tok.encode(prompt))

        while self.turns and size(self.prompt(line)) > window:
            self.turns.pop(0)  # the oldest turn goes first, as a whole; the system message stays
        return self.prompt(line)

    def answer(self, line, write):
        """Stream the answer to `line` through write(text); Ctrl-C ends it early. Returns the answer."""
        s, pieces = self.settings, []
        try:
            for piece in stream_text(self.model, self.tok, self.context(line), s.max_new_tokens,
                                     stop_text=self.stop_text, stop_ids=self.stop_ids, temperature=s.temperature,
                                     top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
                                     penalize_prompt=not self.chat_tokens, generator=self.generator):
                pieces.append(piece)
                write(piece)
        except KeyboardInterrupt:
            write(" [stopped]")
        self.turns.append((line, "".join(pieces)))
        return "".join(pieces)

    def set_system(self, text):
        if self.chat_tokens is None:
            return "not changed: /system needs a chat run (this tokenizer has no chat tokens)"
        self.system = text
        return f"system: {text}" if text else "(system message removed)"

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
        if name == "/system":
            return self.set_system(value.strip())
        if name not in COMMANDS:
            return f"unknown command {name}: /help lists them"
        field, kind = COMMANDS[name]
        try:
            new = Settings(**{**vars(self.settings), field: kind(value)})
            check_sampling_args(new.temperature, new.top_k, new.top_p, new.repetition_penalty)
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
    p.add_argument("--repetition-penalty", type=float, default=Settings.repetition_penalty,
                   help="> 1 discourages repeats; on a chat run it counts the answer's own tokens, not the "
                   "conversation's (default: %(default)s, off)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--stop", default=None, help='an answer ends at this text (default: a blank line, "\\n\\n", '
                   'on a base run; none on a chat run, whose answers end at <|end|>; "" for none)')
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | mps (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model: faster answers after a first "
                   "one that compiles for tens of seconds")
    return p


def main(argv=None):
    replace_unencodable_output()
    args = build_parser().parse_args(argv)
    settings = Settings(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.seed,
                        args.repetition_penalty)
    try:
        check_sampling_args(settings.temperature, settings.top_k, settings.top_p, settings.repetition_penalty)
        if settings.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {settings.max_new_tokens}")
        model, tok, _ = load_run(args.run, device=args.device)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.compile:
        compile_for_generation(model)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # not on every platform; input() works without it
            pass
    stop = args.stop.replace("\\n", "\n").replace("\\t", "\t") if args.stop is not None else None
    chat = Chat(model, tok, settings, stop)
    kind = "a chat run, taking turns" if chat.chat_tokens else "a base run, continuing your text"
    print(f"{args.run}: {kind}; context {context_window(model)} tokens. /help for commands, Ctrl-D to leave.")
    chat_loop(chat)


if __name__ == "__main__":
    main()
