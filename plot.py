"""Plots — loss curves of one or more runs on the same axes.

Training writes `out/<run>/loss.png` by itself at each evaluation; this
command overlays several runs so they can be compared:

    python plot.py out/gpt out/llama --out compare.png

matplotlib is an optional extra (`pip install matplotlib`).
"""
import argparse
import sys
from pathlib import Path

from char_tokenizer import replace_unencodable_output
from checkpoint import METRICS, plot_losses, read_metrics, resolve_run_dir


def main(argv=None):
    replace_unencodable_output()
    p = argparse.ArgumentParser(description="Overlay the loss curves of training runs.")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default="compare.png", help="image to write (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        runs = {}
        for run in args.runs:
            run_dir = resolve_run_dir(run)
            if not (run_dir / METRICS).is_file():
                raise FileNotFoundError(f"{run_dir} has no {METRICS} yet: train it first")
            runs[str(run_dir)] = read_metrics(run_dir / METRICS)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not plot_losses(runs, Path(args.out)):
        print("error: plotting needs matplotlib: pip install matplotlib", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
