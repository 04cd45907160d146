"""Stages 18, 23 — the run directory: save, resume, load.

Everything a run needs lives in one directory, `out/<run>/`:

    config.json            how to rebuild the model and the run (human-readable)
    tokenizer.json|.model  the run's own tokenizer
    model.safetensors      the latest weights   (what sample / evaluate / cli load)
    best.safetensors       the weights at the best validation loss
    checkpoint_latest.pt   the full training state, for `train.py --resume`
    metrics.jsonl          one JSON object per log or evaluation (read_metrics)
    loss.png               the losses so far (plot_losses)

Two rules keep it safe. Every write is atomic (a temporary file, fsync, then
a rename), so killing the process at any instant leaves the previous
checkpoint whole. And nothing here unpickles arbitrary objects: weights come
from safetensors, the training state through `torch.load(weights_only=True)`.

The command lines' settings live here too: one flag per dataclass field, and
`--config FILE.json`, which reads flags from a file such as a run's config.json.

New since stage 17: persistence. Run the demo: `python checkpoint.py`
"""
import argparse
import dataclasses
import inspect
import json
import os
import pickle
import random
import re
import sys
import tempfile
import time
import types
import typing
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from bigram_lm import BigramLM
from bpe_tokenizer import load_tokenizer
from dataset import atomic_write, atomic_write_bytes
from transformer import ModelConfig, Transformer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
BEST_WEIGHTS = "best.safetensors"
STATE = "checkpoint_latest.pt"
METRICS = "metrics.jsonl"


def resolve_run_dir(path):
    """A run directory from a directory or any file inside one (e.g. checkpoint_latest.pt)."""
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no {CONFIG}): "
                                f"pass the --out directory of a training run, e.g. out/gpt")
    return run_dir


def model_config_dict(model):
    """What config.json needs to rebuild `model`."""
    if isinstance(model, BigramLM):
        return {"model": "bigram", "vocab_size": model.vocab_size}
    return {"model": "transformer", **dataclasses.asdict(model.config)}


def build_model(model_cfg):
    """The inverse of `model_config_dict`: an untrained model of the same shape."""
    fields = dict(model_cfg)
    kind = fields.pop("model")
    if kind == "bigram":
        return BigramLM(fields["vocab_size"])
    if kind == "transformer":
        return Transformer(ModelConfig(**fields))
    raise ValueError(f"unknown model kind {kind!r} in {CONFIG}")


def write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def save_weights(model, path):
    """Weights as safetensors, atomically; tied weights are stored once."""
    atomic_write(path, lambda tmp: save_model(model, tmp))


def pick_device(name):
    """The device to run on: "auto" picks the best one here; "cpu", "cuda" or "mps" only if present."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name} is not available on this machine; use --device cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r} is not one of auto, cpu, cuda, mps")
    return name


def busy_share(before, after):
    """The share of the machine's CPU time spent busy between two readings of /proc/stat's first line
    ("cpu  user nice system idle iowait irq softirq steal ..."): 1 − (idle + iowait) / total, in [0, 1]."""
    a, b = ([int(v) for v in line.split()[1:9]] for line in (before, after))
    total = sum(b) - sum(a)
    return 1 - ((b[3] + b[4]) - (a[3] + a[4])) / total if total > 0 else 0.0


def cores_busy(seconds=0.1):
    """How many cores other programs keep busy right now (Linux's /proc/stat; 0 where it cannot be read)."""
    try:
        before = Path("/proc/stat").read_text(encoding="utf-8").split("\n", 1)[0]
        time.sleep(seconds)
        after = Path("/proc/stat").read_text(encoding="utf-8").split("\n", 1)[0]
    except OSError:
        return 0
    return round(busy_share(before, after) * (os.cpu_count() or 1))


def pick_threads(requested, default, busy):
    """Intra-op threads of a CPU run: `requested` (--threads N); 0 (auto) is the default, one per core, less
    the cores other programs keep busy, at least 1. Why: a thread that shares its core with another program
    holds up every operation, which waits for all threads (bench_speed.py threads: 2 threads next to one busy
    core trained at a third of one thread's speed; on an idle machine they were 1.5× as fast)."""
    if requested < 0:
        raise ValueError(f"--threads {requested}: give a number of threads, or 0 to choose them automatically")
    return requested or max(1, default - busy)


def set_cpu_threads(requested):
    """Apply --threads to this process; returns a note for the run's header: "2 threads (auto, …)"."""
    if not requested and "OMP_NUM_THREADS" in os.environ:  # chosen already, by the user or by torchrun
        return f"{torch.get_num_threads()} threads (OMP_NUM_THREADS)"
    busy = 0 if requested else cores_busy()
    threads = pick_threads(requested, torch.get_num_threads(), busy)
    torch.set_num_threads(threads)
    return f"{threads} thread{'s' * (threads > 1)}" + ("" if requested else f" (auto: {busy} of "
                                                                              f"{os.cpu_count()} cores busy)")


def first_mismatch(tensors, expected):
    """What is wrong with the first tensor of `tensors` that does not fit `expected` (both name -> tensor), or None.

    A renamed tensor shows up twice, as a name that is missing and a stray one: the answer names both.
    """
    stray = [name for name in tensors if name not in expected]
    for name, want in expected.items():
        if name not in tensors:
            instead = f" (the file has {stray[0]} {list(tensors[stray[0]].shape)} instead)" if stray else ""
            return f"{name} {list(want.shape)} is missing{instead}"
        if tensors[name].shape != want.shape:
            return f"{name} is {list(tensors[name].shape)} in the file but {list(want.shape)} in the model"
    if stray:
        return f"{stray[0]} {list(tensors[stray[0]].shape)} is unexpected: the model has no such tensor"
    return None


def check_state_dict(tensors, model, source):
    """Raise ValueError naming the first tensor of `tensors` (from the file `source`) that does not fit `model`.

    Checked before load_state_dict, whose error lists every mismatch over many lines and says nothing of the fix.
    """
    problem = first_mismatch(tensors, model.state_dict())
    if problem:
        raise ValueError(f"{source} does not fit the model in {CONFIG}: {problem}; "
                         f"load weights with the {CONFIG} of the run that saved them")


def load_weights(model, path, quantization=None):
    """Load safetensors weights into `model`, strictly (every tensor must match).

    `quantization` (config.json's entry of a quantize.py run) turns stored integers back into floats first.
    """
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is damaged or not a safetensors file ({e}); "
                         f"retrain, or resume from checkpoint_latest.pt") from None
    if quantization:
        tensors = dequantize_state(tensors, quantization["bits"])
    state = model.state_dict()
    for name in state:  # tied weights were stored once: give every alias the stored tensor
        if name not in tensors:
            twin = next((n for n in tensors if n in state and state[n].data_ptr() == state[name].data_ptr()), None)
            if twin is not None:
                tensors[name] = tensors[twin]
    check_state_dict(tensors, model, path)
    model.load_state_dict(tensors, strict=True)
    return model


def append_metrics(run_dir, row):
    if run_dir is not None:
        with open(Path(run_dir) / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path):
    """The rows of a metrics.jsonl. Rows are appended, so a process killed mid-write can leave a torn
    last line (and only that one): it is dropped."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    return [json.loads(line) for line in lines]


def plot_losses(runs, path):
    """Train and val loss against step, one pair of curves per run; `runs` maps a label to its rows.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_step, ax_tok) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in runs.items():
        for key, style in (("train_loss", "-"), ("val_loss", "o-")):
            pts = [(r["step"], r.get("tokens", 0), r[key]) for r in rows if key in r]
            if pts:
                steps, tokens, losses = zip(*pts)
                name = f"{label} {key.split('_')[0]}"
                ax_step.plot(steps, losses, style, ms=3, label=name)
                ax_tok.plot(tokens, losses, style, ms=3, label=name)
    ax_step.set_xlabel("step")
    ax_tok.set_xlabel("tokens seen")
    for ax in (ax_step, ax_tok):
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))  # a kill never leaves half a PNG
    plt.close(fig)
    return True


def save_run_files(run_dir, config, tokenizer, tokenizer_file):
    """The tokenizer, then config.json (so a run directory with a config always has its tokenizer)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / tokenizer_file, tokenizer.save)
    write_json(run_dir / CONFIG, config)


def save_training_state(run_dir, state):
    """checkpoint_latest.pt: plain tensors, numbers, strings, lists and dicts only."""
    atomic_write(Path(run_dir) / STATE, lambda tmp: torch.save(state, tmp))


def load_training_state(run_dir):
    """The training state, loaded without executing any pickled code."""
    path = Path(run_dir) / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: nothing to resume; start the run without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:160]
        raise ValueError(f"{path} is damaged or holds more than plain tensors ({reason}); "
                         f"delete it to restart the run from model.safetensors") from None


def read_config(run_dir):
    try:
        return json.loads((Path(run_dir) / CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{Path(run_dir) / CONFIG} is not valid JSON ({e})") from None


def load_run(path, device="cpu", weights=WEIGHTS):
    """Rebuild a trained model and its tokenizer from a run directory.

    Returns (model in eval mode on `device` ("auto" picks one), tokenizer, config dict).
    """
    device = pick_device(device)
    run_dir = resolve_run_dir(path)
    config = read_config(run_dir)
    if not (run_dir / weights).is_file():
        raise FileNotFoundError(f"{run_dir} has no {weights}: the run saved no weights yet; "
                                f"train it (python train.py --out {run_dir}) or resume it")
    tokenizer = load_tokenizer(run_dir / config["tokenizer_file"])
    model = build_model(config["model"])
    vocab = config["model"]["vocab_size"]
    if tokenizer.vocab_size != vocab:
        raise ValueError(f"vocab {vocab} in {CONFIG}, {tokenizer.vocab_size} in {config['tokenizer_file']}: "
                         f"pass the run's own tokenizer")
    quantization = config.get("quantization")
    load_weights(model, run_dir / weights, quantization)
    if quantization and quantization.get("runtime") == DYNAMIC_INT8:
        if torch.device(device).type != "cpu":
            raise ValueError(f"{run_dir} is a dynamic int8 run, which runs on CPU only: pass --device cpu")
        model = dynamic_int8(model.eval())
    return model.to(device).eval(), tokenizer, config


# --- Quantized runs (made by quantize.py, stage 29) --------------------------------------------
# quantize.py stores each Linear weight as integers, "<name>" (int8; for 4 bits uint8 holding two
# values per byte), plus float scales "<name>_scale", and records {"bits", "runtime", ...} under
# "quantization" in config.json. Loading multiplies them back into float weights, w ≈ q · scale,
# and, for the "dynamic-int8" runtime, swaps every Linear for torch's int8 one (CPU).
DYNAMIC_INT8 = "dynamic-int8"


def unpack_int4(packed):
    """uint8 (…, N/2) -> int8 (…, N) in [−8, 7]; each byte holds two values + 8, the first in its low 4 bits.

    unpack_int4(tensor([0x69])) = tensor([1, -2]): low nibble 9 − 8 = 1, high nibble 6 − 8 = −2.
    """
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).flatten(-2)  # (…, N/2, 2) -> (…, N)


def dequantize(q, scale, bits):
    """Integers and scales back to float32 weights (out, in): w ≈ q · scale, one scale per group.

    8 bits: q int8 (out, in), scale (out, 1), one group per row (per output channel).
    4 bits: q packed uint8 (out, in/2), scale (out, in/group_size).
    """
    if bits == 4:
        q = unpack_int4(q)
    elif bits != 8:
        raise ValueError(f"bits={bits} in {CONFIG}: quantized runs hold 8 or 4 bits; re-run quantize.py")
    n_out, n_in = q.shape
    groups = scale.shape[1]
    w = q.float().view(n_out, groups, n_in // groups) * scale.float()[:, :, None]  # (out, G, g) · (out, G, 1)
    return w.view(n_out, n_in)  # (out, G, g) -> (out, in)


def dequantize_state(tensors, bits):
    """Replace every integer tensor and its "_scale" with the float weight they stand for."""
    for name in [n for n, t in tensors.items() if not t.is_floating_point()]:
        scale = tensors.pop(name + "_scale", None)
        if scale is None:
            raise ValueError(f"{name} is stored as integers without {name}_scale: re-run quantize.py")
        if scale.shape[0] != tensors[name].shape[0]:  # one row of scales per output channel
            raise ValueError(f"{name} {list(tensors[name].shape)} and {name}_scale {list(scale.shape)} differ in "
                             f"rows: the quantized weights are damaged; re-run quantize.py")
        tensors[name] = dequantize(tensors[name], scale, bits)
    return tensors


def dynamic_int8(model):
    """Every nn.Linear as torch's dynamic int8 Linear (CPU): int8 weights with one scale per
    output channel, activations quantized on the fly, the matrix product in int8."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """The global random number generators' states (dropout draws from torch's), as plain
    lists and tensors so that `torch.load(weights_only=True)` can read them back."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss], "numpy": [keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state()}


def set_rng_state(saved):
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(saved["torch"])


# --- Settings: one flag per dataclass field, and --config files of flags ---------------------------------------

def flag(name):
    return "--" + name.replace("_", "-")


def field_comments(cls):
    """The trailing comment of each field in a dataclass's source: `n_layer: int = 4  # blocks`."""
    found = re.findall(r"^\s+(\w+): [^=#]+=[^#]*#\s*(.+)$", inspect.getsource(cls), flags=re.M)
    return dict(found)


def add_dataclass_flags(group, cls, defaults, suppress, skip=(), presets=None):
    """One flag per field of `cls` (but `skip`); its help is the field's comment.

    With `presets` (name -> instance), the help lists each preset's value instead of one default.
    """
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[X] -> X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = argparse.SUPPRESS if suppress else defaults.get(f.name, f.default)
        shown = ", ".join(f"{n}: {getattr(v, f.name)}" for n, v in presets.items()) if presets else "%(default)s"
        help_text = comments.get(f.name, f.name.replace("_", " ")).replace("%", "%%") + f" (default: {shown})"
        if kind is bool:
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            group.add_argument(flag(f.name), type=kind, default=default, help=help_text)


def config_file_words(path, parser, typed=()):
    """The flags a --config file stands for, as command-line words: argparse then checks and converts them as if
    typed. The file is {"flag_name": value, ...}, or a run's config.json: its "args" and the model fields of its
    "model" section that are flags of `parser`. Keys in `typed` are left out (the flags typed win); so are None
    values (a preset's default). Example: {"lr": 0.003, "bias": false} -> ["--lr", "0.003", "--no-bias"].
    """
    try:
        settings = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path} is not JSON ({e}): give a JSON object of flag names and values")
    if not isinstance(settings, dict):
        raise ValueError(f"--config {path} holds a JSON {type(settings).__name__}, not an object of flag names")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    if "args" in settings:  # a run's own config.json: how it was started and the model it built
        model = {k: v for k, v in settings.get("model", {}).items() if k in actions and k != "vocab_size"}
        settings = {**{k: v for k, v in settings["args"].items() if k not in ("resume", "config")}, **model}
    unknown = sorted(set(settings) - set(actions))
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {', '.join(unknown)}; a key is a flag's name with "
                         f"underscores (--min-lr: min_lr), see --help")
    positional, words = [], []
    for name, value in settings.items():
        action = actions[name]
        if name in typed or value is None:
            continue
        values = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        if isinstance(action, argparse.BooleanOptionalAction):
            words.append(action.option_strings[0 if value else 1])  # --bias / --no-bias
        elif not action.option_strings:
            positional += values
        elif value is not False:  # a store_true flag left off is no word
            words += [action.option_strings[0]] + ([] if action.nargs == 0 else values)
    return positional + words


def parse_flags(build_parser, argv):
    """(all flags, the typed ones, --overwrite): the second parse drops defaults, to tell typed from default.

    A --config FILE stands for its flags, as if typed before the others (so a typed flag wins).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = vars(build_parser().parse_args(argv))  # the full parser first: it prints --help with the defaults
    typed = vars(build_parser(suppress=True).parse_args(argv))
    if "config" in typed:
        argv = config_file_words(typed["config"], build_parser(), typed) + argv
        args = vars(build_parser().parse_args(argv))
        typed = vars(build_parser(suppress=True).parse_args(argv))
    for settings in (args, typed):  # a run records the flags the file stood for, not the file
        settings.pop("config", None)
    typed.pop("overwrite", None)
    return args, typed, args.pop("overwrite")


def _demo():
    from char_tokenizer import CharTokenizer

    tok = CharTokenizer.train("hello world")
    model = BigramLM(tok.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        config = {"model": model_config_dict(model), "tokenizer": "char", "tokenizer_file": "tokenizer.json"}
        save_run_files(tmp, config, tok, "tokenizer.json")
        save_weights(model, Path(tmp) / WEIGHTS)
        loaded, tok2, _ = load_run(tmp)
        print("files:", sorted(p.name for p in Path(tmp).iterdir()))
        print("same weights:", torch.equal(loaded.table.weight, model.table.weight))


if __name__ == "__main__":
    _demo()
