"""`dsv4-jax info PATH`: what a checkpoint holds: config summary, parameter counts (total and activated per token),
bytes per dtype, and KV-cache bytes per token of context. PATH is a released folder or a `dsv4-jax convert` output;
without PATH, the embedded tiny checkpoint that `generate` uses by default (built on first use);
`--preset tiny|flash|pro` describes a preset config instead (no checkpoint needed).

With `--mesh expert=2[,tensor=1,data=1]` (and `--rules`, `--batch`, `--context`, ...) it also prints the memory plan
of one device (`dsv4_jax.parallel.plan.memory_plan`): weights as they would be placed, cache, workspace, whether it
fits and the longest context / largest batch that would. Only the config is read: nothing is loaded."""

from __future__ import annotations

import json
from collections import Counter

import ml_dtypes
import numpy as np

from dsv4_jax.cli.errors import UsageError, flag_message
from dsv4_jax.parallel.plan import H200_BYTES, MEM_FRACTION, GiB
from dsv4_jax.sharding import RULE_PRESETS


def add_parser(sub):
    p = sub.add_parser("info", help="summarize a checkpoint (config, parameter counts, bytes per dtype)")
    p.add_argument("path", nargs="?", help="checkpoint folder (released safetensors or converted Orbax); default: "
                   "the embedded tiny checkpoint that `generate` uses")  # fmt: skip
    p.add_argument("--preset", choices=("tiny", "flash", "pro"), help="describe a preset config instead")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    g = p.add_argument_group("memory plan (printed when --mesh is given)")
    g.add_argument("--mesh", metavar="AXIS=N[,AXIS=N]", help="devices per mesh axis (data, expert, tensor), e.g. "
                   "expert=2 for 2 x H200 with the routed experts split in two")  # fmt: skip
    g.add_argument("--rules", default="ep", choices=sorted(RULE_PRESETS), help="sharding rules preset: ep = experts "
                   "split, the rest replicated; ep-tp = experts and heads / vocab / wo groups split over the expert "
                   "axis; default = heads on the tensor axis (default: ep)")  # fmt: skip
    g.add_argument("--batch", type=int, default=1, help="sequences served at once (default 1)")
    g.add_argument("--context", type=int, default=4096, help="tokens per sequence, prompt + generated (default 4096)")
    g.add_argument("--prefill-chunk", type=int, help="plan a chunked prefill of N tokens per step (`generate "
                   "--prefill-chunk N`) instead of the whole prompt in one step")  # fmt: skip
    g.add_argument("--prefill-rows", type=int, help="rows prefilled together (default: the whole batch; 1: each "
                   "prompt alone, then all rows decode together)")  # fmt: skip
    g.add_argument("--kv-dtype", default="fp8", choices=("fp8", "bf16"), help="the cache layout: fp8 (default) the "
                   "packed official layout, bf16 the exact model's rows (`generate --no-quant-sim`)")  # fmt: skip
    g.add_argument("--device-gib", type=float, default=H200_BYTES / GiB, help="memory of one device in GiB (default: "
                   "an H200's 140.4)")  # fmt: skip
    g.add_argument("--mem-fraction", type=float, default=MEM_FRACTION, help="share of it XLA may use "
                   "(XLA_CLIENT_MEM_FRACTION; default 0.95)")  # fmt: skip
    p.set_defaults(run=run)


HINT_CHUNK = 4096

# Plan keyword -> flag, for error messages (`context=70000 exceeds` -> `--context 70000 exceeds`).
_PLAN_FLAGS = {"batch": "--batch", "context": "--context", "prefill_chunk": "--prefill-chunk",
               "prefill_rows": "--prefill-rows", "mem_fraction": "--mem-fraction"}  # fmt: skip


def param_counts(cfg) -> dict[str, int]:
    """Logical parameter counts (packed FP4 bytes count 2 each; quantization scales not counted)."""
    from dsv4_jax.checkpoint.layout import param_table

    total = main = routed_main = 0
    for s in param_table(cfg):
        if s.path[-1] == "scale":
            continue
        n = 1
        for d in s.shape:
            n *= d
        if s.disk_dtype == "I8":
            n *= 2
        total += n
        if s.path[0] != "mtp":
            main += n
            if "experts" in s.path:
                routed_main += n
    active = main - routed_main + routed_main * cfg.n_activated_experts // cfg.n_routed_experts
    return {"total": total, "main": main, "mtp": total - main, "activated_per_token": active,
            "activated_per_token_no_embed": active - cfg.vocab_size * cfg.dim}  # fmt: skip


def read_config(path: str | None = None, preset: str | None = None):
    """The `Config` of a preset or of a checkpoint folder (its metadata only)."""
    from dsv4_jax.config import Config
    from dsv4_jax.paths import user_path

    if preset:
        return getattr(Config, preset)()
    from dsv4_jax.checkpoint.restore import detect_format

    path = user_path(path)
    if detect_format(path) == "orbax":
        from dsv4_jax.checkpoint.convert import read_meta

        return Config.from_hf(read_meta(path)["config"])
    from dsv4_jax.checkpoint.native import read_config as read_native_config

    return read_native_config(path)


def plan_for(cfg, args):
    """The memory plan the `--mesh` ... flags ask for; bad values are usage errors naming the flag."""
    from dsv4_jax.parallel.mesh import parse_mesh
    from dsv4_jax.parallel.plan import memory_plan
    from dsv4_jax.sharding import rules_preset

    try:
        mesh = parse_mesh(args.mesh)
    except ValueError as e:
        raise UsageError(f"--mesh: {e}") from None
    if args.device_gib <= 0:
        raise UsageError(f"--device-gib {args.device_gib} must be positive")
    try:
        return memory_plan(cfg, mesh, rules_preset(args.rules), args.batch, args.context, kv_dtype=args.kv_dtype,
                           prefill_chunk=args.prefill_chunk, prefill_rows=args.prefill_rows,
                           device_bytes=int(args.device_gib * GiB),
                           mem_fraction=args.mem_fraction)  # fmt: skip
    except ValueError as e:
        raise UsageError(flag_message(str(e), _PLAN_FLAGS)) from None


def summarize(path: str | None = None, preset: str | None = None, *, label: str | None = None) -> dict:
    """`label`: how the summary names the checkpoint (default: its path)."""
    from dsv4_jax.checkpoint.layout import param_table
    from dsv4_jax.config import Config
    from dsv4_jax.paths import user_path

    out: dict = {}
    by_dtype: Counter = Counter()
    if preset:
        cfg = getattr(Config, preset)()
        out["source"] = f"preset {preset}"
        for s in param_table(cfg):
            by_dtype[s.disk_dtype] += s.nbytes
    else:
        from dsv4_jax.checkpoint.restore import detect_format

        path = user_path(path)
        fmt = detect_format(path)
        out["source"] = f"{label or path} ({fmt})"
        if fmt == "orbax":
            from dsv4_jax.checkpoint.convert import read_meta

            meta = read_meta(path)
            cfg = Config.from_hf(meta["config"])
            for m in meta["params"].values():
                n = 1
                for d in m["shape"]:
                    n *= d
                by_dtype[m["dtype"]] += n * np.dtype(getattr(ml_dtypes, m["dtype"], m["dtype"])).itemsize
        else:
            from dsv4_jax.checkpoint.native import index_tensors, read_config

            cfg = read_config(path)
            for info in index_tensors(path).values():
                by_dtype[info.dtype] += info.nbytes
    out["config"] = {
        "dim": cfg.dim, "n_layers": cfg.n_layers, "n_mtp_layers": cfg.n_mtp_layers, "n_heads": cfg.n_heads,
        "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "n_routed_experts": cfg.n_routed_experts,
        "n_activated_experts": cfg.n_activated_experts, "n_shared_experts": cfg.n_shared_experts,
        "moe_inter_dim": cfg.moe_inter_dim, "expert_dtype": cfg.expert_dtype, "n_hash_layers": cfg.n_hash_layers,
        "window_size": cfg.window_size, "index_topk": cfg.index_topk, "hc_mult": cfg.hc_mult,
        "compress_ratios": "".join({0: "S", 4: "C", 128: "H"}[r] for r in cfg.compress_ratios),
    }  # fmt: skip
    out["params"] = param_counts(cfg)
    out["bytes_per_dtype"] = dict(sorted(by_dtype.items()))
    out["bytes_total"] = sum(by_dtype.values())
    try:
        from dsv4_jax.cache import cache_bytes_per_token
    except ImportError:
        cache_bytes_per_token = None
    if cache_bytes_per_token is not None:
        try:
            out["cache_bytes"] = {k: float(v) for k, v in cache_bytes_per_token(cfg).items()}
        except Exception as e:  # another module's function: report, do not fail the summary
            out["cache_bytes"] = f"unavailable ({type(e).__name__}: {e})"
    return out


def _fmt_n(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def run(args) -> int:
    if args.path and args.preset:
        raise UsageError("give a checkpoint PATH or --preset, not both")
    path, label = args.path, None
    if not path and not args.preset:  # what `generate` runs without --ckpt
        from dsv4_jax.checkpoint.default import ensure_default_checkpoint

        path = ensure_default_checkpoint()
        label = f"embedded tiny checkpoint (the default of `dsv4-jax generate`; random weights) at {path}"
    plan_defaults = {"batch": 1, "context": 4096, "prefill_chunk": None, "prefill_rows": None}
    plan_flags = [f for f, default in plan_defaults.items() if getattr(args, f) != default]
    if args.mesh is None and plan_flags:
        raise UsageError(f"--{plan_flags[0].replace('_', '-')} is a memory-plan flag: give --mesh too (e.g. --mesh "
                         "expert=2)")  # fmt: skip
    s = summarize(path, args.preset, label=label)
    plan = plan_for(read_config(path, args.preset), args) if args.mesh else None
    if args.json:
        if plan is not None:
            s["memory_plan"] = plan.as_dict()
        print(json.dumps(s, indent=2))
        return 0
    print(f"checkpoint: {s['source']}")
    c = s["config"]
    print(f"model: dim {c['dim']}, {c['n_layers']} layers (+{c['n_mtp_layers']} MTP), layer types "
          f"{c['compress_ratios']} (S sliding, C CSA 1/4, H HCA 1/128), {c['n_heads']} heads x {c['head_dim']}, "
          f"vocab {c['vocab_size']}")  # fmt: skip
    print(f"MoE: {c['n_routed_experts']} routed experts ({c['expert_dtype']}), top-{c['n_activated_experts']}, "
          f"{c['n_shared_experts']} shared, inter {c['moe_inter_dim']}, {c['n_hash_layers']} hash layers; window "
          f"{c['window_size']}, index_topk {c['index_topk']}, hc_mult {c['hc_mult']}")  # fmt: skip
    p = s["params"]
    print(f"parameters: {_fmt_n(p['total'])} total ({_fmt_n(p['main'])} main + {_fmt_n(p['mtp'])} MTP); "
          f"activated per token {_fmt_n(p['activated_per_token'])} "
          f"({_fmt_n(p['activated_per_token_no_embed'])} without the embedding)")  # fmt: skip
    print("bytes per dtype: " + ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in s["bytes_per_dtype"].items())
          + f"; total {s['bytes_total'] / 1e9:.3f} GB")  # fmt: skip
    cb = s.get("cache_bytes")
    if isinstance(cb, dict):
        print("KV cache per sequence: " + ", ".join(f"{k} {v:,.1f} B" for k, v in cb.items()))
    elif cb:
        print(f"KV cache: {cb}")
    if plan is not None:
        print(plan.summary())
        if not plan.fits and plan.prefill_chunk is None and plan.workspace_step.startswith("prefill"):
            args.prefill_chunk = HINT_CHUNK
            alt = plan_for(read_config(path, args.preset), args)
            if alt.max_context > plan.max_context:
                fit = "fits" if alt.fits else "does not fit"
                print(f"  hint: the whole-prompt prefill step dominates; with `generate --prefill-chunk {HINT_CHUNK}` "
                      f"(chunked prefill): {fit}, longest context at batch 1 {alt.max_context:,} tokens, "
                      f"largest batch at {alt.context:,} tokens {alt.max_batch}")  # fmt: skip
    return 0
