"""Logical-axis sharding rules, and restore straight into shardings on 8 simulated CPU devices (a subprocess: jax
fixes its device count when it initialises)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec
from multiproc import REPO, env_for

from dsv4_jax.config import Config
from dsv4_jax.model import abstract
from dsv4_jax.sharding import AXES, ShardingRules, logical_to_spec, param_shardings, shard


def test_logical_to_spec():
    r = ShardingRules()
    assert logical_to_spec(("expert", "expert_ffn", "embed"), r) == PartitionSpec("expert", None, None)
    assert logical_to_spec(("vocab", "embed"), r) == PartitionSpec("tensor", None)
    assert logical_to_spec(("embed", "o_groups"), r) == PartitionSpec(None, "tensor")
    assert logical_to_spec((None,), r) == PartitionSpec(None)
    two = ShardingRules(expert=("data", "expert"))
    assert logical_to_spec(("expert", "embed"), two) == PartitionSpec(("data", "expert"), None)
    assert logical_to_spec(("vocab", "embed"), ShardingRules.replicated()) == PartitionSpec(None, None)


def test_collisions_and_unknown_axes_raise():
    bad = ShardingRules(expert_ffn="expert")
    with pytest.raises(ValueError, match="'expert' and 'expert_ffn'.* same mesh axis 'expert'"):
        logical_to_spec(("expert", "expert_ffn", "embed"), bad)
    mesh = AbstractMesh((1, 4, 2), AXES)
    with pytest.raises(ValueError, match=r"sharding rules collide:(.|\n)*groups\.0\.0\.ffn\.experts\.w1\.weight"):
        param_shardings(abstract(Config.tiny()), mesh, bad)
    with pytest.raises(ValueError, match="unknown logical axis 'nope'"):
        logical_to_spec(("nope",), ShardingRules())


def _layer_specs(cfg, mesh, **kw):
    """PartitionSpec of every parameter by released per-layer path (a stacked parameter's spec minus its leading,
    never sharded, layers axis)."""
    from flax import nnx

    from dsv4_jax.checkpoint.layout import layer_sharding, param_table

    sh = dict(nnx.to_flat_state(param_shardings(abstract(cfg), mesh, **kw)))
    for p, v in sh.items():
        if p[0] == "groups":
            assert v.spec[0] is None, (p, v.spec)  # the layer scan walks the stacking axis: never sharded
    return {s.path: layer_sharding(s, sh[s.state_path]).spec for s in param_table(cfg)}


def test_param_shardings_and_fallbacks():
    cfg = Config.tiny()
    mesh = AbstractMesh((1, 4, 2), AXES)
    report: list[str] = []
    sh = _layer_specs(cfg, mesh, report=report)
    spec = lambda *p: sh[p]  # noqa: E731
    assert spec("layers", 2, "ffn", "experts", "w1", "weight") == PartitionSpec("expert", None, None)
    assert spec("layers", 2, "ffn", "experts", "w1", "scale") == PartitionSpec("expert", None, None)
    assert spec("layers", 2, "attn", "wq_b", "weight") == PartitionSpec("tensor", None)  # 4096 rows = 32 blocks
    assert spec("layers", 2, "attn", "wq_b", "scale") == PartitionSpec("tensor", None)
    assert spec("embed", "weight") == PartitionSpec("tensor", None)
    assert spec("layers", 0, "attn", "attn_sink") == PartitionSpec("tensor")
    # wo_a: 128 rows = one 128-block, cannot split over 2: weight and scale both stay replicated, and it is reported
    assert spec("layers", 2, "attn", "wo_a", "weight") == PartitionSpec(None, None)
    assert spec("layers", 2, "attn", "wo_a", "scale") == PartitionSpec(None, None)
    assert any(r.startswith("groups.1.0.attn.wo_a.weight: dim 1") for r in report), report
    assert not any("wo_a.scale" in r for r in report)  # reported once, on the weight
    # a rule naming an axis the mesh lacks: replicated and reported
    report2: list[str] = []
    sh2 = _layer_specs(cfg, AbstractMesh((8,), ("expert",)), report=report2)
    assert sh2[("head", "weight")] == PartitionSpec(None, None)
    assert sh2[("layers", 1, "ffn", "experts", "w2", "weight")] == PartitionSpec("expert", None, None)
    assert any("mesh has no axis ['tensor']" in r for r in report2)


def test_shard_without_mesh_is_identity():
    x = jax.numpy.ones((4, 8))
    assert shard(x, ("vocab", "embed")) is x


SCRIPT = textwrap.dedent(
    """
    import os, sys
    import jax, numpy as np
    from flax import nnx
    assert len(jax.devices()) == 8, jax.devices()
    sys.path.insert(0, "tests")
    from ckpt_helpers import small_cfg
    from dsv4_jax.checkpoint.writer import write_native
    from dsv4_jax.checkpoint.convert import convert
    from dsv4_jax.checkpoint.restore import load
    from dsv4_jax.checkpoint.layout import param_table, read_param
    from dsv4_jax.checkpoint.native import index_tensors
    from dsv4_jax.model import abstract
    from dsv4_jax.sharding import make_mesh, param_shardings, ShardingRules, shard

    out = sys.argv[1]
    cfg = small_cfg(n_routed_experts=8)
    native = write_native(cfg, os.path.join(out, "native"), seed=4, values="random")
    orbax = convert(native, os.path.join(out, "orbax"), progress=False)
    tensors = index_tensors(native)
    specs = {s.path: s for s in param_table(cfg)}
    from dsv4_jax.checkpoint.layout import layer_sharding, per_layer
    mesh = make_mesh(data=1, expert=4, tensor=2)
    for rules in (None, ShardingRules(expert=("expert", "tensor"), vocab=None, q_heads=None, heads=None,
                                      o_groups=None, index_heads=None, index_heads_w=None)):
        want = dict(nnx.to_flat_state(param_shardings(abstract(cfg), mesh, rules)))
        for path in (orbax, native):
            got_cfg, state = load(path, mesh, rules)
            assert got_cfg == cfg
            for p, var in nnx.to_flat_state(state.params):
                a = var.get_value()
                assert a.sharding.is_equivalent_to(want[p], a.ndim), (path, p, a.sharding, want[p])
                assert len(a.addressable_shards) == 8
            n_sharded = 0
            for spec, a in per_layer(state):  # each layer's copy: exactly its slice of the source bytes per device
                a = jax.device_put(a, layer_sharding(spec, want[spec.state_path]))
                n_sharded += any(s is not None for s in a.sharding.spec)
                ref = read_param(tensors, specs[spec.path], cfg.n_routed_experts)
                for s in a.addressable_shards:
                    want_bytes = np.ascontiguousarray(ref[s.index]).tobytes()
                    assert np.asarray(s.data).tobytes() == want_bytes, (spec.key, s.index)
            e = dict(nnx.to_flat_state(state.params))[("groups", 0, 0, "ffn", "experts", "w1", "weight")].get_value()
            assert e.addressable_shards[0].data.shape[1] == (2 if rules is None else 1), e.sharding
            assert n_sharded > 20, n_sharded
    with jax.set_mesh(mesh):
        y = jax.jit(lambda x: shard(x, ("expert", None)))(jax.numpy.ones((8, 4)))
        assert y.sharding.spec[0] == "expert", y.sharding
    print("SHARDING OK")
    """
)


def test_restore_into_shardings_on_8_devices(tmp_path):
    # env_for: the session's compilation cache, so that the four loads share their stacking programs
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, env=env_for(8), capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0 and "SHARDING OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]
