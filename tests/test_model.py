"""Model-level behaviour: abstract shapes and parameter counts at full size, random init, causality, determinism,
and `prepare_params` (the kernels' one-time scale decoding) changing no logit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv4_jax
from dsv4_jax import Config


def _count(cfg: Config) -> tuple[float, float, dict]:
    total = mtp = 0
    by_dtype: dict[str, int] = {}
    for path, var in nnx.to_flat_state(dsv4_jax.abstract(cfg).params):
        n = int(np.prod(var.shape))
        by_dtype[str(var.dtype)] = by_dtype.get(str(var.dtype), 0) + n * np.dtype(var.dtype).itemsize
        if path[-1] == "scale":
            continue
        n *= 2 if var.dtype == np.uint8 else 1  # packed e2m1: two parameters a byte
        total += n
        mtp += n if path[0] == "mtp" else 0
    return total / 1e9, (total - mtp) / 1e9, by_dtype


def test_flash_abstract_counts_and_formats():
    total, main, by_dtype = _count(Config.flash())
    assert abs(main - 284.3) < 0.5 and abs(total - 290.9) < 0.5  # README: 284B; spec: 290.9B with MTP
    assert abs(sum(by_dtype.values()) / 1e9 - 159.6) < 1.0  # the released checkpoint is 159.6 GB
    ab = dsv4_jax.abstract(Config.flash()).params
    # layers 3..42 alternate HCA, CSA: one stack of 20 each (group 2); layer 2 (CSA, hash-routed) its own group
    hca, csa = ab["groups"][2][0], ab["groups"][2][1]
    w1 = hca["ffn"]["experts"]["w1"]
    assert w1["weight"].shape == (20, 256, 2048, 2048) and w1["weight"].dtype == jnp.uint8
    assert w1["scale"].shape == (20, 256, 2048, 128) and w1["scale"].dtype == jnp.float8_e8m0fnu
    assert w1["weight"].logical_axes == ("layers", "expert", "expert_ffn", "embed")
    wq_b = csa["attn"]["wq_b"]
    assert wq_b["weight"].shape == (20, 32768, 1024) and wq_b["weight"].dtype == jnp.float8_e4m3fn
    assert wq_b["scale"].shape == (20, 256, 8)
    assert csa["attn"]["compressor"]["ape"].shape == (20, 4, 1024)
    assert hca["attn"]["compressor"]["ape"].shape == (20, 128, 512)
    assert "indexer" not in hca["attn"] and "compressor" not in ab["groups"][0][0]["attn"]
    assert ab["groups"][0][0]["ffn"]["gate"]["tid2eid"].shape == (2, 129280, 6)
    assert ab["groups"][1][0]["ffn"]["gate"]["tid2eid"].shape == (1, 129280, 6)
    assert "bias" in hca["ffn"]["gate"] and "tid2eid" not in ab["mtp"][0]["ffn"]["gate"]


def test_layer_groups_compile_a_handful_of_bodies():
    from dsv4_jax.model import layer_groups, layer_slot

    def kinds(cfg):
        return [(g.first, [(k.ratio, k.hash_routed) for k in g.unit], g.repeats) for g in layer_groups(cfg)]

    assert kinds(Config.flash()) == [(0, [(0, True)], 2), (2, [(4, True)], 1), (3, [(128, False), (4, False)], 20)]
    assert kinds(Config.pro()) == [(0, [(128, True)], 2), (2, [(4, True)], 1), (3, [(128, False), (4, False)], 29)]
    assert [layer_slot(Config.flash(), i) for i in (0, 1, 2, 3, 4, 42)] == [
        (0, 0, 0), (0, 0, 1), (1, 0, 0), (2, 0, 0), (2, 1, 0), (2, 1, 19)]  # fmt: skip
    for cfg in (Config.flash(), Config.pro(), Config.tiny()):  # every layer exactly once, in order
        layers = [g.layer(u, r) for g in layer_groups(cfg) for r in range(g.repeats) for u in range(len(g.unit))]
        assert layers == list(range(cfg.n_layers))


def test_pro_abstract_counts():
    total, _, _ = _count(Config.pro())
    assert abs(total - 1598.8) < 1.0  # ~1.6 T


# The tests below share compiled programs: `forward_outputs` of [2, 40] tokens with MTP and captures (`captured`),
# and `forward` of [1, 40] tokens (a compile costs ~10 s on 2 CPU cores).
@pytest.fixture(scope="module")
def tiny():
    return dsv4_jax.init_random(Config.tiny(), 0)


@pytest.fixture(scope="module")
def captured(tiny):
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, 512)
    return dsv4_jax.forward_outputs(tiny, tokens, mtp_tokens=jnp.roll(tokens, -1, axis=1), capture=True)


def test_random_init_keeps_storage_formats_and_activations_order_one(tiny, captured):
    block = tiny.block(2)
    assert block.attn.wq_a.weight[...].dtype == jnp.float8_e4m3fn
    assert block.ffn.experts.w2.weight[...].dtype == jnp.uint8
    # layers of one stack got their own random weights
    assert not np.array_equal(np.asarray(tiny.block(2).attn.wq_a.weight[...], np.float32),
                              np.asarray(tiny.block(4).attn.wq_a.weight[...], np.float32))  # fmt: skip
    out = captured
    rms = [float(jnp.sqrt(jnp.mean(out.captures[f"layer{i}"]["block_out"].astype(jnp.float32) ** 2))) for i in range(6)]
    assert all(0.3 < r < 3.0 for r in rms), f"residual RMS per layer {rms}"
    sub = [float(jnp.sqrt(jnp.mean(out.captures[f"layer{i}"][k].astype(jnp.float32) ** 2)))
           for i in range(6) for k in ("attn_out", "ffn_out")]  # fmt: skip
    assert all(0.01 < r < 3.0 for r in sub), f"sublayer output RMS {sub}"
    assert np.isfinite(np.asarray(out.logits)).all() and out.logits.shape == (2, 40, 512)
    assert 0.3 < float(jnp.std(out.logits)) < 10


def test_causal_and_deterministic(tiny):
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (1, 40), 0, 512))
    a = np.asarray(dsv4_jax.forward(tiny, tokens))
    np.testing.assert_array_equal(a, np.asarray(dsv4_jax.forward(tiny, tokens)))  # deterministic
    changed = tokens.copy()
    changed[0, 21] = (changed[0, 21] + 1) % 512
    b = np.asarray(dsv4_jax.forward(tiny, changed))
    np.testing.assert_array_equal(a[0, :21], b[0, :21])  # nothing before t moves
    assert not np.array_equal(a[0, 21:], b[0, 21:])


def test_sequences_shorter_than_a_compression_block(tiny):
    """1-3 tokens (fewer than the CSA ratio 4: no complete block, no compressed entry) are valid input: each gives
    the same logits as the same positions of a longer sequence (causality)."""
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (1, 40), 0, 512))
    full = np.asarray(dsv4_jax.forward(tiny, tokens))
    for t in (1, 3):
        short = np.asarray(dsv4_jax.forward(tiny, tokens[:, :t]))
        assert short.shape == (1, t, full.shape[-1]) and np.isfinite(short).all()
        np.testing.assert_allclose(short, full[:, :t], rtol=0, atol=1e-4 * np.abs(full).max())


def test_mtp_logits_and_split_merge(tiny, captured):
    out = captured
    assert out.mtp_logits.shape == out.logits.shape and np.isfinite(np.asarray(out.mtp_logits)).all()
    assert out.hidden.shape == (2, 40, 4, 256)
    # nnx.split / merge round trip keeps every parameter
    model = tiny.model()
    again = dsv4_jax.ModelState.from_model(model)
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(tiny.params), nnx.to_flat_state(again.params), strict=True):
        assert pa == pb and va[...].dtype == vb[...].dtype


def test_bad_input_is_named(tiny):
    with pytest.raises(ValueError, match="token id 512 is outside the vocabulary"):
        dsv4_jax.forward(tiny, np.array([[1, 512]]))
    with pytest.raises(ValueError, match="token id -3"):
        dsv4_jax.forward(tiny, np.array([[-3, 2]]))
    short = dsv4_jax.ModelState(tiny.graphdef, tiny.params, Config.tiny(max_seq_len=8))
    with pytest.raises(ValueError, match="sequence length 9 exceeds the configured maximum 8"):
        dsv4_jax.forward(short, np.zeros((1, 9), np.int32))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        dsv4_jax.forward(tiny, np.zeros((9,), np.int32))


def test_prepare_params_decodes_fp8_scales_once_and_changes_nothing(tiny):
    prepared = dsv4_jax.prepare_params(tiny)  # "auto": the experts as stored on a CPU
    block = prepared.block(2)
    assert block.attn.wq_b.scale[...].dtype == jnp.float32
    assert block.attn.wq_b.weight[...].dtype == jnp.float8_e4m3fn  # bytes as stored
    assert block.ffn.experts.w1.scale[...].dtype == jnp.float8_e8m0fnu  # MXFP4 scales untouched
    tokens = jnp.arange(40, dtype=jnp.int32)[None] % tiny.config.vocab_size
    np.testing.assert_array_equal(dsv4_jax.forward(prepared, tokens), dsv4_jax.forward(tiny, tokens))


def test_prepare_params_expert_slabs_same_results(tiny):
    """The MXFP4 experts' gate/up weights in the slab layout (every layer and the MTP block: the same bytes permuted,
    uint32 scale words; the down weight as stored) give the reference the same logits; with `donate=True` the input
    state's converted arrays are consumed, the others are not."""
    tokens = jnp.arange(40, dtype=jnp.int32)[None] % tiny.config.vocab_size
    fresh = dsv4_jax.init_random(tiny.config, 0)  # the shared fixture must not be donated
    want = np.asarray(dsv4_jax.forward(fresh, tokens))
    before = dict(nnx.to_flat_state(fresh.params))
    prepared = dsv4_jax.prepare_params(fresh, expert_layout="slabs", donate=True)
    flat = dict(nnx.to_flat_state(prepared.params))
    experts = [p for p in flat if "experts" in p and p[-2] in ("w1", "w3")]
    w1 = [flat[p].get_value() for p in experts if p[-2:] == ("w1", "weight")]  # stacks [L, E, ...] and the MTP's
    assert sum(w.shape[0] if w.ndim == 4 else 1 for w in w1) == tiny.config.n_layers + tiny.config.n_mtp_layers
    assert all(flat[p[:-1] + ("scale",)].get_value().dtype == jnp.uint32 for p in experts)
    down_scales = [v.get_value() for p, v in flat.items() if p[-3:] == ("experts", "w2", "scale")]
    assert down_scales and all(s.dtype == jnp.float8_e8m0fnu for s in down_scales)  # w2 stays as stored
    assert all(before[p].get_value().is_deleted() for p in experts if p[-1] == "weight")
    assert not any(v.get_value().is_deleted() for p, v in before.items() if p not in experts)
    np.testing.assert_array_equal(np.asarray(dsv4_jax.forward(prepared, tokens)), want)
    again = dsv4_jax.prepare_params(prepared, expert_layout="slabs")  # already in slabs: unchanged
    np.testing.assert_array_equal(np.asarray(dsv4_jax.forward(again, tokens)), want)
    with pytest.raises(ValueError, match="expert_layout='tiles'"):
        dsv4_jax.prepare_params(tiny, expert_layout="tiles")
