"""Where a decode step's time goes: device kernel time by part of the model, and what is left for launches and the
host.

    br = decode_breakdown(state, cache, tokens, opts=opts, steps=5)
    br["step_ms"], br["kernel_ms"], br["overhead_ms"], br["by_part"]   # per step

It traces `steps` decode steps with `jax.profiler`, reads the device's kernel events back (`jax.profiler.ProfileData`),
and maps each kernel to the part of the model that launched it through the `jax.named_scope` names the model code
carries ("attention", "indexer", "compressor", "sparse_attention", "router", "experts", "shared_expert", "mhc",
"head"), read from the compiled program's op metadata. `overhead_ms` is the step's wall time minus its busy device
time: launch gaps and host work.
"""

from __future__ import annotations

import glob
import re
import tempfile
import time

import jax

__all__ = ["decode_breakdown", "prefill_breakdown", "kernel_events", "traced_events", "op_names", "PARTS"]

# Most specific first: a kernel belongs to the first part whose scope appears in its op name.
PARTS = ("indexer", "compressor", "sparse_attention", "attention", "router", "experts", "shared_expert", "moe", "mhc",
         "head", "embed")  # fmt: skip
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]+)\"", re.M)


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata (the jit / named-scope path) from a compiled program's text."""
    return {m[1]: m[2] for m in _INSTR.finditer(hlo_text)}


def kernel_events(xplane_path: str) -> list[tuple[str, str, str, float, float]]:
    """(device plane, kernel name, hlo_op, start ns, duration ns) of every device kernel event (GPU planes; the CPU
    backend's thunks when there is no GPU)."""
    data = jax.profiler.ProfileData.from_file(xplane_path)
    out, cpu = [], []
    for plane in data.planes:
        gpu = plane.name.startswith("/device:GPU")
        for line in plane.lines:
            for ev in line.events:
                stats = dict(ev.stats)
                if "hlo_op" not in stats or not ev.duration_ns:
                    continue
                item = (plane.name, ev.name, str(stats["hlo_op"]), float(ev.start_ns), float(ev.duration_ns))
                (out if gpu else cpu).append(item)
    return out or cpu


def traced_events(run) -> tuple[list[tuple[str, str, str, float, float]], float]:
    """Runs `run()` (which waits for its work) under `jax.profiler` -> (its device kernel events, as `kernel_events`
    gives them; the wall time in seconds)."""
    with tempfile.TemporaryDirectory(prefix="dsv4_profile_") as folder:
        with jax.profiler.trace(folder):
            t = time.perf_counter()
            run()
            wall = time.perf_counter() - t
        return kernel_events(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0]), wall


def _op_name(names: dict[str, str], kernel_names: dict[str, str], kernel: str, hlo_op: str) -> str | None:
    """The op_name of a kernel event: by its hlo_op; inside a command buffer (hlo_op `command_buffer_N`) by the
    kernel's own name, which for an XLA fusion is the instruction's name with `.` -> `_`."""
    return names.get(hlo_op) or names.get(hlo_op.lstrip("%").split(" ")[0]) or kernel_names.get(kernel)


def _part(op_name: str) -> str:
    for p in PARTS:
        if f"/{p}/" in f"/{op_name}/":
            return p
    return "other"


def _short_op(op_name: str | None) -> str:
    """An op_name without its jit / loop-body prefix ("jit(_decode)/while/body/eval_jaxpr/attention/concatenate" ->
    "attention/concatenate"); "" for none."""
    if not op_name:
        return ""
    return re.sub(r"^(?:jit\([^)]*\)/|while/body/|eval_jaxpr/|closed_call/)+", "", op_name)[-100:]


def _busy_ns(events) -> float:
    """Time at least one kernel ran (overlapping kernels counted once)."""
    spans = sorted((s, s + d) for *_, s, d in events)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if e > end:
            busy += e - max(s, end)
            end = e
    return busy


def _breakdown(hlo_text: str, run, steps: int, top: int) -> dict:
    """Profiles `run()` (`steps` executions of the compiled program `hlo_text` is the text of, waited for) and splits
    the device time by model part."""
    names = op_names(hlo_text)
    events, wall = traced_events(run)
    devices = sorted({e[0] for e in events})
    per = steps * max(len(devices), 1)  # every figure is per step and per device (the mean over the devices)
    kernel_names = {k.replace(".", "_"): v for k, v in names.items()}
    by_part: dict[str, float] = {}
    by_kernel: dict[tuple[str, str], list] = {}
    unmapped: dict[str, str] = {}
    for _, name, op, _, dur in events:
        op_name = _op_name(names, kernel_names, name, op)
        part = _part(op_name) if op_name else ("custom call" if op.startswith("command_buffer") else "other")
        if op_name is None and len(unmapped) < 8:
            unmapped[name[:60]] = op
        by_part[part] = by_part.get(part, 0.0) + dur / 1e6 / per
        # the op path without the jit / loop prefix: what an XLA fusion computes ("attention/concatenate")
        k = by_kernel.setdefault((part, name[:120]), [0.0, 0.0, _short_op(op_name)])
        k[0] += 1 / per
        k[1] += dur / 1e6 / per
    ranked = sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:top]
    kernel_ms = sum(_busy_ns([e for e in events if e[0] == d]) for d in devices) / 1e6 / per
    step_ms = 1e3 * wall / steps
    return {
        "step_ms": step_ms,
        "kernel_ms": kernel_ms,
        "overhead_ms": max(step_ms - kernel_ms, 0.0),
        "kernels_per_step": len(events) / per,
        "devices": len(devices),
        "by_part": dict(sorted(by_part.items(), key=lambda kv: -kv[1])),
        "top_kernels": [(part, name, round(n, 2), ms, op) for (part, name), (n, ms, op) in ranked],
        "unmapped": unmapped,  # kernel -> its hlo_op, for kernels whose op has no named-scope metadata
    }


def _text(compiled, hlo_path: str | None) -> str:
    """The compiled program's text, also written to `hlo_path` if given."""
    text = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(text)
    return text


def decode_breakdown(state, cache, tokens, *, opts, steps: int = 5, top: int = 120,
                     hlo_path: str | None = None) -> dict:  # fmt: skip
    """Profiles `steps` decode steps (after a warm-up) -> per-step milliseconds: wall (`step_ms`), device busy
    (`kernel_ms`), the rest (`overhead_ms`), kernel time by model part (`by_part`), kernels per step, and the `top`
    kernels by time (`top_kernels`: part, kernel name, launches per step, ms per step, the op path that launched it,
    e.g. "attention/concatenate" for an XLA fusion). Device figures are per device
    (the mean over the devices that ran kernels, e.g. the two GPUs of an expert-parallel mesh). Custom-call kernels
    launched inside XLA command buffers carry no op name: their part is "custom call". `hlo_path`: also write the
    compiled program's text there (to read which fusions the kernels are). The result's "cache" is the cache after
    the steps."""
    from dsv4_jax import runner

    tokens = jax.numpy.asarray(tokens, jax.numpy.int32)
    compiled = runner._decode_jit.lower(state, cache, tokens, opts, None, False).compile()
    text = _text(compiled, hlo_path)
    logits, _, cache = compiled(state, cache, tokens, None)
    logits.block_until_ready()
    box = [cache]

    def run():
        for _ in range(steps):
            logits, _, box[0] = compiled(state, box[0], tokens, None)
        logits.block_until_ready()

    return _breakdown(text, run, steps, top) | {"cache": box[0]}


def prefill_breakdown(state, make_cache, tokens, *, opts, steps: int = 2, top: int = 40,
                      hlo_path: str | None = None) -> dict:  # fmt: skip
    """`decode_breakdown` for a prefill of `tokens [B, S]` (all S tokens of every row): per prefill. `make_cache()`
    gives a fresh empty cache (each prefill consumes its cache), made before the profiled runs."""
    from dsv4_jax import runner

    tokens, lengths = runner.check_prompts(state.config, tokens, None, None)
    tokens, lengths = jax.numpy.asarray(tokens), jax.numpy.asarray(lengths)
    compiled = runner._prefill_jit.lower(state, make_cache(), tokens, lengths, opts).compile()
    text = _text(compiled, hlo_path)
    compiled(state, make_cache(), tokens, lengths)[0].block_until_ready()
    caches = [make_cache() for _ in range(steps)]

    def run():
        for c in caches:
            logits = compiled(state, c, tokens, lengths)[0]
        logits.block_until_ready()

    return _breakdown(text, run, steps, top)
