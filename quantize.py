"""Stage 29 — quantization: the same model in fewer bits.

A trained model's Linear weights are float32, 4 bytes each. Weight-only
quantization stores each weight as a small integer q and keeps one float
scale per group of weights, so that w ≈ q · scale. Symmetric means no offset:
zero stays exactly zero, and scale = max|w| / q_max over the group.

    int8: q in [−127, 127], one scale per output channel (a row of the matrix)
    int4: q in [−7, 7], one scale per `group_size` inputs of a row (a whole row
          would let one large weight flatten all the others onto a 15-level grid),
          two values packed into each byte

The error of each weight is at most half a step, scale / 2. The new run
directory holds the integers and scales as safetensors; checkpoint.load_run
turns them back into float weights, so sample, evaluate, cli and server load
it like any run. `--dynamic` also marks an int8 run for torch's dynamic int8
Linear (torch.ao.quantization.quantize_dynamic): weights stay int8 in memory,
each input is quantized on the fly and the product runs in int8, the fast
path on CPU.

New since stage 23: a run whose weights are integers. Run it:

    python quantize.py out/gpt --bits 8 --out out/gpt-int8
    python quantize.py out/gpt --bits 4 --group-size 64 --out out/gpt-int4
    python quantize.py out/gpt --bits 8 --dynamic --out out/gpt-dyn8
    python evaluate.py out/gpt-int8            # then compare bits/char with out/gpt
"""
import argparse
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from char_tokenizer import replace_unencodable_output
from checkpoint import (CONFIG, DYNAMIC_INT8, WEIGHTS, atomic_write, dequantize, load_run, resolve_run_dir,
                        write_json)

Q_MAX = {8: 127, 4: 7}  # symmetric ranges: −8 (the 16th 4-bit value) stays unused so +x and −x match


def symmetric_quantize(w, bits, group_size):
    """w (out, in) float -> q (out, in) int8 in [−Q_MAX, Q_MAX], scale (out, in / group_size) float32.

    Example, 8 bits, one row (0.5, −1.27, 0.01): scale = 1.27 / 127 = 0.01, q = (50, −127, 1).
    """
    n_out, n_in = w.shape
    groups = w.float().view(n_out, n_in // group_size, group_size)  # (out, in) -> (out, G, g)
    scale = groups.abs().amax(dim=-1, keepdim=True) / Q_MAX[bits]  # (out, G, 1)
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero group: any scale, q = 0
    q = torch.round(groups / scale).clamp(-Q_MAX[bits], Q_MAX[bits]).to(torch.int8)
    return q.view(n_out, n_in), scale.squeeze(-1)  # (out, G, g) -> (out, in); (out, G, 1) -> (out, G)


def quantize_int8(w):
    """Per output channel: q int8 (out, in), scale (out, 1)."""
    return symmetric_quantize(w, 8, w.shape[1])


def pack_int4(q):
    """int8 (…, N) in [−8, 7], N even -> uint8 (…, N/2): value + 8 in 4 bits, the first in the low half.

    pack_int4(tensor([1, -2])) = tensor([0x69]): 1 + 8 = 9 low, −2 + 8 = 6 high.
    """
    nibbles = (q.to(torch.int16) + 8).to(torch.uint8).view(*q.shape[:-1], -1, 2)  # (…, N) -> (…, N/2, 2)
    return nibbles[..., 0] | (nibbles[..., 1] << 4)  # (…, N/2, 2) -> (…, N/2)


def quantize_int4(w, group_size=64):
    """Group-wise: q packed uint8 (out, in/2), scale (out, in / group_size)."""
    q, scale = symmetric_quantize(w, 4, group_size)
    return pack_int4(q), scale


def linear_weight_names(model):
    """State-dict names of every nn.Linear weight, tied aliases included (a tied head is the embedding)."""
    ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Linear)}
    return {name for name, t in model.state_dict().items() if t.data_ptr() in ptrs}


def check_group_size(tensors, names, bits, group_size):
    """ValueError before any work if a 4-bit group does not tile every Linear input width."""
    if bits != 4:
        return
    if group_size < 2 or group_size % 2:
        raise ValueError(f"--group-size {group_size}: use an even number such as 32, 64 or 128")
    for name in sorted(names):
        width = tensors[name].shape[1]
        if width % group_size:
            fits = [g for g in (128, 64, 32, 16, 8) if width % g == 0]
            raise ValueError(f"--group-size {group_size} does not divide the input width {width} of {name}: "
                             f"try --group-size {fits[0] if fits else 2}")


def quantize_tensors(tensors, names, bits, group_size=64):
    """A new dict: every tensor in `names` as integers + "<name>_scale", the others unchanged."""
    out = {}
    for name, t in tensors.items():
        if name not in names:
            out[name] = t.contiguous()
            continue
        q, scale = quantize_int8(t) if bits == 8 else quantize_int4(t, group_size)
        out[name], out[name + "_scale"] = q.contiguous(), scale.contiguous()
    return out


def quantize_run(src, out, bits, group_size=64, dynamic=False):
    """Write a quantized copy of run `src` into the new directory `out`; `src` is only read.

    Returns {"names": quantized tensors, "max_error_in_steps": worst |w − q·scale| / scale,
    "bytes": (source weights, quantized weights)}.
    """
    src_dir = resolve_run_dir(src)
    out = Path(out)
    if dynamic and bits != 8:
        raise ValueError("--dynamic runs torch's int8 Linear: use it with --bits 8")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} already exists and is not empty: pick a new --out (the source run is never "
                         f"overwritten)")
    model, _, config = load_run(src_dir)
    if "quantization" in config:
        raise ValueError(f"{src_dir} is already quantized: quantize its source run "
                         f"{config['quantization'].get('source', '')}")
    tensors = load_file(src_dir / WEIGHTS)
    names = linear_weight_names(model) & set(tensors)
    check_group_size(tensors, names, bits, group_size)
    quantized = quantize_tensors(tensors, names, bits, group_size)
    worst = 0.0
    for name in names:
        scale = quantized[name + "_scale"]  # (out, G)
        back = dequantize(quantized[name], scale, bits)  # (out, in)
        step = scale.repeat_interleave(back.shape[1] // scale.shape[1], dim=1)  # (out, G) -> (out, in)
        worst = max(worst, ((back - tensors[name].float()).abs() / step).max().item())
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS, lambda tmp: save_file(quantized, tmp, metadata={"bits": str(bits)}))
    shutil.copyfile(src_dir / config["tokenizer_file"], out / config["tokenizer_file"])
    config["quantization"] = {"bits": bits, "scheme": "symmetric",
                              "granularity": "per output channel" if bits == 8 else f"groups of {group_size}",
                              "group_size": None if bits == 8 else group_size,
                              "runtime": DYNAMIC_INT8 if dynamic else "dequantize", "source": str(src_dir)}
    write_json(out / CONFIG, config)
    return {"names": sorted(names), "max_error_in_steps": worst,
            "bytes": ((src_dir / WEIGHTS).stat().st_size, (out / WEIGHTS).stat().st_size)}


def build_parser():
    p = argparse.ArgumentParser(description="Write a weight-quantized copy of a trained run.")
    p.add_argument("run", help="the trained run directory (only read)")
    p.add_argument("--bits", type=int, choices=(8, 4), required=True, help="8 (per channel) or 4 (group-wise)")
    p.add_argument("--out", required=True, help="the new run directory to write")
    p.add_argument("--group-size", type=int, default=64, help="inputs per scale for 4 bits (default: %(default)s)")
    p.add_argument("--dynamic", action="store_true",
                   help="load with torch's dynamic int8 Linear (8 bits, CPU): the fast path")
    return p


def main(argv=None):
    replace_unencodable_output()
    args = build_parser().parse_args(argv)
    try:
        report = quantize_run(args.run, args.out, args.bits, args.group_size, args.dynamic)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    before, after = report["bytes"]
    print(f"quantized {len(report['names'])} Linear weights to {args.bits} bits: {', '.join(report['names'][:3])}"
          f"{' …' if len(report['names']) > 3 else ''}")
    print(f"worst weight error: {report['max_error_in_steps']:.3f} of a scale step (at most 0.5 by construction)")
    print(f"model.safetensors: {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB ({before / after:.1f}× smaller)")
    print(f"next: python sample.py --model-checkpoint {args.out}   |   python evaluate.py {args.out}")


if __name__ == "__main__":
    main()
