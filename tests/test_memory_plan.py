"""The memory plan: per-device weights equal the real placement (8 simulated CPU devices, a subprocess: jax fixes its
device count at start), the cache and capacity arithmetic, the workspace estimate against XLA's buffer assignment
(compiled from abstract shapes), and `dsv4-jax info --mesh ...` (in-process, config only; nothing is loaded)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
from multiproc import REPO, env_for

from dsv4_jax.cache import cache_bytes
from dsv4_jax.cli import main
from dsv4_jax.config import Config
from dsv4_jax.parallel.plan import GiB, memory_plan, weight_bytes
from dsv4_jax.sharding import ShardingRules, rules_preset

EP, EPTP = ShardingRules.expert_parallel(), ShardingRules.expert_tensor_parallel()

PLACEMENT = textwrap.dedent(
    """
    import math
    import jax, numpy as np
    from flax import nnx
    from dsv4_jax.config import Config
    from dsv4_jax.model import abstract
    from dsv4_jax.parallel import make_mesh, memory_plan
    from dsv4_jax.sharding import param_shardings, rules_preset

    assert len(jax.devices()) == 8, jax.devices()
    abstracts = {}  # tracing a full-size model's shapes takes seconds: once per model
    for name, n, rules in [("flash", 2, "ep"), ("flash", 2, "ep-tp"), ("flash", 8, "ep"), ("pro", 8, "ep"),
                           ("pro", 8, "ep-tp")]:
        cfg = getattr(Config, name)()
        mesh = make_mesh(expert=n, devices=jax.devices()[:n])
        if name not in abstracts:
            abstracts[name] = abstract(cfg)
        ab = abstracts[name]
        sh = dict(nnx.to_flat_state(param_shardings(ab, mesh, rules_preset(rules))))
        per_device = dict.fromkeys(mesh.devices.flat, 0)
        shard_sum = 0
        for path, var in nnx.to_flat_state(ab.params):
            sds = jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sh[path])
            item = np.dtype(sds.dtype).itemsize
            shard_sum += math.prod(sds.sharding.shard_shape(sds.shape)) * item
            for dev, idx in sds.sharding.devices_indices_map(sds.shape).items():  # what each device holds
                per_device[dev] += math.prod(len(range(*s.indices(d))) for s, d in zip(idx, sds.shape)) * item
        plan = memory_plan(cfg, dict(mesh.shape), rules_preset(rules))
        assert set(per_device.values()) == {plan.weights} == {shard_sum}, (name, n, rules, per_device, plan.weights)
        print(f"PLACEMENT {name} expert={n} {rules} {plan.weights}")
    print("PLACEMENT OK")
    """
)


def test_plan_weights_equal_the_real_placement_on_8_devices():
    r = subprocess.run([sys.executable, "-c", PLACEMENT], cwd=REPO, env=env_for(8), capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0 and "PLACEMENT OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]
    got = {tuple(line.split()[1:4]): int(line.split()[4]) for line in r.stdout.splitlines() if line.count(" ") == 4}
    assert got[("flash", "expert=2", "ep")] > got[("flash", "expert=2", "ep-tp")] > got[("flash", "expert=8", "ep")]
    assert got[("pro", "expert=8", "ep")] > got[("pro", "expert=8", "ep-tp")]


def test_weight_breakdown_flash_on_two_devices():
    cfg = Config.flash()
    whole = weight_bytes(cfg, {"expert": 1}, EP)
    ep, eptp = weight_bytes(cfg, {"expert": 2}, EP), weight_bytes(cfg, {"expert": 2}, EPTP)
    assert whole["per_device"] == whole["unsharded"] == ep["unsharded"]
    # ep: exactly half of every routed expert, everything else whole
    assert ep["by_kind"]["routed_experts"] * 2 == whole["by_kind"]["routed_experts"]
    for kind in ("attention", "embed_head", "shared_expert", "router", "other"):
        assert ep["by_kind"][kind] == whole["by_kind"][kind], kind
    # ep-tp: also the head-split attention weights and the vocab; the shared expert and mHC stay whole
    assert eptp["by_kind"]["embed_head"] * 2 == whole["by_kind"]["embed_head"]
    assert whole["by_kind"]["attention"] / 2 < eptp["by_kind"]["attention"] < whole["by_kind"]["attention"]
    assert eptp["by_kind"]["shared_expert"] == whole["by_kind"]["shared_expert"]
    assert not ep["fallbacks"] and not eptp["fallbacks"]
    # the released checkpoint's size (README: 159.6 GB)
    assert round(whole["unsharded"] / 1e9, 1) == 159.6


def test_cache_rows_and_kv_layouts():
    cfg = Config.flash()
    p = memory_plan(cfg, {"expert": 2}, EP, batch=3, context=8192)
    assert p.cache_rows == 3 and p.cache == cache_bytes(cfg, 3, 8192)  # replicated over "expert"
    p = memory_plan(cfg, {"data": 2, "expert": 2}, EP, batch=3, context=8192)
    assert p.cache_rows == 2 and p.cache == cache_bytes(cfg, 2, 8192)  # batch split over "data", rounded up
    p = memory_plan(cfg, {"expert": 2}, EP, batch=4, context=8192, cache_batch_axes=("data", "expert"))
    assert p.cache_rows == 2  # data-parallel attention: each expert device holds its own rows
    fp8 = memory_plan(cfg, {"expert": 2}, EP, batch=1, context=1 << 20)
    bf16 = memory_plan(cfg, {"expert": 2}, EP, batch=1, context=1 << 20, kv_dtype="bf16")
    assert fp8.cache == cache_bytes(cfg, 1, 1 << 20, "fp8") and bf16.cache == cache_bytes(cfg, 1, 1 << 20, "bf16")
    assert 0.5 < fp8.cache / bf16.cache < 0.55  # 3,514 vs 6,880 B per token
    with pytest.raises(ValueError, match="kv_dtype='int8'"):
        memory_plan(cfg, {"expert": 2}, EP, kv_dtype="int8")
    with pytest.raises(ValueError, match="context=2000000 exceeds"):
        memory_plan(cfg, {"expert": 2}, EP, context=2_000_000)


@pytest.mark.parametrize("chunk", [None, 4096])
def test_capacity_is_the_boundary(chunk):
    cfg, mesh = Config.flash(), {"expert": 2}
    p = memory_plan(cfg, mesh, EPTP, batch=1, context=65536, prefill_chunk=chunk)
    assert 0 < p.max_context < cfg.max_seq_len
    assert memory_plan(cfg, mesh, EPTP, context=p.max_context, prefill_chunk=chunk).fits
    assert not memory_plan(cfg, mesh, EPTP, context=p.max_context + 1, prefill_chunk=chunk).fits
    q = memory_plan(cfg, mesh, EPTP, batch=1, context=4096, prefill_chunk=chunk)
    assert q.max_batch > 1
    assert memory_plan(cfg, mesh, EPTP, batch=q.max_batch, context=4096, prefill_chunk=chunk).fits
    assert not memory_plan(cfg, mesh, EPTP, batch=q.max_batch + 1, context=4096, prefill_chunk=chunk).fits
    # the budget is XLA's pool: with JAX's default 75 % less fits
    small = memory_plan(cfg, mesh, EPTP, batch=1, context=65536, prefill_chunk=chunk, mem_fraction=0.75)
    assert small.max_context < p.max_context and small.budget == int(0.75 * p.device_bytes)


def test_prefilling_one_row_at_a_time_serves_more_rows():
    """At 64K tokens a chunk of 4096 costs ~34 GiB of indexer scores per row prefilled together: prefilling each new
    prompt alone (then decoding all rows together) leaves that room to the cache."""
    cfg, mesh = Config.flash(), {"expert": 2}
    together = memory_plan(cfg, mesh, EP, 1, 65536, prefill_chunk=4096)
    alone = memory_plan(cfg, mesh, EP, 1, 65536, prefill_chunk=4096, prefill_rows=1)
    assert alone.max_batch > 10 * together.max_batch > 0
    p = memory_plan(cfg, mesh, EP, alone.max_batch, 65536, prefill_chunk=4096, prefill_rows=1)
    assert p.fits and "x 1 rows" in p.workspace_step and p.cache_rows == alone.max_batch


def test_whole_prompt_prefill_is_bounded_by_the_indexer():
    """A 64K-token prompt in one step needs its indexer's q.K (64 heads x 16K entries per token, fp32) more than
    anything else; a 4K chunk bounds it, and decode barely needs any."""
    cfg = Config.flash()
    whole = memory_plan(cfg, {"expert": 2}, EP, context=65536)
    assert not whole.fits and whole.workspace_parts["indexer"] > 0.8 * whole.workspace
    assert whole.workspace_parts["indexer"] >= 64 * 65536 * (65536 // 4) * 4
    chunked = memory_plan(cfg, {"expert": 2}, EP, context=65536, prefill_chunk=4096)
    assert chunked.fits and chunked.workspace < whole.workspace / 10


def test_fp4_prefill_counts_the_widened_experts(monkeypatch):
    """Beyond `moe_fp4.FUSED_MAX_ROWS` dispatched rows the MXFP4 experts' grouped route widens this device's experts
    of the layer to FP8 (e4m3 bytes + tile scales): 128 experts x 3 x 2048 x 4096 B = 3.2 GB per device for Flash at
    expert=2. The plan's MoE phase counts it from that row count on, not below it (the one-pass kernel needs no copy),
    nor with the one-pass kernel forced (DSV4_FFI_FP4_PREFILL=fused) or the grouped route switched off."""
    from dsv4_jax.kernels.moe_fp4 import FUSED_MAX_ROWS
    from dsv4_jax.parallel.workspace import step_workspace

    monkeypatch.delenv("DSV4_FFI_FP4_PREFILL", raising=False)
    monkeypatch.delenv("DSV4_FFI_FP4_GROUPED_MIN_ROWS", raising=False)
    cfg = Config.flash()
    widened = 128 * 3 * 2048 * 4096
    t = FUSED_MAX_ROWS // 6  # the last token count whose rows the one-pass kernel takes
    below = step_workspace(cfg, 1, t, 4096, expert_split=2)["moe"]
    above = step_workspace(cfg, 1, t + 1, 4096, expert_split=2)["moe"]
    assert widened < above - below < 1.01 * widened + 2**20
    monkeypatch.setenv("DSV4_FFI_FP4_PREFILL", "fused")
    assert step_workspace(cfg, 1, t + 1, 4096, expert_split=2)["moe"] - below < 2**20
    monkeypatch.setenv("DSV4_FFI_FP4_PREFILL", "widen")
    assert step_workspace(cfg, 1, t, 4096, expert_split=2)["moe"] - below > widened
    monkeypatch.setenv("DSV4_FFI_FP4_GROUPED_MIN_ROWS", "0")  # the route switched off
    assert step_workspace(cfg, 1, t + 1, 4096, expert_split=2)["moe"] - below < 2**20
    assert step_workspace(Config.flash(expert_dtype="fp8"), 1, 4096, 4096, expert_split=2)["moe"] < widened


def test_full_size_targets():
    """Issue #15: V4-Flash on 2 x H200 (EP=2) fits with either preset. Issue #17: V4-Pro on 8 x H200 wants the
    attention weights split too (ep-tp): with everything but the experts replicated, 124 GiB of weights leave room
    for prompts of only ~4.6K tokens in one step (up to there the MXFP4 experts' one-pass prefill kernel needs no FP8
    copy of a layer's experts; the widen route beyond 5,461 tokens would take 3.2 GiB more)."""
    flash = {r: memory_plan(Config.flash(), {"expert": 2}, rules_preset(r), context=4096) for r in ("ep", "ep-tp")}
    assert all(p.fits for p in flash.values())
    assert 75 * GiB < flash["ep-tp"].weights < flash["ep"].weights < 80 * GiB
    pro = {r: memory_plan(Config.pro(), {"expert": 8}, rules_preset(r), context=4096) for r in ("ep", "ep-tp")}
    assert pro["ep-tp"].fits and pro["ep"].fits
    assert 4096 < pro["ep"].max_context < 6144 < 16384 < pro["ep-tp"].max_context
    assert pro["ep-tp"].weights < 110 * GiB < 120 * GiB < pro["ep"].weights


# ---- dsv4-jax info --mesh -------------------------------------------------------------------------------------------


def test_info_prints_the_plan_of_a_preset(capsys):
    argv = ["info", "--preset", "flash", "--mesh", "expert=2", "--rules", "ep-tp", "--context", "65536",
            "--prefill-chunk", "4096", "--batch", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    plan = memory_plan(Config.flash(), {"expert": 2}, EPTP, 2, 65536, prefill_chunk=4096)
    assert plan.summary() in out
    for needle in ("weights ", "cache ", "workspace ", "fits", "longest context at batch 1", "2 of 2 rows x 65,536"):
        assert needle in out
    assert "hint" not in out  # it fits


def test_info_hints_at_chunked_prefill_when_the_prompt_step_does_not_fit(capsys):
    assert main(["info", "--preset", "flash", "--mesh", "expert=2", "--context", "65536"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out
    assert "hint: the whole-prompt prefill step dominates; with `generate --prefill-chunk 4096`" in out


def test_info_json_has_the_plan(capsys):
    assert main(["info", "--preset", "pro", "--mesh", "expert=8", "--rules", "ep-tp", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    mp = s["memory_plan"]
    plan = memory_plan(Config.pro(), {"expert": 8}, EPTP)
    assert mp["weights"] == plan.weights and mp["fits"] is True and mp["mesh_shape"]["expert"] == 8
    assert mp["total"] == plan.total and mp["max_context"] == plan.max_context
    assert mp["rules"]["q_heads"] == "expert" and "layers" not in mp["rules"]


def test_info_plan_of_a_checkpoint_reads_only_its_config(tmp_path, capsys):
    """A folder with the full-size config.json and no weights at all: the plan needs nothing else."""
    folder = tmp_path / "flash"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(Config.flash().to_hf()))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    assert main(["info", str(folder), "--mesh", "expert=2"]) == 0
    out = capsys.readouterr().out
    assert memory_plan(Config.flash(), {"expert": 2}, EP).summary() in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--mesh", "gpu=2"], "--mesh: mesh 'gpu=2': expected AXIS=N"),
        (["--mesh", "expert=0"], "--mesh: mesh 'expert=0': expert='0' must be a positive integer"),
        (["--mesh", "expert=2", "--batch", "0"], "--batch 0 and --context 4096 must be positive"),
        (["--mesh", "expert=2", "--context", "2000000"], "--context 2000000 exceeds the model's max_seq_len"),
        (["--mesh", "expert=2", "--prefill-chunk", "0"], "--prefill-chunk 0 must be positive"),
        (["--mesh", "expert=2", "--prefill-rows", "0"], "--prefill-rows 0 must be positive"),
        (["--mesh", "expert=2", "--mem-fraction", "1.5"], "--mem-fraction 1.5 must be in (0, 1]"),
        (["--mesh", "expert=2", "--device-gib", "-1"], "--device-gib -1.0 must be positive"),
        (["--context", "8192"], "--context is a memory-plan flag: give --mesh too"),
        (["--prefill-rows", "1"], "--prefill-rows is a memory-plan flag: give --mesh too"),
    ],
)
def test_info_plan_flag_errors_exit_2(argv, needle, capsys):
    assert main(["info", "--preset", "flash", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsv4-jax info: error: ") and needle in err and len(err.splitlines()) == 1


def test_info_unknown_rules_preset_exits_2(capsys):
    with pytest.raises(SystemExit) as e:  # argparse's own choices check
        main(["info", "--preset", "flash", "--mesh", "expert=2", "--rules", "tp"])
    assert e.value.code == 2 and "invalid choice: 'tp'" in capsys.readouterr().err


def test_plan_summary_numbers_are_consistent():
    p = memory_plan(Config.flash(), {"expert": 2}, EP, batch=1, context=4096)
    assert p.total == p.weights + p.cache + p.workspace + p.reserve
    assert p.budget == int(p.device_bytes * 0.95) and p.fits == (p.total <= p.budget)
    assert math.isclose(p.device_bytes / GiB, 140.4, abs_tol=0.05)
    assert sum(p.weights_by_kind.values()) == p.weights


@pytest.mark.parametrize("rows, tokens", [(1, 512), (1, 4096)])
def test_workspace_tracks_xla(rows, tokens):
    """The workspace estimate against XLA's buffer assignment of `prefill` (compiled from abstract shapes, nothing
    allocated) on a small V4-Pro-shaped model: 512 tokens, where the reference's per-row expert weights dominate, and
    4096, where the indexer's q.K does."""
    import jax
    import jax.numpy as jnp
    from mesh_worker import pro_small

    from dsv4_jax import runner
    from dsv4_jax.cache import init_cache
    from dsv4_jax.model import abstract
    from dsv4_jax.options import Opts
    from dsv4_jax.parallel.workspace import step_workspace

    cfg = pro_small()
    cache = jax.eval_shape(lambda: init_cache(cfg, rows, tokens))
    args = (jax.ShapeDtypeStruct((rows, tokens), jnp.int32), jax.ShapeDtypeStruct((rows,), jnp.int32))
    compiled = runner._prefill_jit.lower(abstract(cfg), cache, *args, Opts()).compile()
    xla = compiled.memory_analysis().temp_size_in_bytes
    est = step_workspace(cfg, rows, tokens, tokens)
    assert 0.8 < est["peak"] / xla < 1.25, (est, xla)
    big = "reference_weights" if tokens == 512 else "indexer"
    assert est[big] == max(v for k, v in est.items() if k not in ("peak", "streams")), est
