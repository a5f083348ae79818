"""Memory plan of one device: weights, cache and workspace against the device's memory, before anything is loaded.

    plan = memory_plan(Config.flash(), {"expert": 2}, ShardingRules.expert_parallel(), batch=1, context=65536)
    print(plan.summary())          # per device: weights / cache / workspace / reserve, fits or not, capacity
    plan.max_context, plan.max_batch

* **Weights** are the real placement: `param_shardings(abstract(cfg), AbstractMesh(mesh_shape), rules)` gives every
  parameter's sharding, and a device holds `sharding.shard_shape(shape)` of it (sharded dims divided by their mesh
  axes' sizes, replicated dims whole; dims that do not divide fall back to replication, as at restore time).
* **Cache** is `dsv4_jax.cache.cache_bytes` in the cache layout `kv_dtype` ("fp8", the default: the official packed
  layout, 584 B per FP8 KV entry and 68 B per FP4 indexer key; "bf16": the exact-arithmetic model's rows) for the
  rows one device holds: the cache's batch axis is split over `cache_batch_axes` (default "data") and replicated over
  the others — V4 attention has one KV head, so tensor parallelism does not split the cache.
* **Workspace** is `dsv4_jax.parallel.workspace.step_workspace` for the larger of a prefill step (the whole prompt,
  assumed to fill the context, or a chunk of `prefill_chunk` tokens) and a decode step.
* **Reserve** (3 GiB): what the estimate leaves out inside XLA's pool: 1 GiB for cuBLAS / collective buffers and
  fragmentation, 2 GiB for temporaries the workspace estimate misses (at V4-Flash width on CPU, XLA kept the fp32
  weight decodes of two layer bodies alive at once: 0.6 to 2.2 GiB beyond the estimate; see `workspace`).
* **Budget**: XLA's pool, `mem_fraction` of the device memory. JAX takes 75 % by default (105 GiB of an H200's
  140.4); a full-size run sets `XLA_CLIENT_MEM_FRACTION=0.95` (the newer name of `XLA_PYTHON_CLIENT_MEM_FRACTION`)
  before JAX starts, for 133 GiB. `XLA_PYTHON_CLIENT_PREALLOCATE=false` alone keeps the 75 % limit.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from dsv4_jax.config import Config
from dsv4_jax.parallel.mesh import mesh_shape as _mesh_shape
from dsv4_jax.parallel.workspace import step_workspace
from dsv4_jax.sharding import AXES, ShardingRules

__all__ = ["Plan", "memory_plan", "weight_bytes", "cache_bytes_per_device", "H200_BYTES", "GiB"]

GiB = 1 << 30
H200_BYTES = 143_771 << 20  # an H200's memory as CUDA reports it (nvidia-smi: 143771 MiB)
MEM_FRACTION = 0.95
RESERVE_BYTES = 3 * GiB
MAX_ROWS = 1 << 16  # the batch search stops here


def _kind(path: tuple) -> str:
    """Which part of the model a parameter belongs to (for the breakdown)."""
    names = [str(p) for p in path]
    if "experts" in names:
        return "routed_experts"
    if "shared_experts" in names:
        return "shared_expert"
    if "gate" in names:
        return "router"
    if "attn" in names:
        return "attention"
    if names[0] in ("embed", "head"):
        return "embed_head"
    return "other"  # mHC mixing, norms, the MTP projections


def weight_bytes(cfg: Config, mesh_shape: dict, rules: ShardingRules | None = None, *,
                 prepared_scales: bool = False) -> dict:  # fmt: skip
    """Per-device weight bytes under the real placement (module doc).

    Returns `{"per_device": int, "by_kind": {kind: bytes per device}, "unsharded": int (the model's bytes),
    "fallbacks": [dims replicated because they do not divide]}`. `prepared_scales`: the FP8 linears' block scales
    as the fp32 `dsv4_jax.prepare_params` makes for the kernels (4 bytes instead of 1).
    """
    sizes = _mesh_shape(mesh_shape)
    out = _weight_bytes(cfg, tuple(sizes[a] for a in AXES), ShardingRules() if rules is None else rules,
                        prepared_scales)  # fmt: skip
    return {**out, "by_kind": dict(out["by_kind"]), "fallbacks": list(out["fallbacks"])}


@functools.lru_cache(maxsize=64)
def _weight_bytes(cfg: Config, shape: tuple[int, ...], rules: ShardingRules, prepared_scales: bool) -> dict:
    """`weight_bytes` for a mesh shape in `AXES` order (cached: capacity searches and the CLI ask repeatedly)."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import AbstractMesh

    from dsv4_jax.model import abstract
    from dsv4_jax.sharding import param_shardings

    mesh = AbstractMesh(shape, AXES)
    ab = abstract(cfg)
    fallbacks: list[str] = []
    shardings = dict(nnx.to_flat_state(param_shardings(ab, mesh, rules, report=fallbacks)))
    flat = dict(nnx.to_flat_state(ab.params))
    per_device, unsharded, by_kind = 0, 0, {}
    for path, var in flat.items():
        item = np.dtype(var.dtype).itemsize
        weight = flat.get(path[:-1] + ("weight",))
        if prepared_scales and path[-1] == "scale" and weight is not None and weight.dtype == jax.numpy.float8_e4m3fn:
            item = 4
        local = math.prod(shardings[path].shard_shape(tuple(var.shape))) * item
        per_device += local
        unsharded += math.prod(var.shape) * item
        by_kind[_kind(path)] = by_kind.get(_kind(path), 0) + local
    return {"per_device": per_device, "by_kind": by_kind, "unsharded": unsharded, "fallbacks": fallbacks}


def _rows(batch: int, sizes: dict, batch_axes: tuple[str, ...]) -> int:
    return -(-batch // math.prod(sizes[a] for a in batch_axes))


@functools.lru_cache(maxsize=4096)
def _cache_row_bytes(cfg: Config, context: int, kv_dtype: str) -> int:
    """Cache bytes of one row of capacity `context` (a cache is exactly linear in its rows)."""
    from dsv4_jax.cache import KV_LAYOUTS, cache_bytes

    if kv_dtype not in KV_LAYOUTS:
        raise ValueError(f"kv_dtype={kv_dtype!r}; expected 'fp8' (the packed cache) or 'bf16' (bf16 rows)")
    return cache_bytes(cfg, 1, context, kv_dtype)


def cache_bytes_per_device(cfg: Config, batch: int, context: int, mesh_shape: dict, *,
                           cache_batch_axes: tuple[str, ...] = ("data",),
                           kv_dtype: str = "fp8") -> tuple[int, int]:  # fmt: skip
    """(cache bytes one device holds, its rows) for `batch` rows of capacity `context`, the batch axis split over
    `cache_batch_axes`."""
    sizes = _mesh_shape(mesh_shape)
    rows = _rows(batch, sizes, tuple(cache_batch_axes))
    return rows * _cache_row_bytes(cfg, context, kv_dtype), rows


def _split(rules: ShardingRules, logical: str, n: int, sizes: dict) -> int:
    """Devices a dimension of size `n` on `logical` is split over (1 if it does not divide: replicated)."""
    s = math.prod(sizes.get(a, 1) for a in rules.mesh_axes(logical))
    return s if n % s == 0 else 1


@dataclasses.dataclass(frozen=True)
class Plan:
    """One device's memory for a model on a mesh, a batch and a context (bytes; see the module doc)."""

    cfg: Config
    mesh_shape: dict
    rules: ShardingRules
    batch: int
    context: int
    kv_dtype: str
    cache_batch_axes: tuple[str, ...]
    prefill_chunk: int | None
    prefill_rows: int | None
    weights: int
    weights_by_kind: dict
    weights_unsharded: int
    cache: int
    cache_rows: int
    workspace: int
    workspace_parts: dict
    workspace_step: str
    reserve: int
    device_bytes: int
    mem_fraction: float
    max_context: int  # the longest context that fits at batch 1 (0: none)
    max_batch: int  # the largest batch that fits at `context` (0: none)
    fallbacks: tuple[str, ...] = ()

    @property
    def budget(self) -> int:
        return int(self.device_bytes * self.mem_fraction)

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.workspace + self.reserve

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("cfg", "rules")}
        out["rules"] = {k: v for k, v in dataclasses.asdict(self.rules).items() if v is not None}
        out.update(budget=self.budget, total=self.total, fits=self.fits, fallbacks=list(self.fallbacks))
        return out

    def summary(self) -> str:
        g = lambda b: f"{b / GiB:7.2f} GiB"  # noqa: E731
        mesh = ", ".join(f"{a}={n}" for a, n in self.mesh_shape.items())
        split = {k: v for k, v in dataclasses.asdict(self.rules).items() if v is not None}
        kinds = ", ".join(f"{k} {v / GiB:.2f}" for k, v in sorted(self.weights_by_kind.items(), key=lambda kv: -kv[1]))
        lines = [
            f"memory plan per device: mesh {mesh} ({math.prod(self.mesh_shape.values())} devices), rules {split}",
            f"  weights    {g(self.weights)}  ({kinds}; the model is {self.weights_unsharded / GiB:.2f} GiB)",
            f"  cache      {g(self.cache)}  ({self.cache_rows} of {self.batch} rows x {self.context:,} tokens, "
            f"{self.kv_dtype}; batch split over {list(self.cache_batch_axes) or 'nothing'})",
            f"  workspace  {g(self.workspace)}  ({self.workspace_step})",
            f"  reserve    {g(self.reserve)}",
            f"  total      {g(self.total)}  of {g(self.budget)} ({self.mem_fraction:.0%} of "
            f"{self.device_bytes / GiB:.1f} GiB): {'fits' if self.fits else 'DOES NOT FIT'}, "
            f"{(self.budget - self.total) / GiB:+.2f} GiB left",
            f"  capacity   longest context at batch 1: {self.max_context:,} tokens; largest batch at "
            f"{self.context:,} tokens: {self.max_batch}",
        ]
        if self.fallbacks:
            lines.append(f"  note: {len(self.fallbacks)} sharded dims fall back to replication, e.g. "
                         f"{self.fallbacks[0]}")  # fmt: skip
        return "\n".join(lines)


def memory_plan(cfg: Config, mesh_shape: dict, rules: ShardingRules | None = None, batch: int = 1,
                context: int = 4096, *, kv_dtype: str = "fp8", cache_batch_axes: tuple[str, ...] = ("data",),
                prefill_chunk: int | None = None, prefill_rows: int | None = None, device_bytes: int = H200_BYTES,
                mem_fraction: float = MEM_FRACTION,
                reserve_bytes: int = RESERVE_BYTES, prepared_scales: bool = False) -> Plan:  # fmt: skip
    """The memory of one device serving `batch` rows of up to `context` tokens (prompt + generated) of `cfg` on a
    mesh of `mesh_shape` (`{"expert": 2}`; missing axes are 1) under `rules` (default `ShardingRules()`).

    `prefill_chunk`: None = each prompt is prefilled in one step, assumed to fill the context; N = a chunked prefill
    of N tokens per step on top of the cache (`Opts(prefill_chunk=N)`, `generate --prefill-chunk N`), which keeps
    only each row's last logits, as `prefill` does. `prefill_rows`: rows
    prefilled together (None: the whole batch at once, as `generate` does; 1: a server that prefills each new
    prompt alone and decodes all rows together). Capacity (`Plan.max_context`, `Plan.max_batch`) is searched with
    everything else fixed.
    """
    rules = ShardingRules() if rules is None else rules
    sizes = _mesh_shape(mesh_shape)
    for a in cache_batch_axes:
        if a not in AXES:
            raise ValueError(f"cache_batch_axes names unknown mesh axis {a!r}; known: {AXES}")
    if batch < 1 or context < 1:
        raise ValueError(f"batch={batch} and context={context} must be positive")
    if context > cfg.max_seq_len:
        raise ValueError(f"context={context} exceeds the model's max_seq_len={cfg.max_seq_len}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk} must be positive")
    if prefill_rows is not None and prefill_rows < 1:
        raise ValueError(f"prefill_rows={prefill_rows} must be positive")
    if not 0 < mem_fraction <= 1:
        raise ValueError(f"mem_fraction={mem_fraction} must be in (0, 1]")
    w = weight_bytes(cfg, sizes, rules, prepared_scales=prepared_scales)
    split = {"heads_split": _split(rules, "heads", cfg.n_heads, sizes),
             "index_heads_split": _split(rules, "index_heads", cfg.index_n_heads, sizes),
             "expert_split": _split(rules, "expert", cfg.n_routed_experts, sizes)}  # fmt: skip
    shards = math.prod(sizes[a] for a in cache_batch_axes)
    budget = int(device_bytes * mem_fraction)

    def workspace(rows: int, ctx: int) -> tuple[int, dict, str]:
        k = ctx if prefill_chunk is None else min(prefill_chunk, ctx)
        pre_rows = rows if prefill_rows is None else min(rows, prefill_rows)
        pre = step_workspace(cfg, pre_rows, k, ctx, **split)
        dec = step_workspace(cfg, rows, 1, ctx, **split)
        if pre["peak"] >= dec["peak"]:
            how = "the whole prompt at once" if prefill_chunk is None else "chunked prefill"
            return pre["peak"], pre, f"prefill step of {k:,} tokens x {pre_rows} rows ({how}); decode needs less"
        return dec["peak"], dec, f"decode step of {rows} rows; prefill needs less"

    def total(rows: int, ctx: int) -> int:
        return w["per_device"] + rows * _cache_row_bytes(cfg, ctx, kv_dtype) + workspace(rows, ctx)[0] + reserve_bytes

    cache, rows = cache_bytes_per_device(cfg, batch, context, sizes, cache_batch_axes=cache_batch_axes,
                                         kv_dtype=kv_dtype)  # fmt: skip
    ws, parts, step = workspace(rows, context)
    return Plan(
        cfg=cfg, mesh_shape=sizes, rules=rules, batch=batch, context=context, kv_dtype=kv_dtype,
        cache_batch_axes=tuple(cache_batch_axes), prefill_chunk=prefill_chunk, prefill_rows=prefill_rows,
        weights=w["per_device"],
        weights_by_kind=w["by_kind"], weights_unsharded=w["unsharded"], cache=cache, cache_rows=rows,
        workspace=ws, workspace_parts={k: v for k, v in parts.items() if k != "peak"}, workspace_step=step,
        reserve=reserve_bytes, device_bytes=device_bytes, mem_fraction=mem_fraction,
        max_context=_largest(lambda c: total(1, c) <= budget, cfg.max_seq_len),
        max_batch=_largest(lambda r: total(r, context) <= budget, MAX_ROWS) * shards,
        fallbacks=tuple(w["fallbacks"]),
    )  # fmt: skip


def _largest(ok, hi: int) -> int:
    """The largest x in 1..hi with ok(x), for ok monotone (True then False); 0 if not even ok(1)."""
    if not ok(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo
