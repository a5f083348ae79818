"""`dsv4-jax convert SRC DST`: a released DeepSeek-V4 checkpoint folder -> this package's Orbax layout, streamed
layer by layer (peak host memory about one 1 GiB part plus Orbax's copy of it), FP8/FP4 bytes kept as stored.

An interruption (Ctrl-C) or a full disk keeps `DST.partial`; the same command resumes from it."""

from __future__ import annotations

import errno
import os
import shlex

from dsv4_jax.cli.errors import DataError, Interrupted, UsageError, quiet_background_errors


def add_parser(sub):
    p = sub.add_parser("convert", help="convert a released safetensors checkpoint to Orbax (streaming)")
    p.add_argument("src", help="released checkpoint folder (config.json, model.safetensors.index.json, shards)")
    p.add_argument("dst", help="output folder (written as DST.partial, renamed when complete)")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP layer")
    p.add_argument("--part-gb", type=float, default=1.0, help="largest Orbax item in GiB (host-memory bound)")
    p.add_argument("--compress", action="store_true", help="zstd-compress the arrays (slower, FP8/FP4 shrink little)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _command(args) -> str:
    """The command line that resumes this conversion (the same source and output options: a different one would not
    match the partial folder's fingerprint and would start over)."""
    words = ["dsv4-jax", "convert", args.src, args.dst]
    words += ["--no-mtp"] * args.no_mtp + ["--compress"] * args.compress
    words += ["--part-gb", str(args.part_gb)] if args.part_gb != 1.0 else []
    return shlex.join(words)


def run(args) -> int:
    from dsv4_jax.checkpoint.convert import convert, partial_dir
    from dsv4_jax.paths import user_path

    if args.part_gb <= 0:
        raise UsageError(f"--part-gb must be positive, got {args.part_gb}")
    dst = user_path(args.dst)
    if os.path.exists(dst) and not args.overwrite:
        raise UsageError(f"{dst} already exists (add --overwrite to replace it)")
    partial = partial_dir(dst)
    try:
        with quiet_background_errors(getattr(args, "debug", False)):
            dst = convert(args.src, dst, mtp=False if args.no_mtp else None, part_bytes=int(args.part_gb * 2**30),
                          compress=args.compress, overwrite=args.overwrite, progress=not args.quiet)  # fmt: skip
    except KeyboardInterrupt as e:
        if os.path.isdir(partial):
            raise Interrupted(f"interrupted; the partial conversion is kept in {partial}: re-run `{_command(args)}` "
                              "to resume") from e  # fmt: skip
        raise Interrupted("interrupted before anything was written") from e
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        kept = f"the partial conversion is kept in {partial}" if os.path.isdir(partial) else "nothing was kept"
        raise DataError(f"no space left on device while writing {dst}; {kept}: free space, then re-run "
                        f"`{_command(args)}` to resume") from e  # fmt: skip
    st = convert.last_stats
    gbs = st["bytes"] / 1e9 / max(st["seconds"], 1e-9)
    print(f"converted {args.src} -> {dst}: {st['bytes'] / 1e9:.3f} GB, {st['items']} items, {st['seconds']:.1f} s "
          f"({gbs:.2f} GB/s), peak RSS {st['peak_rss'] / 2**30:.2f} GiB")  # fmt: skip
    return 0
