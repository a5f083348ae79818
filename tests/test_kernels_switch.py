"""CPU tests of the kernel switch and of the FFI extension's build inputs (no GPU needed).

* the switch: backend "auto" runs the reference on CPU, "ffi" fails with a clear message, the kill switch works;
* the AOT generator covers every FP8 linear of the presets with launch configurations that fit the hardware;
* if nvcc is present, one GEMM instantiation, our quantization kernels and the FFI handlers compile for sm_90a
  (cached by content hash under ~/.cache/dsv4_jax_ffi_ci; a couple of minutes cold on 2 cores); the MXFP4 decode
  kernels compile without spills.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import ops, quant
from dsv4_jax.ops import registry

REPO = pathlib.Path(__file__).resolve().parents[1]
FFI = REPO / "ffi"
CACHE = pathlib.Path(os.environ.get("DSV4_FFI_CI_CACHE", pathlib.Path.home() / ".cache" / "dsv4_jax_ffi_ci"))
DEEPGEMM_PIN = "sgl-deep-gemm==0.2.5"


def _on_gpu() -> bool:
    return any(d.platform == "gpu" for d in jax.devices())


cpu_only = pytest.mark.skipif(_on_gpu(), reason="checks CPU behaviour of the switch")


@cpu_only
def test_auto_is_reference_on_cpu_and_says_nothing(caplog):
    x = jax.random.normal(jax.random.key(0), (5, 256), jnp.float32).astype(jnp.bfloat16)
    w, s = quant.quantize_fp8_weight(jax.random.normal(jax.random.key(1), (128, 256)) * 0.06)
    with ops.record() as rec, caplog.at_level("WARNING", logger="dsv4_jax.ops"):
        a = ops.fp8_linear(x, w, s, opts=ops.Opts(backend="auto"))
    r = ops.fp8_linear(x, w, s, opts=ops.Opts(backend="reference"))
    assert rec == {"fp8_linear": "reference"}
    assert not caplog.records  # silent on CPU: the reference is the implementation there
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(r, np.float32))
    assert ops.Opts().backend == "auto"  # the product default


@cpu_only
def test_ffi_backend_fails_clearly_naming_the_op():
    x = jnp.ones((2, 256), jnp.bfloat16)
    w, s = quant.quantize_fp8_weight(jnp.ones((128, 256)) * 0.06)
    with pytest.raises(ops.KernelUnavailable, match=r"op 'fp8_linear': .*(not installed|not a CUDA GPU)"):
        ops.fp8_linear(x, w, s, opts=ops.Opts(backend="ffi"))


def test_registry_holds_reference_kernel_and_kill_switch_side_by_side():
    table = registry.ops()
    assert {"fp8_linear", "moe_experts"} <= table.keys()
    for name, op in table.items():
        assert op.name == name and callable(op.reference)
        module, func = op.kernel.split(":")
        assert module.startswith("dsv4_jax.kernels.") and func  # kernels live in dsv4_jax.kernels
    # the registry key is the name of the function it selects
    assert ops.fp8_linear.__name__ == "fp8_linear" and ops.moe_experts.__name__ == "moe_experts"


def test_kill_switch_and_the_one_fallback_place(monkeypatch, caplog):
    """Killed kernels: auto falls back (logging once per op and reason), ffi raises naming the op and why; the
    choice is made in the registry, with the kernel made available by a stand-in."""
    calls = []
    monkeypatch.setattr(registry, "_global_reason", lambda: (None, False))  # as if on an SM90 GPU
    op = registry.register("_test_op", lambda x, *, quant_sim: ("ref", x), kernel="dsv4_jax.kernels.gemm:fp8_linear",
                           supports=lambda x, *, quant_sim: None if x < 10 else "x too large")  # fmt: skip
    monkeypatch.setattr(registry.Op, "load_kernel", lambda self: lambda x: calls.append(x) or ("kernel", x))
    try:
        assert op(1, opts=ops.Opts(backend="auto")) == ("kernel", 1)
        assert op(11, opts=ops.Opts(backend="auto")) == ("ref", 11)  # unsupported arguments: the reference
        with pytest.raises(ops.KernelUnavailable, match="'_test_op'.*x too large"):
            op(11, opts=ops.Opts(backend="ffi"))
        monkeypatch.setenv("DSV4_JAX_DISABLE_KERNELS", "fp8_linear, _test_op")
        assert registry.disabled() == {"fp8_linear", "_test_op"}
        with caplog.at_level("WARNING", logger="dsv4_jax.ops"):
            assert op(2, opts=ops.Opts(backend="auto")) == ("ref", 2)
            assert op(3, opts=ops.Opts(backend="auto")) == ("ref", 3)
        logged = [r for r in caplog.records if "_test_op" in r.getMessage() and "DISABLE" in r.getMessage()]
        assert len(logged) == 1  # one line per op and reason
        with pytest.raises(ops.KernelUnavailable, match="disabled by DSV4_JAX_DISABLE_KERNELS"):
            op(2, opts=ops.Opts(backend="ffi"))
        monkeypatch.setenv("DSV4_JAX_DISABLE_KERNELS", "all")
        assert op(4, opts=ops.Opts(backend="auto")) == ("ref", 4)
        assert op(5, opts=ops.Opts(backend="reference")) == ("ref", 5)
        assert calls == [1]
    finally:
        registry._OPS.pop("_test_op")


def test_nested_records_leave_in_any_order_of_contents():
    """The CLI records around the executable cache's own record of each compile; the inner one sees only its program's
    ops, so the two dicts are equal at one exit and different at the next: each leaves by identity, and each holds
    what was traced while it was open."""
    x = jnp.ones((1, 128), jnp.bfloat16)
    w = jnp.ones((128, 128), jnp.float8_e4m3fn)
    s = jnp.ones((1, 1), jnp.float32)
    mix = jnp.zeros((2, 24), jnp.float32)
    with ops.record() as outer:
        with ops.record() as first:  # equal to `outer` when it closes
            jax.eval_shape(lambda a: ops.fp8_linear(a, w, s), x)
        with ops.record() as second:  # different from `outer` when it closes
            jax.eval_shape(lambda m: ops.hc_split_mixes(m, jnp.ones(3), jnp.zeros(24), n=4, iters=2, eps=1e-6), mix)
    assert first == {"fp8_linear": "reference"} and second == {"hc_split_mixes": "reference"}
    assert outer == {**first, **second}
    assert not registry._RECORDERS


def test_kernels_never_import_model_code():
    """The kernel modules import neither the model nor the ops (no import cycle: ops -> kernels only)."""
    import ast

    for f in (REPO / "dsv4_jax" / "kernels").glob("*.py"):
        tree = ast.parse(f.read_text())
        names = [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                 for a in n.names]  # fmt: skip
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        allowed = ("dsv4_jax.kernels", "dsv4_jax.quant", "dsv4_jax.layer_view", "dsv4_jax.rounding", "dsv4_jax_ffi")
        bad = [m for m in names if m.startswith("dsv4_jax") and not m.startswith(allowed)]
        assert not bad, (f.name, bad)


def _gen():
    spec = importlib.util.spec_from_file_location("_gen_inst", FFI / "gen" / "gen_instantiations.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generator_covers_every_fp8_linear():
    import dsv4_jax

    gen = _gen()
    entries = gen.plan(["flash", "pro", "tiny"], 132)
    have = {(e["kind"], e["n"], e["k"], e["g"], e["block_m"]) for e in entries}
    tiles = {(e["kind"], e["n"], e["k"], e["block_m"]): (e["block_n"], e["stages"]) for e in entries}
    for name in ("flash", "pro", "tiny"):
        cfg = getattr(dsv4_jax.Config, name)()
        for n, k in gen.fp8_linear_shapes(cfg):
            assert (0, n, k, 1, 64) in have and (0, n, k, 1, 128) in have
            # the layer GEMM (a layer of a stack in place) with the dense BLOCK_M 64 GEMM's tiling: the same bits
            assert (gen.KIND_LAYER, n, k, 1, 64) in have
            assert tiles[(gen.KIND_LAYER, n, k, 64)] == tiles[(0, n, k, 64)]
        for n, k, g in gen.expert_shapes(cfg):
            assert (1, n, k, g, 128) in have and (2, n, k, g, 64) in have
    for e in entries:
        assert e["smem"] <= gen.SMEM_CAPACITY and e["stages"] >= 2
        assert e["block_n"] % 16 == 0 and gen._block_n_ok(e["block_n"])
        assert e["k"] % 128 == 0
        if e["multicast"] == 2:  # pairs of persistent blocks must stay inside one group: even N-block count
            assert e["block_m"] >= 128 and -(-e["n"] // e["block_n"]) % 2 == 0


def _deepgemm_include() -> pathlib.Path | None:
    if env := os.environ.get("DSV4_DEEPGEMM_INCLUDE"):
        return pathlib.Path(env)
    inc = CACHE / "sgl_deep_gemm_0.2.5" / "deep_gemm" / "include"
    if (inc / "deep_gemm").exists():
        return inc
    dl = CACHE / "wheels"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dl), DEEPGEMM_PIN],
        capture_output=True,
        text=True,
    )
    wheels = sorted(dl.glob("sgl_deep_gemm-0.2.5-*.whl"))
    if r.returncode or not wheels:
        return None
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(inc.parents[1], [n for n in z.namelist() if n.startswith("deep_gemm/include/")])
    return inc


def _cached_compile(cmd: list[str], sources: list[pathlib.Path], out_name: str) -> pathlib.Path:
    """Compiles once per content hash of the command and sources; the compiler's stderr is kept beside the object
    (`.log`, e.g. the `-Xptxas -v` report). Two xdist workers may compile the same object at once (this file and
    test_kernel_ptxas share kernel objects): each writes its own temporary files, and the log lands before the
    object, whose presence marks the entry complete."""
    h = hashlib.sha256(" ".join(cmd).encode())
    for s in sources:
        h.update(s.read_bytes())
    out = CACHE / "objs" / f"{out_name}-{h.hexdigest()[:16]}.o"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}.o")
    r = subprocess.run(cmd + ["-o", str(tmp)], capture_output=True, text=True)
    assert r.returncode == 0, f"compile failed: {' '.join(cmd)}\n{r.stderr[-4000:]}"
    log = out.with_suffix(f".tmp{os.getpid()}.log")
    log.write_text(r.stderr)
    log.replace(out.with_suffix(".log"))
    tmp.replace(out)
    return out


KERNEL_HEADERS = sorted([*(FFI / "csrc").glob("*.cuh"), *(FFI / "csrc").glob("*.h")])


def kernel_object(name: str) -> pathlib.Path:
    """`ffi/csrc/<name>` (a kernel file) compiled for sm_90a with the ptxas report (`-Xptxas -v`, in the `.log` beside
    the object), once for this test (it compiles) and test_kernel_ptxas (it reads the report): one command and one
    cache key per file, keyed on every header of ffi/csrc (a header a file does not include costs a recompile when it
    changes, never a stale object)."""
    src = FFI / "csrc" / name
    cmd = ["nvcc", "-std=c++20", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xcompiler", "-fPIC", "-c"]
    cmd += ["-Xptxas", "-v", "-I", str(FFI / "csrc"), str(src)]
    return _cached_compile(cmd, [src, *KERNEL_HEADERS], src.stem)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the CUDA extension cannot be compiled here")
def test_wrappers_call_only_exported_handlers():
    """Every FFI target the Python wrappers (`kernels/ffi_*.py`) call is in the extension's handler list (handlers.h),
    and the set that `ffi_ops.load` demands of an installed build is exactly the targets the wrappers call."""
    import re

    from dsv4_jax.kernels import ffi_ops

    exported = set(re.findall(r"X\((dsv4_\w+)\)", (FFI / "csrc" / "handlers.h").read_text()))
    wrappers = "".join(p.read_text() for p in pathlib.Path(ffi_ops.__file__).parent.glob("ffi_*.py"))
    called = set(re.findall(r'(?:ffi_call|_gemv_layer_call)\(\s*"(dsv4_\w+)"', wrappers))
    assert "dsv4_fp8_gemv_pair" in called and called <= exported, called - exported
    assert {"dsv4_fp4_gemv", "dsv4_fp4_moe_gate_up", "dsv4_fp4_moe_down"} <= called
    assert ffi_ops.HANDLERS == called


def test_compressor_decode_supports_the_model_shapes_and_names_the_rest():
    """The kernel's `supports` takes every compressor of the presets at decode (CSA main and indexer, HCA) and names
    what it refuses."""
    import dsv4_jax
    from dsv4_jax.layer_view import LayerSlice
    from dsv4_jax.nn import layer_inv_freq
    from dsv4_jax.ops.compressor import _decode_supports

    def args(cfg, ratio, dc, *, sliced=True):
        coff = 2 if ratio == 4 else 1
        state = jax.ShapeDtypeStruct((3, 2, coff * ratio, coff * dc), jnp.float32)
        new = jax.ShapeDtypeStruct((2, coff * dc), jnp.float32)
        st = LayerSlice(state, jnp.int32(0)) if sliced else jax.ShapeDtypeStruct(state.shape[1:], jnp.float32)
        norm_w = jax.ShapeDtypeStruct((dc,), jnp.bfloat16)
        return (new, new, st, st, None, norm_w, None, None, layer_inv_freq(cfg, ratio))

    for name in ("flash", "pro", "tiny"):
        cfg = getattr(dsv4_jax.Config, name)()
        for ratio in sorted({r for r in cfg.compress_ratios if r}):
            assert _decode_supports(*args(cfg, ratio, cfg.head_dim), ratio=ratio, rotate=False, eps=1e-6) is None
            if ratio == 4:
                got = _decode_supports(*args(cfg, 4, cfg.index_head_dim), ratio=4, rotate=True, eps=1e-6)
                assert got is None, got
    cfg = dsv4_jax.Config.flash()
    assert "quant_sim" in _decode_supports(*args(cfg, 4, 512), ratio=4, rotate=False, eps=1e-6, quant_sim=False)
    assert "ratio 16" in _decode_supports(*args(cfg, 4, 512), ratio=16, rotate=False, eps=1e-6)
    assert "rotate=True" in _decode_supports(*args(cfg, 4, 512), ratio=4, rotate=True, eps=1e-6)
    assert "state" in _decode_supports(*args(cfg, 4, 512, sliced=False)[:2], *args(cfg, 128, 512)[2:], ratio=4,
                                       rotate=False, eps=1e-6)  # fmt: skip


def test_unvalidated_kernels_need_the_opt_in(monkeypatch):
    """A kernel registered with validated=False (not yet through its GPU tests): "ffi" runs it, "auto" only where
    DSV4_JAX_ENABLE_KERNELS names it."""
    monkeypatch.setattr(registry, "_global_reason", lambda: (None, False))  # as if on an SM90 GPU
    op = registry.register("_test_new", lambda x, *, quant_sim: "ref", kernel="dsv4_jax.kernels.gemm:fp8_linear",
                           validated=False)  # fmt: skip
    monkeypatch.setattr(registry.Op, "load_kernel", lambda self: lambda x: "kernel")
    try:
        monkeypatch.delenv(registry.OPT_IN, raising=False)
        assert op(1, opts=ops.Opts(backend="auto")) == "ref"
        assert op(1, opts=ops.Opts(backend="ffi")) == "kernel"
        monkeypatch.setenv(registry.OPT_IN, "fp8_linear,_test_new")
        assert op(1, opts=ops.Opts(backend="auto")) == "kernel"
    finally:
        registry._OPS.pop("_test_new")


def test_extension_compiles_for_sm90a(tmp_path):
    inc = _deepgemm_include()
    if inc is None:
        pytest.skip(f"could not obtain {DEEPGEMM_PIN} (no registry access and DSV4_DEEPGEMM_INCLUDE unset)")
    gen = _gen()
    # The TMA-multicast variant: the same template as the plain one plus the cluster code paths.
    entries = [e for e in gen.plan(["tiny"], 132) if e["kind"] == 0 and e["multicast"] == 2][:1]
    gen.write(tmp_path, entries)
    cu = tmp_path / f"gemm_{entries[0]['name']}.cu"
    gencode = "-gencode=arch=compute_90a,code=sm_90a"
    base = ["nvcc", "-std=c++20", "-O3", gencode, "-Xcompiler", "-fPIC", "-c", "-I", str(FFI / "csrc")]
    _cached_compile(
        base + ["--expt-relaxed-constexpr", "--expt-extended-lambda", "-I", str(inc), str(cu)],
        [cu, FFI / "csrc" / "gemm_entry.h"],
        "gemm",
    )
    # gemv, dequant_gemv and indexer are test_kernel_ptxas's objects too (whichever test comes first compiles them)
    for name in ("quant_kernels.cu", "gemv_kernels.cu", "mhc_kernels.cu", "dequant_gemv_kernels.cu",
                 "sparse_mla_kernels.cu", "indexer_kernels.cu", "compressor_kernels.cu",
                 "router_kernels.cu", "topk_kernels.cu", "launch_util.cu"):  # fmt: skip
        kernel_object(name)
    # Host code: FFI handlers (jaxlib's headers) and the TMA/launch code, compiled by nvcc's host compiler.
    ffi_inc = pathlib.Path(jax.ffi.include_dir())
    for name in ("handlers.cc", "attention_handlers.cc", "moe_handlers.cc", "gemm_launch.cc"):
        src = FFI / "csrc" / name
        _cached_compile(
            [
                "nvcc",
                "-std=c++20",
                "-x",
                "c++",
                "-Xcompiler",
                "-fPIC",
                "-c",
                "-I",
                str(FFI / "csrc"),
                "-I",
                str(ffi_inc),
                str(src),
            ],
            [src, FFI / "csrc" / "kernels.h", FFI / "csrc" / "handlers.h", FFI / "csrc" / "handler_util.h"],
            name.split(".")[0],
        )


def test_fp4_grouped_route_knob(monkeypatch):
    """DSV4_FFI_FP4_GROUPED_MIN_ROWS: unset = the measured default, a count, 0 = never, anything else a clear error."""
    from dsv4_jax.kernels import moe_fp4

    monkeypatch.delenv("DSV4_FFI_FP4_GROUPED_MIN_ROWS", raising=False)
    assert moe_fp4.grouped_min_rows() == moe_fp4.GROUPED_MIN_ROWS == 5120
    monkeypatch.setenv("DSV4_FFI_FP4_GROUPED_MIN_ROWS", "512")
    assert moe_fp4.grouped_min_rows() == 512
    monkeypatch.setenv("DSV4_FFI_FP4_GROUPED_MIN_ROWS", "0")
    assert moe_fp4.grouped_min_rows() > 1 << 40
    monkeypatch.setenv("DSV4_FFI_FP4_GROUPED_MIN_ROWS", "lots")
    with pytest.raises(ValueError, match="DSV4_FFI_FP4_GROUPED_MIN_ROWS='lots'"):
        moe_fp4.grouped_min_rows()


@pytest.mark.parametrize("expert_layout", ["stored", "slabs"])
def test_decode_step_lowers_to_every_decode_kernel(monkeypatch, expert_layout):
    """Two full-width Flash layers (CSA + HCA, the first hash-routed) under backend="ffi", as if on an SM90 GPU: the
    decode step's program calls each decode kernel the expected number of times, and the kernels that read the layer
    stacks get the stacks (4-D block states, the 3-D hash table, the experts of all layers), not slices XLA would copy
    out on every step; in the slab layout the experts' scales reach the kernels as their uint32 words. Lowering only:
    nothing is compiled or run."""
    import collections
    import re

    import dsv4_jax
    from dsv4_jax import runner

    monkeypatch.setattr(registry, "_global_reason", lambda: (None, False))
    monkeypatch.delenv("DSV4_FFI_LAYER_GEMV_MAX_M", raising=False)
    cfg = dsv4_jax.Config.flash(n_layers=2, compress_ratios=(4, 128, 0), n_hash_layers=1)
    state = jax.eval_shape(lambda: dsv4_jax.prepare_params(dsv4_jax.init_random(cfg, 0), expert_layout=expert_layout))
    cache = jax.eval_shape(lambda: dsv4_jax.init_cache(cfg, 1, 512))
    with ops.record() as ran:
        text = runner._decode_jit.lower(state, cache, jnp.zeros((1,), jnp.int32), ops.Opts(backend="ffi"), None,
                                        False).as_text()  # fmt: skip
    assert set(ran.values()) == {"kernel"} and {"compressor_decode", "route_experts", "sparse_decode"} <= ran.keys()
    lines = [ln for ln in text.splitlines() if "custom_call @dsv4_" in ln]
    calls = collections.Counter(re.search(r"custom_call @(dsv4_\w+)", ln).group(1) for ln in lines)
    # the layer GEMVs: wq_a + wkv, wq_b + the indexer's wq_b (CSA), the shared expert's w1 + w3 in pairs; wq_b (HCA),
    # wo_b, w2 alone
    assert calls == {"dsv4_hc_pre": 4, "dsv4_fp8_gemv_layer": 5, "dsv4_fp8_gemv_layer_pair": 5,
                     "dsv4_compressor_decode": 3, "dsv4_kv_row": 2, "dsv4_q_heads": 2,
                     "dsv4_indexer_scores": 1, "dsv4_indexer_topk": 1, "dsv4_sparse_mla_decode": 2,
                     "dsv4_dequant_bf16_gemv": 2, "dsv4_route": 2, "dsv4_fp4_moe_gate_up": 2,
                     "dsv4_fp4_moe_down": 2}, calls  # fmt: skip
    for ln in lines:
        if "@dsv4_compressor_decode" in ln:  # the block states [layers, B, coff*m, C] as stacks
            assert re.search(r"tensor<\dx1x(8x1024|8x256|128x512)xf32>", ln), ln[-600:]
        scales = {"stored": r"tensor<256x2048x128xf8E8M0FNU>", "slabs": r"tensor<256x2048x32xui32>"}[expert_layout]
        if "@dsv4_fp4_moe_gate_up" in ln:  # w1's scales, [layers * E, I, K/32] bytes or [.., K/128] words
            assert re.search(scales, ln), ln[-600:]
    operands = [ln.rsplit("->", 1)[0].rsplit(": (", 1)[1] for ln in lines if "@dsv4_route" in ln]
    hashed = [o for o in operands if re.search(r"x6xi32>", o)]  # the hash table among the operands
    assert len(hashed) == 1 and re.search(r"tensor<\dx\d+x6xi32>", hashed[0]), operands  # as its stack


def test_indexer_topk_lowers_to_its_kernel_except_few_long_rows(monkeypatch):
    """`ops.indexer_topk` under backend="ffi", as if on an SM90 GPU: one `dsv4_indexer_topk` call for decode rows
    (64 x 16,384) and prefill rows; a few rows longer than the kernel's shared-memory row go to XLA's sort
    (`kernels.indexer.XLA_TOPK_MIN_N`), the same picks."""
    import re

    from dsv4_jax.kernels import indexer as kernel_indexer

    monkeypatch.setattr(registry, "_global_reason", lambda: (None, False))

    def calls(rows, n):
        f = jax.jit(lambda s, v: ops.indexer_topk(s, v, k=512, opts=ops.Opts(backend="ffi")))
        text = f.lower(jax.ShapeDtypeStruct((rows, n), jnp.float32), jax.ShapeDtypeStruct((rows,), jnp.int32)).as_text()
        return len(re.findall(r"custom_call @dsv4_indexer_topk", text))

    assert calls(64, 16384) == 1 and calls(8192, 2048) == 1
    assert calls(kernel_indexer.XLA_TOPK_MAX_ROWS, 262144) == 1
    assert calls(1, 262144) == 0 and calls(1, kernel_indexer.XLA_TOPK_MIN_N) == 1


def test_indexer_topk_sort_route_equals_the_reference():
    """The kernel side's XLA route (`kernels.indexer.topk_by_sort`, taken for a few very long rows) gives the op's
    reference picks: ties by index, -0 as +0, visible counts from 0 to past n."""
    from dsv4_jax.kernels import indexer as kernel_indexer

    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=(3, 5000)) * 4) / 4  # many exact ties, +0 and -0
    s[0, :100] = -0.0
    n_vis = jnp.asarray([0, 3000, 6000], jnp.int32)
    ref = ops.indexer_topk(jnp.asarray(s, jnp.float32), n_vis, k=700, opts=ops.Opts(backend="reference"))
    got = kernel_indexer.topk_by_sort(jnp.asarray(s, jnp.float32), n_vis, k=700)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@pytest.mark.parametrize(
    "rows,route,passes", [(1, None, 1), (8, None, 1), (9, None, 1), (16, None, 1), (24, None, 1), (33, None, 2),
                          (64, None, 2), (24, "passes", 3), (64, "passes", 8), (24, "wide", 1), (24, "gemm", 1),
                          (64, "gemm", 1), (1, "gemm", 1)]
)  # fmt: skip
def test_gemv_layer_routes_lower_with_their_workspace(monkeypatch, rows, route, passes):
    """`fp8_gemv_layer`'s route is fixed when the program is traced: up to 8 rows the fused one-launch GEMV (empty
    workspaces), beyond that the quantise-once routes (an e4m3 [R, K] workspace and its scales [K/128, align(R, 4)]):
    the wide GEMV (one layer index per pass of 16 or 32 rows; the default without the extension's layer GEMMs, as
    here) or the in-place GEMM (DSV4_FFI_GEMV_LAYER=gemm: one layer index and a [64] int32 psum workspace), or with
    DSV4_FFI_GEMV_LAYER=passes the fused GEMV in passes of 8 rows. Lowering only; an unknown route is refused by
    name."""
    from dsv4_jax.kernels import ffi_ops

    if route is None:
        monkeypatch.delenv("DSV4_FFI_GEMV_LAYER", raising=False)
    else:
        monkeypatch.setenv("DSV4_FFI_GEMV_LAYER", route)
    args = (jax.ShapeDtypeStruct((rows, 256), jnp.bfloat16), jax.ShapeDtypeStruct((3, 512, 256), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((3, 4, 2), jnp.float32), jnp.int32(1))  # fmt: skip
    text = jax.jit(lambda *a: ffi_ops.fp8_gemv_layer(*a)).lower(*args).as_text()  # a fresh trace: the knob is read
    (line,) = [ln for ln in text.splitlines() if "custom_call @dsv4_fp8_gemv_layer" in ln]
    wide = rows > 8 and route != "passes"
    assert f"tensor<{passes}xi32>" in line, line
    assert (f"tensor<{rows}x256xf8E4M3FN>" in line) == wide, line
    assert (f"tensor<2x{-(-rows // 4) * 4}xf32>" in line) == wide, line
    assert ("tensor<64xi32>" in line) == (rows > 8 and route == "gemm"), line
    monkeypatch.setenv("DSV4_FFI_GEMV_LAYER", "fast")
    with pytest.raises(ValueError, match="DSV4_FFI_GEMV_LAYER='fast'"):
        jax.jit(lambda *a: ffi_ops.fp8_gemv_layer(*a)).lower(jax.ShapeDtypeStruct((9, 256), jnp.bfloat16), *args[1:])


@pytest.mark.parametrize("rows,knob,pairs", [(1, None, 1), (8, None, 1), (9, None, 1), (32, None, 1),
                                             (1, "separate", 0), (24, "separate", 0)])  # fmt: skip
def test_fp8_linear_pair_shares_a_launch(monkeypatch, rows, knob, pairs):
    """`ops.fp8_linear_pair` on two layers of stacks at one index: one `dsv4_fp8_gemv_layer_pair` launch wherever the
    layer GEMV runs (up to 32 rows; beyond 8 with one quantisation workspace for both), two layer GEMVs with
    DSV4_FFI_GEMV_PAIR=separate; plain weights (no stack) two dense linears. Lowering only; the wrapper refuses rows
    and stacks the kernel cannot take, by name."""
    from dsv4_jax.kernels import ffi_ops
    from dsv4_jax.layer_view import LayerSlice

    monkeypatch.setattr(registry, "_global_reason", lambda: (None, False))
    if knob is None:
        monkeypatch.delenv("DSV4_FFI_GEMV_PAIR", raising=False)
    else:
        monkeypatch.setenv("DSV4_FFI_GEMV_PAIR", knob)
    x = jax.ShapeDtypeStruct((rows, 256), jnp.bfloat16)
    w1, s1 = jax.ShapeDtypeStruct((3, 512, 256), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((3, 4, 2), jnp.float32)
    w2, s2 = jax.ShapeDtypeStruct((3, 128, 256), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((3, 1, 2), jnp.float32)

    def f(x, w1, s1, w2, s2, i):
        sl = [LayerSlice(a, i) for a in (w1, s1, w2, s2)]
        return ops.fp8_linear_pair(x, *sl, opts=ops.Opts(backend="ffi"))

    out = jax.eval_shape(f, x, w1, s1, w2, s2, jnp.int32(1))
    assert [o.shape for o in out] == [(rows, 512), (rows, 128)]
    text = jax.jit(f).lower(x, w1, s1, w2, s2, jnp.int32(1)).as_text()
    assert text.count("custom_call @dsv4_fp8_gemv_layer_pair") == pairs, text[-2000:]
    assert text.count("custom_call @dsv4_fp8_gemv_layer(") == 2 - 2 * pairs, text[-2000:]
    assert text.count(f"tensor<{rows}x256xf8E4M3FN>") == (0 if rows <= 8 else 2 - pairs), text[-2000:]  # workspaces
    plain = jax.jit(lambda x, w1, s1, w2, s2: ops.fp8_linear_pair(x, w1[0], s1[0], w2[0], s2[0],
                                                                  opts=ops.Opts(backend="ffi")))  # fmt: skip
    if rows <= 8:  # (more rows than that take DeepGEMM, which has no instantiation for these shapes)
        assert "dsv4_fp8_gemv_layer" not in plain.lower(x, w1, s1, w2, s2).as_text()
    with pytest.raises(ValueError, match="65 rows, at most 64"):
        jax.eval_shape(ffi_ops.fp8_gemv_layer_pair, jax.ShapeDtypeStruct((65, 256), jnp.bfloat16), w1, s1, w2, s2, 1)
    with pytest.raises(ValueError, match="stack of one L"):
        jax.eval_shape(ffi_ops.fp8_gemv_layer_pair, jax.ShapeDtypeStruct((1, 256), jnp.bfloat16), w1, s1,
                       jax.ShapeDtypeStruct((2, 128, 256), w2.dtype), s2, 1)  # fmt: skip


def test_grouped_dequant_rows_follow_the_grouping_and_the_kill_switch(monkeypatch):
    """Up to 32 rows of the grouped `wo_a` go to the kernel when a group is whole 16-row tiles (the tensor-core
    kernel), else, or with DSV4_FFI_DEQUANT_GEMV=cuda (the CUDA-core kernel), up to 8; more rows lower to XLA's
    dequantisation + einsum (the reference's arithmetic)."""
    from dsv4_jax.kernels import dequant, ffi_ops

    monkeypatch.delenv("DSV4_FFI_DEQUANT_GEMV", raising=False)
    assert ffi_ops.dequant_gemv_max_m(1024) == 32 and ffi_ops.dequant_gemv_max_m(24) == 8
    w = jax.ShapeDtypeStruct((2 * 1024, 256), jnp.float8_e4m3fn)
    s = jax.ShapeDtypeStruct((16, 2), jnp.float32)

    def lowers_to_kernel(m):
        x = jax.ShapeDtypeStruct((m, 2, 256), jnp.bfloat16)
        f = jax.jit(lambda *a: dequant.grouped_dequant_linear(*a))  # a fresh trace: the knob is read when tracing
        return "dsv4_dequant_bf16_gemv" in f.lower(x, w, s).as_text()

    assert lowers_to_kernel(32) and not lowers_to_kernel(33)
    monkeypatch.setenv("DSV4_FFI_DEQUANT_GEMV", "cuda")
    assert ffi_ops.dequant_gemv_max_m(1024) == 8
    assert lowers_to_kernel(8) and not lowers_to_kernel(9)


def test_sparse_mla_splits_follow_the_sm_count(monkeypatch):
    """The split-KV grid is sized by the GPU's SM count (jax's `core_count`), 132 where there is no GPU: the 64-head
    kernel one block per SM (batch x splits <= SMs), capped by the 64-key tiles; the 16-head kernel two per SM."""
    from dsv4_jax.kernels import ffi_ops

    if jax.default_backend() != "gpu":
        assert ffi_ops.gpu_sms() == 132
    for sms in (132, 114, 78):
        monkeypatch.setattr(ffi_ops, "gpu_sms", lambda sms=sms: sms)
        assert ffi_ops.sparse_mla_splits(2, 64, 64 * 1000) == sms // 2
        assert ffi_ops.sparse_mla_splits(64, 64, 64 * 1000) == max(1, sms // 64)
        assert ffi_ops.sparse_mla_splits(1, 64, 640) == 10  # one run per 64-key tile at most
        assert ffi_ops.sparse_mla_splits(4, 32, 64 * 1000) == -(-2 * sms // 8)
