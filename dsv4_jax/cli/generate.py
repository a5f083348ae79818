"""`dsv4-jax generate`: the main job. Restores a checkpoint (default: the embedded tiny model, written and converted
to Orbax on first use), tokenizes the prompt, streams generated tokens as they arrive and prints prefill / decode
throughput and compile time."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys

import numpy as np

from dsv4_jax.cli import compile_cache
from dsv4_jax.cli.errors import DataError, UsageError, flag_message, quiet_background_errors
from dsv4_jax.options import BACKENDS, KV_CACHES

# Sampler field -> the flag that sets it: the library's messages ("top_p=0.0 must be ...") are shown as flags.
SAMPLER_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                 "top_p": "--top-p"}  # fmt: skip
# A checkpoint larger than this shows a restore progress bar (on stderr) unless --no-progress.
PROGRESS_MIN_BYTES = 1 << 30


def _printable(data: bytes) -> bytes:
    """Control bytes (a random model emits them) escaped as `\\xNN`, so they cannot drive the terminal."""
    return b"".join(bytes([c]) if c >= 0x20 and c != 0x7F or c in b"\n\t" else b"\\x%02x" % c for c in data)


def add_parser(sub):
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--prompt", default=None, help="text prompt (default: 'Hello, DeepSeek-V4!')")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt")
    p.add_argument("--ckpt", default=None, help="Orbax (dsv4-jax convert) or released safetensors folder; default: "
                   "the embedded tiny model")  # fmt: skip
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's, else byte-level)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=None, help="cache capacity (default: prompt + new tokens, rounded "
                   "up to a multiple of 128)")  # fmt: skip
    p.add_argument("--no-quant-sim", action="store_true", help="exact arithmetic instead of the FP8/FP4 simulation")
    p.add_argument("--kv-cache", choices=KV_CACHES, default="auto", help="cache layout: fp8 (packed, the official "
                   "serving layout), bf16, or auto (default: fp8, bf16 with --no-quant-sim)")  # fmt: skip
    p.add_argument("--mtp", action="store_true", help="also run the MTP draft head at every step")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="kernels or the pure-JAX reference (default auto: kernels where they run, i.e. CUDA SM90 "
                   "with the extension installed; the reference elsewhere)")  # fmt: skip
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prefill prompts longer than N tokens in chunks of N (bounds prefill memory; default: the "
                   "whole prompt at once)")  # fmt: skip
    p.add_argument(
        "--mesh",
        metavar="AXIS=N[,AXIS=N]",
        default=None,
        help="place the model on a device mesh (data, expert, tensor), e.g. expert=2: the routed experts "
        "split over 2 GPUs (expert parallelism); the product of the sizes must be the device count",
    )
    p.add_argument("--rules", default="ep", help="sharding rules preset with --mesh (ep, ep-tp, default, replicated)")
    p.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent compilation cache "
                   f"({compile_cache.describe()})")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no restore progress bar (shown for checkpoints "
                   f"over {PROGRESS_MIN_BYTES / 2**30:g} GiB)")  # fmt: skip
    p.set_defaults(run=run)


def describe_backend(backend: str, ran: dict[str, str]) -> str:
    """`auto: kernels fp8_linear; reference moe_experts` from the ops' choices recorded while compiling."""
    kern = sorted(k for k, v in ran.items() if v != "reference")
    ref = sorted(k for k, v in ran.items() if v == "reference")
    if not ran:
        return f"{backend} (programs from the compilation cache: choices not recorded)"
    if not kern:
        return f"{backend}: reference (pure JAX) for every op"
    return f"{backend}: kernels for {', '.join(kern)}" + (f"; reference for {', '.join(ref)}" if ref else "")


def _round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


def load_model(ckpt: str | None, progress: bool = True, mesh=None, rules=None):
    """(state, folder or None, description). No `ckpt`: the embedded tiny checkpoint (`ensure_default_checkpoint`).
    `progress`: a restore progress bar if the checkpoint is over `PROGRESS_MIN_BYTES`. `mesh`/`rules`: restored
    straight into those shardings."""
    from dsv4_jax.checkpoint import restore
    from dsv4_jax.paths import user_path

    if ckpt is None:
        from dsv4_jax.checkpoint.default import ensure_default_checkpoint

        path = ensure_default_checkpoint()
        _, state = restore.load(path, mesh, rules)
        return state, None, f"embedded tiny checkpoint ({path})"
    ckpt = user_path(ckpt)
    progress = progress and restore.checkpoint_nbytes(ckpt) > PROGRESS_MIN_BYTES
    _, state = restore.load(ckpt, mesh, rules, progress=progress)
    return state, ckpt, ckpt


def mesh_from_flags(args):
    """(mesh or None, rules or None) from `--mesh` / `--rules`; bad values are usage errors naming the flag."""
    if args.mesh is None:
        return None, None
    from dsv4_jax.parallel.mesh import make_mesh, parse_mesh
    from dsv4_jax.sharding import RULE_PRESETS, rules_preset

    if args.rules not in RULE_PRESETS:
        raise UsageError(f"--rules {args.rules!r}: expected one of {', '.join(sorted(RULE_PRESETS))}")
    try:
        return make_mesh(**parse_mesh(args.mesh)), rules_preset(args.rules)
    except ValueError as e:
        raise UsageError(f"--mesh: {e}") from None


def run(args) -> int:
    import jax

    if not args.no_compile_cache:
        compile_cache.enable()
    from dsv4_jax import generation as G
    from dsv4_jax.options import Opts
    from dsv4_jax.paths import user_path
    from dsv4_jax.tokenizer import load_tokenizer

    if args.prompt is not None and args.prompt_ids is not None:
        raise UsageError("give --prompt or --prompt-ids, not both")
    if args.prompt is None and args.prompt_ids is None:
        args.prompt = "Hello, DeepSeek-V4!"
    if args.prompt is not None and args.prompt == "":
        raise UsageError("--prompt is empty")
    try:  # the Sampler checks the values; its messages name fields, which are shown as the flags here
        sampler = G.Sampler(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, mtp=args.mtp)  # fmt: skip
    except ValueError as e:
        raise UsageError(flag_message(str(e), SAMPLER_FLAGS)) from e
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise UsageError(f"--prefill-chunk must be positive, got {args.prefill_chunk}")
    if args.kv_cache == "fp8" and args.no_quant_sim:
        raise UsageError("--kv-cache fp8 needs the FP8 simulation: drop --no-quant-sim or use --kv-cache bf16")
    opts = Opts(quant_sim=not args.no_quant_sim, backend=args.backend, prefill_chunk=args.prefill_chunk,
                kv_cache=args.kv_cache)  # fmt: skip
    if args.max_len is not None and args.max_len < 1:
        raise UsageError(f"--max-len must be positive, got {args.max_len}")
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError as e:
            raise UsageError(f"--prompt-ids {args.prompt_ids!r} is not a list of integers") from e
        if not ids:
            raise UsageError("--prompt-ids is empty")
    mesh, rules = mesh_from_flags(args)
    with quiet_background_errors(getattr(args, "debug", False)):
        state, folder, desc = load_model(args.ckpt, progress=not args.no_progress, mesh=mesh, rules=rules)
    if args.backend != "reference":  # the kernels' formats, once (the loaded arrays are donated)
        import dsv4_jax

        state = dsv4_jax.prepare_params(state, donate=True)
    if mesh is not None:
        desc += f"; mesh {', '.join(f'{k}={v}' for k, v in mesh.shape.items())}, rules {args.rules}"
    cfg = state.config
    tok = load_tokenizer(user_path(args.tokenizer) if args.tokenizer else folder, cfg)
    if args.prompt_ids is None:
        ids = tok.encode(args.prompt)
    for i in ids:
        if not 0 <= i < cfg.vocab_size:
            if args.prompt_ids is not None:
                raise UsageError(f"--prompt-ids: token id {i} is outside the vocabulary [0, {cfg.vocab_size})")
            raise DataError(f"the tokenizer gave token id {i}, outside the model's vocabulary [0, {cfg.vocab_size}) "
                            "(a tokenizer of another model? see --tokenizer)")  # fmt: skip
    sampler = dataclasses.replace(sampler, eos_id=cfg.eos_token_id, pad_id=cfg.eos_token_id)
    need = G.capacity_needed(len(ids), sampler)
    max_len = args.max_len if args.max_len is not None else min(_round_up(need, 128), cfg.max_seq_len)
    if len(ids) > max_len:
        raise UsageError(f"the prompt has {len(ids)} tokens, more than --max-len {max_len}")
    if need > max_len:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} does not fit: a {len(ids)}-token prompt plus "
                         f"{args.max_new_tokens} new tokens needs {need} cache positions, "
                         f"--max-len is {max_len}")  # fmt: skip
    if max_len > cfg.max_seq_len:
        raise UsageError(f"--max-len {max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
    with contextlib.ExitStack() as scope:
        if mesh is not None:  # the expert-parallel MoE (a shard_map over "expert") runs with the mesh in context
            scope.enter_context(jax.set_mesh(mesh))
        return _generate(args, state, tok, ids, sampler, max_len, opts, desc)


def _generate(args, state, tok, ids, sampler, max_len: int, opts, desc: str) -> int:
    import jax

    from dsv4_jax import generation as G
    from dsv4_jax import ops
    from dsv4_jax.tokenizer import ByteTokenizer

    # Prefill width padded to a multiple of 64: nearby prompt lengths share one compiled program.
    width = min(_round_up(len(ids), 64), max_len)
    tokens = np.zeros((1, width), np.int32)
    tokens[0, : len(ids)] = ids
    stream = G.GenerationStream(state, tokens, [len(ids)], sampler=sampler, key=jax.random.key(args.seed),
                                max_len=max_len, opts=opts)  # fmt: skip
    print(f"model: {desc}; prompt: {len(ids)} tokens; max_len {max_len}", file=sys.stderr)
    with ops.record() as ran:
        compile_s = stream.compile()
    print(f"backend: {describe_backend(args.backend, ran)}", file=sys.stderr)
    out_ids = []
    is_bytes = isinstance(tok, ByteTokenizer)
    for t, active in stream:
        if not active[0]:
            break
        out_ids.append(int(t[0]))
        if is_bytes:
            sys.stdout.buffer.write(_printable(tok.token_bytes(int(t[0]))))
            sys.stdout.flush()
    text = tok.decode(out_ids)
    if not is_bytes:
        sys.stdout.write(_printable(text.encode()).decode(errors="replace"))
    sys.stdout.write("\n")
    sys.stdout.flush()
    n_dec = stream.decode_steps
    print(f"generated {len(out_ids)} tokens: {out_ids}", file=sys.stderr)
    print(f"compile {compile_s:.2f} s | prefill {len(ids)} tokens in {stream.prefill_s:.3f} s "
          f"({len(ids) / max(stream.prefill_s, 1e-9):.1f} tok/s) | decode {n_dec} steps in {stream.decode_s:.3f} s "
          f"({n_dec / max(stream.decode_s, 1e-9):.1f} tok/s)", file=sys.stderr)  # fmt: skip
    return 0
