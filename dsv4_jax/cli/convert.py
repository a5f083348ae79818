"""`dsv4-jax convert SRC DST`: a released DeepSeek-V4 checkpoint folder -> this package's Orbax layout, streamed
layer by layer (peak host memory about one 1 GiB part plus Orbax's copy of it), FP8/FP4 bytes kept as stored."""

from __future__ import annotations


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


def run(args) -> int:
    from dsv4_jax.checkpoint.convert import convert

    if args.part_gb <= 0:
        raise ValueError(f"--part-gb must be positive, got {args.part_gb}")
    dst = convert(args.src, args.dst, mtp=False if args.no_mtp else None, part_bytes=int(args.part_gb * 2**30),
                  compress=args.compress, overwrite=args.overwrite, progress=not args.quiet)  # fmt: skip
    st = convert.last_stats
    gbs = st["bytes"] / 1e9 / max(st["seconds"], 1e-9)
    print(f"converted {args.src} -> {dst}: {st['bytes'] / 1e9:.3f} GB, {st['items']} items, {st['seconds']:.1f} s "
          f"({gbs:.2f} GB/s), peak RSS {st['peak_rss'] / 2**30:.2f} GiB")  # fmt: skip
    return 0
