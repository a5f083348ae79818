"""Native (released safetensors) -> Orbax, streaming with bounded host memory.

    convert("DeepSeek-V4-Flash", "flash-orbax")     # CLI: dsv4-jax convert SRC DST

Output folder:
  dsv4_jax.json             format name + version, the config (both namings), every parameter's shape, dtype,
                            logical axes and item, the item list with each item's files and sizes, and a
                            fingerprint of the source
  config.json               HF-style config (as released)
  globals/part_0/           one Orbax PyTree checkpoint per item: embed, head, norm, hc_head_*
  layer_{i}/part_{j}/       layer i, split into parts of at most `part_bytes` (a larger single array is its own
  mtp_{i}/part_{j}/         part), so peak host memory is one part (plus Orbax's copy of it while it is written)

Values are stored exactly as released (FP8 e4m3 / UE8M0 scales / packed FP4 bytes as uint8 / bf16 / f32; tid2eid as
int32): no up-cast, no dequantization. Orbax (tensorstore zarr3) stores float8_e8m0fnu natively; restore checks
dtypes against `dsv4_jax.json`.

Crash safety: everything is written under `DST.partial/`; each finished item is recorded in
`DST.partial/progress.json`; the folder is renamed to DST only when complete. Re-running after an interruption
resumes from the finished items if the source is unchanged (same files, sizes and mtimes), else starts over. The
source is opened read-only and never modified; nothing from it is executed (only JSON and raw bytes are read).
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import shutil
import time

from dsv4_jax.checkpoint.layout import CheckpointError, ParamSpec, check, param_table, read_param, without_mtp
from dsv4_jax.checkpoint.native import index_tensors, read_config
from dsv4_jax.checkpoint.writer import hf_config, replace_dir
from dsv4_jax.config import Config
from dsv4_jax.paths import user_path

__all__ = ["convert", "plan_items", "partial_dir", "FORMAT", "FORMAT_VERSION", "META", "is_orbax_checkpoint",
           "read_meta", "is_disk_full"]  # fmt: skip

FORMAT = "dsv4_jax.orbax"
FORMAT_VERSION = 1
META = "dsv4_jax.json"
DEFAULT_PART_BYTES = 1 << 30


def plan_items(cfg: Config, part_bytes: int = DEFAULT_PART_BYTES) -> list[tuple[str, list[ParamSpec]]]:
    """Items in write order: (`group/part_j`, parameters). Each group (globals, a layer, an MTP layer) is packed
    first-fit into parts of at most `part_bytes`; an array larger than that is a part of its own."""
    groups: dict[str, list[ParamSpec]] = {}
    for spec in param_table(cfg):
        groups.setdefault(spec.group, []).append(spec)
    items: list[tuple[str, list[ParamSpec]]] = []
    for group, specs in groups.items():
        parts: list[list[ParamSpec]] = []
        sizes: list[int] = []
        for spec in specs:
            for k, size in enumerate(sizes):
                if size + spec.nbytes <= part_bytes:
                    parts[k].append(spec)
                    sizes[k] += spec.nbytes
                    break
            else:
                parts.append([spec])
                sizes.append(spec.nbytes)
        items.extend((f"{group}/part_{j}", part) for j, part in enumerate(parts))
    return items


def item_key(spec: ParamSpec) -> tuple[str, ...]:
    """Path of a parameter inside its item's tree (block index dropped: the item names the block)."""
    rel = spec.path[2:] if spec.path[0] in ("layers", "mtp") else spec.path
    return tuple(str(p) for p in rel)


def _nest(pairs) -> dict:
    tree: dict = {}
    for key, value in pairs:
        d = tree
        for k in key[:-1]:
            d = d.setdefault(k, {})
        d[key[-1]] = value
    return tree


def partial_dir(dst: str | os.PathLike) -> str:
    """Where `convert(src, dst)` writes until it is complete (kept after an interruption, to resume from)."""
    return user_path(dst) + ".partial"


def is_disk_full(e: BaseException) -> bool:
    """An ENOSPC anywhere in `e`'s chain: Orbax/TensorStore report it as a ValueError ("RESOURCE_EXHAUSTED: ...
    No space left on device [os_error_code='28']"), plain writes as OSError(ENOSPC)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        msg = str(e)
        if "No space left on device" in msg or "os_error_code='28'" in msg:
            return True
        e = e.__cause__ or e.__context__
    return False


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), META))


def read_meta(path: str | os.PathLike) -> dict:
    p = os.path.join(os.fspath(path), META)
    try:
        with open(p) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: cannot read the checkpoint metadata ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{p}: format version {meta.get('format_version')} is not supported (this dsv4_jax "
                              f"reads version {FORMAT_VERSION}); re-run `dsv4-jax convert`")  # fmt: skip
    return meta


def _fingerprint(src: str, mtp: bool, part_bytes: int, compress: bool) -> dict:
    files = sorted(f for f in os.listdir(src) if f.endswith((".safetensors", ".json")))
    stats = {}
    for f in files:
        st = os.stat(os.path.join(src, f))
        stats[f] = [st.st_size, st.st_mtime_ns]
    return {"format_version": FORMAT_VERSION, "source": os.path.realpath(src), "files": stats, "mtp": mtp,
            "part_bytes": part_bytes, "compress": compress}  # fmt: skip


def item_files(folder: str) -> dict[str, int]:
    """{path relative to the item folder: size} of every file Orbax wrote for one item."""
    return {
        os.path.relpath(os.path.join(d, f), folder): os.path.getsize(os.path.join(d, f))
        for d, _, names in os.walk(folder)
        for f in names
    }


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _checkpointer(compress: bool):
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=compress))


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    mtp: bool | None = None,
    part_bytes: int = DEFAULT_PART_BYTES,
    compress: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    _stop_after: int | None = None,
) -> str:
    """Converts a released checkpoint folder to this package's Orbax layout; returns `dst`.

    Args:
      mtp: include the MTP layer (default: if the config has one); False converts without it.
      part_bytes: largest Orbax item (host-memory bound; a single larger array is its own item).
      compress: zstd-compress the arrays (smaller, slower; FP8/FP4 bytes compress little).
      overwrite: replace an existing complete `dst`.
    Raises `CheckpointError` (a ValueError) listing every problem before anything is written. A full disk raises
    `OSError(ENOSPC)` (Orbax's error chained); the finished items stay in `DST.partial` for a resume.
    """
    import orbax.checkpoint as ocp

    src, dst = user_path(src), user_path(dst)
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: not a folder")
    if os.path.realpath(src) == os.path.realpath(dst):
        raise CheckpointError(f"{dst}: the destination is the source folder")
    cfg = read_config(src)
    want_mtp = bool(cfg.n_mtp_layers) if mtp is None else bool(mtp)
    tensors = index_tensors(src)
    check(tensors, cfg, mtp=want_mtp, where=src)  # every problem, before anything is written
    model_cfg = cfg if want_mtp else without_mtp(cfg)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")

    items = plan_items(model_cfg, part_bytes)
    partial = partial_dir(dst)
    fp = _fingerprint(src, want_mtp, part_bytes, compress)
    done: list[str] = []
    prog_path = os.path.join(partial, "progress.json")
    if os.path.isdir(partial):
        try:
            with open(prog_path) as f:
                prog = json.load(f)
        except (OSError, ValueError):
            prog = {}
        if prog.get("fingerprint") == fp:
            done = [i for i in prog.get("done", []) if os.path.isdir(os.path.join(partial, i))]
        else:
            shutil.rmtree(partial)
    os.makedirs(partial, exist_ok=True)
    _write_json(prog_path, {"fingerprint": fp, "done": done})

    total = sum(s.nbytes for _, specs in items for s in specs)
    n_tensors = sum(len(s.names) for _, specs in items for s in specs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"convert -> {os.path.basename(dst)}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    ckptr = _checkpointer(compress)
    t0, tensors_done, peak = time.perf_counter(), 0, _rss()
    try:
        for k, (name, specs) in enumerate(items):
            nbytes = sum(s.nbytes for s in specs)
            if name in done:
                tensors_done += sum(len(s.names) for s in specs)
                if bar is not None:
                    bar.update(nbytes)
                continue
            if _stop_after is not None and k >= _stop_after:  # test hook: simulate an interruption
                raise KeyboardInterrupt(f"stopped before item {name}")
            path = os.path.join(partial, name)
            shutil.rmtree(path, ignore_errors=True)  # a leftover of an interrupted write
            tree = _nest((item_key(s), read_param(tensors, s, cfg.n_routed_experts)) for s in specs)
            peak = max(peak, _rss())
            ckptr.save(path, args=ocp.args.PyTreeSave(tree))
            peak = max(peak, _rss())
            del tree
            gc.collect()
            done.append(name)
            _write_json(prog_path, {"fingerprint": fp, "done": done})
            tensors_done += sum(len(s.names) for s in specs)
            if bar is not None:
                bar.update(nbytes)
                bar.set_postfix(tensors=f"{tensors_done}/{n_tensors}", rss=f"{_rss() / 2**30:.2f}GiB", refresh=False)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": hf_config(model_cfg),
            "inference_config": model_cfg.to_inference(),
            "mtp": want_mtp,
            "items": [name for name, _ in items],
            "params": {
                s.key: {
                    "item": name,
                    "key": list(item_key(s)),
                    "shape": list(s.shape),
                    "dtype": s.dtype.name,
                    "axes": list(s.axes),
                    "native": s.names[0] if len(s.names) == 1 else list(s.names[:1]),
                }
                for name, specs in items
                for s in specs
            },  # fmt: skip
            # What restore checks before Orbax reads: a missing or cut data file found there gets one clear error
            # instead of a read failing halfway, which leaves TensorStore calling back into a closed event loop.
            "item_files": {name: item_files(os.path.join(partial, name)) for name, _ in items},
            "source": {"path": fp["source"], "files": fp["files"]},
            "bytes": total,
            "compress": compress,
        }
        _write_json(os.path.join(partial, META), meta)
        with open(os.path.join(partial, "config.json"), "w") as f:
            json.dump(hf_config(model_cfg), f, indent=2)
        os.remove(prog_path)
        replace_dir(partial, dst, overwrite=True)  # `overwrite` was checked before any work
    except CheckpointError:
        shutil.rmtree(partial, ignore_errors=True)  # bad source data: a re-run cannot resume, leave nothing behind
        raise
    except Exception as e:
        if is_disk_full(e):  # one plain error instead of TensorStore's; the finished items stay for a resume
            raise OSError(errno.ENOSPC, f"no space left on device while writing {dst} (the finished part is kept "
                          f"in {partial}; free space and convert again to resume)", partial) from e  # fmt: skip
        raise
    finally:
        if bar is not None:
            bar.close()
    dt = time.perf_counter() - t0
    logging.getLogger(__name__).info("converted %s -> %s: %.2f GB in %.1f s, peak RSS %.2f GiB", src, dst,
                                     total / 1e9, dt, peak / 2**30)  # fmt: skip
    convert.last_stats = {"bytes": total, "seconds": dt, "peak_rss": peak, "items": len(items)}
    return dst
