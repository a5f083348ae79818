#!/usr/bin/env python
"""Writes a checkpoint in exactly the released DeepSeek-V4 layout from a preset config and a seed.

    python ckpt/write_tiny.py OUT                                  # Config.tiny(), init_random seed 0, MTP
    python ckpt/write_tiny.py OUT --seed 3 --shards 4 --no-mtp
    python ckpt/write_tiny.py OUT --preset flash --set n_layers=2 --set n_hash_layers=1 \\
        --set compress_ratios=4,128,0 --values random              # two full-size Flash layers (+MTP), ~13 GB

`--values init` writes `init_random` weights (a working model; needs it in memory), `--values random` streams random
bytes of the right formats per tensor (any size). The folder appears only when complete.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _value(text: str):
    if "," in text:
        return tuple(ast.literal_eval(t) for t in text.split(",") if t)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv=None) -> int:
    from dsv4_jax.checkpoint.writer import write_native
    from dsv4_jax.config import Config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="destination folder (must not exist unless --overwrite)")
    p.add_argument("--preset", choices=("tiny", "flash", "pro"), default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a Config field")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=None, help="number of files (default: one per layer, as released)")
    p.add_argument("--values", choices=("init", "random"), default="init")
    p.add_argument("--expert-dtype", choices=("fp4", "fp8"), default=None)
    p.add_argument("--no-mtp", action="store_true", help="leave out the mtp.* tensors (config keeps the MTP layer)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            p.error(f"--set {item!r}: expected FIELD=VALUE")
        k, v = item.split("=", 1)
        overrides[k] = _value(v)
    if args.expert_dtype:
        overrides["expert_dtype"] = args.expert_dtype
    try:
        cfg = getattr(Config, args.preset)(**overrides)
        t0 = time.perf_counter()
        out = write_native(cfg, args.out, args.seed, args.shards, values=args.values, mtp=not args.no_mtp,
                           overwrite=args.overwrite, progress=True)  # fmt: skip
    except (ValueError, OSError, TypeError) as e:
        print(f"write_tiny: error: {e}", file=sys.stderr)
        return 2
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    print(f"wrote {out}: {size / 1e9:.3f} GB in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
