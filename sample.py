"""Stage 19 — sampling: turning next-token probabilities into text.

A trained model gives, at each step, logits over the vocabulary. How we pick
the next token from them shapes the text: always the most likely (greedy,
temperature 0) repeats itself; sampling from the full distribution wanders.
The rules below, each a small pure function on a logits vector, are applied
in this order:

    1. repetition penalty  (the CTRL rule: seen tokens' positive logits ÷ p, negative × p)
    2. temperature         (logits ÷ t; t = 0 means greedy)
    3. top-k               (keep the k largest logits)
    4. top-p, "nucleus"    (keep the smallest set whose probability reaches p)

`generate` runs the loop with a KV cache by default: the prompt is processed
once (prefill), then each step feeds only the newest token.

Past the context window (block_size = W tokens) a token cannot see all that
precedes it. Here the window, counted from the first prompt token, stays put
until it is full, then jumps forward by W//4 + 1 tokens and is computed afresh
(a new prefill); see `window_start`. So a token with more than W tokens before
it reads the last W − W//4 to W of them (¾ to all of a window), with positions
counted from the window's start and every layer's keys and values computed
from the window alone, as a position in a training block sees only its block.
`kv_cache=False` recomputes the same window at every step: the same tokens,
only slower, and so the reference that checks the cache.

A model with memory (memory.py) reads in segments instead: the context is the
tokens since the current segment's start (`segment_start`), and the memory holds
every segment before it, so the text read may be as long as you like.

New since stage 18: the trained run is put to use. Run it:

    python sample.py --model-checkpoint out/gpt --prompt "ROMEO:" --max-new-tokens 300
    python sample.py --model-checkpoint out/gpt --num-samples 3 --stop "\n\n" --temperature 0.8 --top-p 0.9
"""
import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from bpe_tokenizer import StreamDecoder
from char_tokenizer import replace_unencodable_output
from checkpoint import load_run

# Shapes: B batch, T time, V vocabulary.


def apply_repetition_penalty(logits, context, penalty, exempt=None):
    """Make tokens already in `context` less likely (penalty > 1) or more (< 1).

    logits (B, V), context (B, T) ids. Example with penalty 2: a seen token's
    logit 3.0 becomes 1.5 and −1.0 becomes −2.0; unseen tokens are untouched.
    The `exempt` ids (a 1-D tensor: the stop ids) keep their logits, so a penalty
    never keeps a reply from ending because the prompt's turns ended with <|end|>.
    """
    if penalty == 1.0 or context.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, context)  # (B, T) the logits of the tokens in the context
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    out = logits.scatter(1, context, seen)  # a token seen twice is penalised once
    if exempt is not None and exempt.numel():
        out[:, exempt] = logits[:, exempt]
    return out


def apply_top_k(logits, k):
    """Keep the k largest logits of each row, the rest −inf; k ≥ V keeps all."""
    if k is None or k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest value
    return logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th are kept


def apply_top_p(logits, p):
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p.

    logits (B, V) -> (B, V). The token whose probability crosses p is kept, so at
    least one token always survives, and tokens tied with the last kept one are
    kept too (as in top-k). Example: probabilities (0.5, 0.3, 0.2) with p = 0.6
    keep the first two: 0.5 alone falls short, 0.5 + 0.3 reaches 0.6.
    """
    if p is None or p >= 1.0:
        return logits
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass strictly before each token
    n_keep = (before < p).sum(dim=-1, keepdim=True)  # (B, 1), ≥ 1 because before[0] = 0 < p
    cutoff = sorted_logits.gather(1, n_keep - 1)  # (B, 1) the logit of the last kept token
    return logits.masked_fill(logits < cutoff, float("-inf"))


def next_token(logits, context, *, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
               generator=None, exempt=None):
    """Pick one token per row: logits (B, V) at the last position, context (B, T) -> ids (B,).

    The rules run in the order of the module docstring; temperature 0 is greedy
    (argmax after the repetition penalty; top-k and top-p cannot change an argmax).
    """
    logits = apply_repetition_penalty(logits.float(), context, repetition_penalty, exempt)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_top_p(apply_top_k(logits / temperature, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B, 1) -> (B,)


def check_sampling_args(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0):
    """ValueError for settings that have no meaning, naming the valid range."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top-p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top-k must be >= 0 (0 means off), got {top_k}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition penalty must be > 0 (1 means off), got {repetition_penalty}")


def context_window(model):
    """How many past tokens the model can attend to (a bigram model looks at one)."""
    config = getattr(model, "config", None)
    return config.block_size if config is not None else 1


def new_cache(model, batch_size):
    """A KV cache on the model's device and dtype (read from the embedding, never quantized); a static one
    for a model with a compiled decode step (compile_for_generation)."""
    p = next(model.parameters())
    return model.new_kv_cache(batch_size, device=p.device, dtype=p.dtype, static=hasattr(model, "decode_step"))


def window_start(length, window):
    """Where the context of the next token starts, with `length` tokens so far: it reads idx[:, start:length].

    Up to a full window nothing is dropped (start 0). Past it, the window jumps
    forward by window // 4 + 1 tokens each time it is full, so the next token reads
    between window − window // 4 and window tokens. Example with window 16 (jumps of 5):
    lengths 1…16 start at 0, lengths 17…21 at 5, lengths 22…26 at 10.
    """
    jump = window // 4 + 1
    return jump * math.ceil(max(0, length - window) / jump)


def segment_start(length, window):
    """Where the segment of the next token starts for a model with memory: segments of `window` tokens tile the
    text, so with window 16, lengths 1…16 start at 0, lengths 17…32 at 16."""
    return window * ((length - 1) // window)


@torch.inference_mode()
def _steps(model, idx, max_new_tokens, *, kv_cache=True, penalize_prompt=True, **rules):
    """Yield the next ids (B,) one step at a time: the one generation loop.

    Both paths read the same context, window_start(…) onwards. Without the cache
    the model recomputes that context at every step. With it, a new window is
    read once (prefill) and each later step feeds only the newest token, until
    the window jumps: then the cache is dropped and the new window read afresh.
    Refilling rather than rolling the cache is what keeps the two paths equal:
    from layer 2 up, a cached key was computed from tokens the new window no
    longer holds, so keeping it would give a context no recomputation sees.
    A model with memory first reads the prompt's whole segments into its memory;
    without the cache it starts again from the memory it had, at every step; the
    memory it had is put back at the end.
    The tokens live in one buffer allocated up front: a step writes its id in
    place instead of copying the whole sequence into a new tensor.
    A model made ready by compile_for_generation feeds its newest tokens through
    its compiled `decode_step`; a prefill runs eagerly, once per window.
    The repetition penalty reads the prompt and the new tokens, or with
    penalize_prompt=False the new tokens only: a chat reply may then quote the
    conversation (a name it was told) but is still kept from looping.
    """
    if idx.size(1) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    window = context_window(model)
    use_cache = kv_cache and hasattr(model, "new_kv_cache")
    memory = getattr(model, "has_memory", False)
    initial = model.get_memory_state() if memory else None
    decode = getattr(model, "decode_step", model)
    cache, cache_start = None, None
    length = idx.size(1)
    tokens = idx.new_empty(idx.size(0), length + max_new_tokens)  # (B, T + new), filled as the loop goes
    tokens[:, :length] = idx
    new = idx[:, -1]  # (B,) the newest ids so far
    penalty_start = 0 if penalize_prompt else length
    try:
        for _ in range(max_new_tokens):
            start = (segment_start if memory else window_start)(length, window)
            if memory and (not use_cache or cache_start is None):  # (re)read the segments before this one
                model.set_memory_state(initial)
                if start > 0:
                    model(tokens[:, :start])  # the model reads it segment by segment
            if not use_cache:
                logits, _ = model(tokens[:, start:length])  # recompute the whole window
            elif start != cache_start:  # the first step, or the window jumped: prefill it into a fresh cache
                cache, cache_start = new_cache(model, idx.size(0)), start
                logits, _ = model(tokens[:, start:length], cache=cache)  # (B, T) -> (B, T, V)
            else:
                # the newest only, the last step's ids: (B,) -> (B, 1) -> (B, 1, V). Not a slice of `tokens`, whose
                # strides follow the buffer's length: a compiled step would compile again for every prompt length
                logits, _ = decode(new[:, None], cache=cache)
            new = next_token(logits[:, -1, :], tokens[:, penalty_start:length], **rules)  # (B,)
            tokens[:, length] = new
            length += 1
            yield new
    finally:
        if memory:  # the memory is left as it was found: an unrelated text next starts from it, not from this one
            model.set_memory_state(initial)


class OneRowLinear(TorchFunctionMode):
    """F.linear on a single row (one token of one sequence) as a multiply and a sum over the inputs.

    Compiled, a linear layer calls the BLAS matrix product, which for one row of 128
    numbers spends most of its ~20 µs in the call itself (torch.profiler on a decode
    step). Written as a product and a sum, the compiler fuses it into its own
    vectorised loop inside the step's graph, with no library call: a decode step
    of the llama preset goes from about 1.0 to 0.65 ms. Two rows or more go to
    F.linear unchanged, where the library's kernels win.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[0].shape[:-1].numel() == 1:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            y = (x.unsqueeze(-2) * weight).sum(-1)  # (..., 1, C_in) * (C_out, C_in) -> (..., C_out)
            return y if bias is None else y + bias
        return func(*args, **kwargs)


def compile_for_generation(model):
    """Compile `model`'s one-token decode step for generation (--compile), and return the model.

    A decode step is ~100 small operations on one token: on a CPU the time goes to
    calling them more than to computing them, and compiling fuses them into few kernels.
    With a static KV cache (attention.KVCache) every step has the same shapes, so one
    graph serves every position with no shape guards (dynamic=False), compiled on the
    first step of each batch size. freezing makes the weights constants of the graph,
    prepared once rather than at every step: they are those of the first call, so load
    them before generating. One token's linear layers run as OneRowLinear writes them.
    The prefill, one call per window and of any length, stays eager. A model with
    memory carries state across calls on its layers, which a static step does not
    model: it compiles whole, shapes dynamic. The sums run in another order than the
    eager model's, so logits agree to float rounding and greedy output stays the same.
    """
    if getattr(model, "has_memory", False) or not hasattr(model, "new_kv_cache"):  # memory, or a bigram model
        model.compile(dynamic=True)
    else:
        def step(*args, **kwargs):
            with OneRowLinear():
                return model.forward(*args, **kwargs)

        # a plain function attribute, not a module: the model would otherwise hold itself as a child;
        # no size asserts: the wrapper around the kernels then checks no output's strides, at every step
        model.decode_step = torch.compile(step, dynamic=False, options={
            "freezing": True, "size_asserts": False, "alignment_asserts": False, "scalar_asserts": False})
    return model


def generate(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
             stop_ids=None, generator=None, kv_cache=True, penalize_prompt=True):
    """Continue every row of `idx` (B, T) by up to `max_new_tokens`; returns (B, T + new).

    A batch holds prompts of equal length (no padding: pad-free batching is what
    makes the rows independent). A row that emits a stop id repeats that id from
    then on; the loop ends when every row has stopped.
    """
    check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    stop = torch.tensor(sorted(stop_ids or []), dtype=torch.long, device=idx.device)
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    out = idx.new_empty(idx.size(0), idx.size(1) + max_new_tokens)  # (B, T + new)
    out[:, :idx.size(1)] = idx
    length = idx.size(1)
    for new in _steps(model, idx, max_new_tokens, kv_cache=kv_cache, penalize_prompt=penalize_prompt,
                      temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                      generator=generator, exempt=stop):
        if stop.numel():  # without stop ids no row ever stops: no test, and no sync with the device, per step
            new = torch.where(done, out[:, length - 1], new)  # a stopped row repeats its stop id
            done |= torch.isin(new, stop)
        out[:, length] = new
        length += 1
        if stop.numel() and done.all():
            break
    return out[:, :length]


def stream_generate(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None,
                    repetition_penalty=1.0, stop_ids=None, generator=None, kv_cache=True, penalize_prompt=True):
    """Like `generate` for one prompt idx (1, T), yielding each new id as an int as soon as it is made."""
    check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    if idx.size(0) != 1:
        raise ValueError(f"stream_generate takes one prompt, got a batch of {idx.size(0)}: use generate")
    stop = set(stop_ids or [])
    exempt = torch.tensor(sorted(stop), dtype=torch.long, device=idx.device)
    for new in _steps(model, idx, max_new_tokens, kv_cache=kv_cache, penalize_prompt=penalize_prompt,
                      temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                      generator=generator, exempt=exempt):
        token = int(new[0])
        yield token
        if token in stop:
            return


def prompt_ids(tok, prompt):
    """Prompt ids; an empty prompt starts from BOS, or from a newline where there is no BOS."""
    ids = tok.encode(prompt) if prompt else ([tok.bos_id] if tok.bos_id is not None else tok.encode("\n"))
    return ids


def held_back(text, stop_text):
    """How many trailing characters of `text` could be the start of `stop_text`.

    held_back("to be\n", "\n\n") = 1: that newline may begin the stop text.
    """
    for n in range(min(len(text), len(stop_text) - 1), 0, -1):
        if text.endswith(stop_text[:n]):
            return n
    return 0


def first_stop(text, stops):
    """Where the earliest of the texts `stops` begins in `text`, or −1: first_stop("ab\n\nc", ["\n\n"]) = 2."""
    return min((at for at in (text.find(s) for s in stops) if at >= 0), default=-1)


def stream_text(model, tok, prompt, max_new_tokens, stop_text=None, stop_ids=(), **kwargs):
    """Yield printable pieces of the continuation of `prompt`, ending before a stop text, a stop id or EOS.

    `prompt` is text, or a list of ids already encoded (a chat template's);
    `stop_text` one text or a list of them; `stop_ids` ids that end the answer
    unprinted, as EOS does. Text that may be the beginning of a stop text is held
    back until it is known not to be, so no part of a stop text is ever printed.
    The generator returns (read it with `yield from`) why it ended and how many
    tokens it generated, the stopping one included: ("stop" | "length", n).
    """
    decoder = StreamDecoder(tok)
    ids = prompt_ids(tok, prompt) if isinstance(prompt, str) else list(prompt)
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    stops = [s for s in ([stop_text] if isinstance(stop_text, str) else stop_text or []) if s]
    stop_ids = {*stop_ids, *([tok.eos_id] if tok.eos_id is not None else [])}
    pending, n_tokens, finish = "", 0, "length"  # pending: decoded text not yet yielded
    for token in stream_generate(model, idx, max_new_tokens, stop_ids=stop_ids, **kwargs):
        n_tokens += 1
        if token in stop_ids:
            finish = "stop"
            break
        pending += decoder.push(token)
        cut = first_stop(pending, stops)
        if cut >= 0:
            yield pending[:cut]
            return "stop", n_tokens
        ready = len(pending) - max((held_back(pending, s) for s in stops), default=0)
        if ready:
            yield pending[:ready]
            pending = pending[ready:]
    pending += decoder.flush()
    cut = first_stop(pending, stops)
    if cut >= 0:
        pending, finish = pending[:cut], "stop"
    yield pending
    return finish, n_tokens


def build_parser():
    p = argparse.ArgumentParser(description="Generate text from a trained run.")
    p.add_argument("--model-checkpoint", "--run", dest="run", default="out/gpt",
                   help="run directory or a file in it (default: %(default)s)")
    p.add_argument("--prompt", default="", help="text to continue (default: a newline, or BOS)")
    p.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=300, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus probability in (0, 1] (default: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats "
                   "(default: %(default)s)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples (default: %(default)s)")
    p.add_argument("--stop", default=None, help='stop at this text, e.g. "\\n\\n" (escapes allowed)')
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | mps (default: %(default)s)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole context every step")
    p.add_argument("--memory-in", metavar="FILE", help="a model with memory: start from this saved memory "
                   "(safetensors, from --memory-out)")
    p.add_argument("--memory-out", metavar="FILE", help="a model with memory: save its memory after reading the "
                   "prompt and the text generated (of the last sample)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model: faster steps after a first "
                   "call that compiles for tens of seconds")
    return p


def load_memory(path):
    """A memory state saved by --memory-out: {"blocks.0.attn.M": tensor, …}."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: give a file that sample.py --memory-out wrote")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a safetensors memory file ({e})") from None


def read_prompt(args):
    """The prompt from --prompt or --prompt-file (not both)."""
    if not args.prompt_file:
        return args.prompt
    if args.prompt:
        raise ValueError("give --prompt or --prompt-file, not both")
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{args.prompt_file} is not UTF-8 text: save it as UTF-8") from None


def main(argv=None):
    replace_unencodable_output()
    args = build_parser().parse_args(argv)
    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        prompt = read_prompt(args)
        model, tok, _ = load_run(args.run, device=args.device)
        if (args.memory_in or args.memory_out) and not getattr(model, "has_memory", False):
            raise ValueError(f"{args.run} has no memory layer: --memory-in/--memory-out need one (--preset infini)")
        if args.memory_in:
            model.set_memory_state(load_memory(args.memory_in))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.compile:
        compile_for_generation(model)
    stop = args.stop.replace("\\n", "\n").replace("\\t", "\t") if args.stop else None
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    try:
        for i in range(args.num_samples):
            if args.num_samples > 1:
                print(f"--- sample {i + 1} ---")
            sys.stdout.write(prompt)
            text = prompt
            for piece in stream_text(model, tok, prompt, args.max_new_tokens, stop_text=stop,
                                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                     repetition_penalty=args.repetition_penalty, generator=generator,
                                     kv_cache=not args.no_kv_cache):
                sys.stdout.write(piece)
                sys.stdout.flush()
                text += piece
            print()
        if args.memory_out:  # the memory of everything this sample read (generating left it as it was)
            with torch.inference_mode():
                model(torch.tensor([prompt_ids(tok, text)], device=next(model.parameters()).device))
            save_file(model.get_memory_state(), args.memory_out)
            print(f"memory: {args.memory_out}", file=sys.stderr)
    except KeyboardInterrupt:
        print()
        sys.exit(130)


if __name__ == "__main__":
    main()
