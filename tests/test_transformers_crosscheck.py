"""Independent cross-check against the DeepSeek-V4 implementation of HF `transformers` (torch, CPU).

Same tiny random weights on both sides: `Config.tiny()` without its MTP layer (transformers does not implement MTP;
only the main logits are compared), our FP8/MXFP4 parameters dequantized to float32 and renamed by
`tests/hf_bridge.py`. The parameters that `init_random` sets to trivial values (attention sinks 0, norm weights 1,
router bias 0, mHC scale 1 / base 0) are randomized first so that their use is checked too. Ours runs with
`quant_sim=False` (no in-forward FP8/FP4 simulation, which transformers does not have either); transformers runs in
float32 (exact-math reference; its bf16 variant serves as a noise reference only). 192 tokens: past the 128-token
window, one complete HCA block (ratio 128) and 48 CSA entries (ratio 4), of which the indexer keeps 8 per query.

Known implementation differences (spec §9) and how they show up here:
  * bf16 activations between ops in ours (as the official code) vs float32 in transformers: every sublayer output
    differs by a few bf16 roundings, ~2^-8 relative.
  * indexer: ours rotates q and k by the Hadamard matrix (orthonormal: q.k unchanged in exact arithmetic) and rounds
    the scores to bf16 at the reference's points; transformers scores in float32. Near-tied entries can therefore be
    chosen differently; every such flip is checked to be a near-tie of transformers' own float32 scores.
  * RMSNorm weight multiply before/after the cast, routing weight before/after w2, bf16 rounding of compressed
    entries: equal in exact math, rounding-level only.
  * window cache ("keeps 127 + new") and sinks: identical in a single prefill (128 keys, sink in the denominator).
Nothing had to be mirrored or skipped in the bridge.

Measured (jax 0.11.2 / torch 2.13.0 / transformers 5.23.0, CPU; the numbers the test prints):
  logits, ours vs transformers fp32: rel-RMS 1.79e-2, argmax agreement 98.96 %, per-position rel-RMS median 5.5e-3;
  noise floors: transformers bf16 vs its own fp32: rel-RMS 3.20e-2, argmax 99.48 %, per-position median 7.8e-3;
                ours vs ours with 1-ulp bf16 changes of 1 % of the embedding entries: rel-RMS 1.99e-2 (2.1e-2 ..
                2.7e-2 for other seeds / without the randomized trivial parameters).
  The logits' rel-RMS is dominated by the few positions where a top-k choice flips (indexer rows: 5 of 192 in
  layer 2, 7 of 192 in layer 4), which is why a 1-ulp input change moves it as much as the whole bf16-vs-fp32
  difference does. Hence the tolerances: rel-RMS <= 2x the bf16-vs-fp32 noise floor of transformers itself and
  <= 2x our own 1-ulp sensitivity, argmax agreement >= 95 %, and the flip-insensitive per-position median <= 1.5x
  transformers' bf16 median (per layer as well: ours 2.4e-3 .. 5.2e-3 vs bf16 3.1e-3 .. 7.6e-3).
  Sublayers fed the same inputs (our captured attn/ffn inputs), per position: KV rows (window and compressed
  entries) <= 2.9e-3, attention median 5.3e-3 .. 5.7e-3 and max 8.4e-3 away from indexer flips (0.07 .. 0.18 at
  them), MoE median 3.8e-3, max 6.0e-3, routing identical; asserted: KV <= 2 * 2^-8, medians <= 2 * 2^-8, attention
  > 3 * 2^-8 only at indexer flips, MoE max <= 4 * 2^-8, each flip a near-tie (transformers' float32 score gap
  <= 4 * 2^-8 of the row's largest |score|; measured <= 0.74 %). A bf16 rounding is 2^-9 .. 2^-8 relative, and a
  sublayer output goes through a few of them.
  Mutating a single tensor on the transformers side (sinks of one layer zeroed, one compressor's position bias
  zeroed, a norm weight reset to 1, one expert's down_proj scaled by 1.1, the gate/up halves swapped, one indexer
  head's weight negated) fails at least one of these tests.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

# Skip only when a package is absent: a torch that is installed but cannot load (a missing CUDA library) must fail.
torch = pytest.importorskip("torch", reason="torch is not installed (`scripts/setup.sh test` installs it)",
                            exc_type=ModuleNotFoundError)  # fmt: skip
pytest.importorskip("transformers", reason="transformers is not installed (it is in the `test` extra)",
                    exc_type=ModuleNotFoundError)  # fmt: skip

import jax.numpy as jnp  # noqa: E402
from conftest import rel_rms  # noqa: E402
from flax import nnx  # noqa: E402

import dsv4_jax  # noqa: E402
from dsv4_jax.checkpoint.layout import without_mtp  # noqa: E402

SEQ = 192
BF16_EPS = 2.0**-8  # bf16 relative spacing (8 significant bits)


def _row_rel(a, b) -> np.ndarray:
    """rel-RMS per position: `a`, `b` `[1, S, ...]` -> `[S]`."""
    a = np.asarray(a, np.float64).reshape(a.shape[1], -1)
    b = np.asarray(b, np.float64).reshape(b.shape[1], -1)
    return np.sqrt(np.mean((a - b) ** 2, -1) / np.mean(b**2, -1))


def _randomize_trivial(state, seed: int):
    """Random values for the parameters `init_random` leaves trivial (sinks, norm weights, router bias, mHC
    scale/base), so that the cross-check exercises them."""
    rng = np.random.default_rng(seed)
    out = []
    for path, var in nnx.to_flat_state(state.params):
        v = var[...]
        name = ".".join(map(str, path))
        if name.endswith("attn_sink"):
            v = jnp.asarray(rng.normal(0, 1, v.shape), v.dtype)
        elif name.endswith("norm.weight"):
            v = jnp.asarray(1 + 0.2 * rng.normal(size=v.shape), jnp.float32).astype(v.dtype)
        elif name.endswith("gate.bias"):
            v = jnp.asarray(rng.normal(0, 0.1, v.shape), v.dtype)
        elif name.endswith(("_scale", "_base")) and "hc_" in name:
            v = v + jnp.asarray(rng.normal(0, 0.1, v.shape), v.dtype)
        out.append((path, var.replace(v)))
    return dsv4_jax.ModelState(state.graphdef, nnx.from_flat_state(out), state.config)


def _perturb_embeddings(state, seed: int, frac: float = 0.01):
    """One-ulp (bf16) up/down changes of a random `frac` of the embedding entries."""
    rng = np.random.default_rng(seed)
    out = []
    for path, var in nnx.to_flat_state(state.params):
        v = var[...]
        if path == ("embed", "weight"):
            bits = np.asarray(v).view(np.uint16).astype(np.int32)
            step = np.where(rng.random(bits.shape) < frac, rng.choice([-1, 1], bits.shape), 0)
            v = jnp.asarray((bits + step).astype(np.uint16).view(v.dtype))
        out.append((path, var.replace(v)))
    return dsv4_jax.ModelState(state.graphdef, nnx.from_flat_state(out), state.config)


def _hf_block_outputs(model, tokens) -> tuple[np.ndarray, list[np.ndarray]]:
    """(logits, per-layer residual streams `[1, S, n, d]`) of a transformers model, both float32 numpy."""
    outs: dict[int, np.ndarray] = {}
    hooks = [
        layer.register_forward_hook(lambda mod, args, out, i=i: outs.__setitem__(i, out.detach().float().numpy()))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(tokens), use_cache=False).logits.float().numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, [outs[i] for i in range(len(outs))]


@pytest.fixture(scope="module")
def run():
    import hf_bridge

    cfg = without_mtp(dsv4_jax.Config.tiny())
    state = _randomize_trivial(dsv4_jax.init_random(cfg, 0), 1)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, SEQ)).astype(np.int64)

    ours = dsv4_jax.forward_outputs(state, tokens, capture=True, opts=dsv4_jax.Opts(quant_sim=False))
    # Same jitted function (capture=True), so no second compilation.
    perturbed = dsv4_jax.forward_outputs(
        _perturb_embeddings(state, 3), tokens, capture=True, opts=dsv4_jax.Opts(quant_sim=False)
    )

    hf = hf_bridge.build_hf_model(state)
    hf_logits, hf_blocks = _hf_block_outputs(hf, tokens)
    hf16 = hf_bridge.to_bf16_like_hf(copy.deepcopy(hf))
    hf16_logits, hf16_blocks = _hf_block_outputs(hf16, tokens)
    return dict(cfg=cfg, state=state, tokens=tokens, ours=ours, ours_logits=np.asarray(ours.logits),
                perturbed_logits=np.asarray(perturbed.logits), hf=hf, hf_logits=hf_logits, hf_blocks=hf_blocks,
                hf16_logits=hf16_logits, hf16_blocks=hf16_blocks)  # fmt: skip


def test_rope_tables_match(run):
    from dsv4_jax import nn

    rot = run["hf"].model.rotary_emb
    cfg = run["cfg"]
    np.testing.assert_allclose(rot.main_inv_freq.numpy(), nn.layer_inv_freq(cfg, 0), rtol=1e-6)
    np.testing.assert_allclose(rot.compress_inv_freq.numpy(), nn.layer_inv_freq(cfg, 4), rtol=1e-6)
    assert rot.compress_attention_scaling == 1.0  # no YaRN mscale, as the reference


def test_logits_match_transformers(run, capsys):
    ours, ref, ref16, pert = run["ours_logits"], run["hf_logits"], run["hf16_logits"], run["perturbed_logits"]
    assert ours.shape == ref.shape == (1, SEQ, run["cfg"].vocab_size)
    assert np.isfinite(ours).all() and np.isfinite(ref).all()
    err, floor_hf, floor_self = rel_rms(ours, ref), rel_rms(ref16, ref), rel_rms(pert, ours)
    agree = float(np.mean(ours.argmax(-1) == ref.argmax(-1)))
    agree16 = float(np.mean(ref16.argmax(-1) == ref.argmax(-1)))
    med, med16 = float(np.median(_row_rel(ours, ref))), float(np.median(_row_rel(ref16, ref)))
    with capsys.disabled():
        print(f"\n[ours vs transformers fp32] logits rel-RMS {err:.3e} (transformers bf16 vs fp32 {floor_hf:.3e}, "
              f"ours 1-ulp self-noise {floor_self:.3e}); argmax agreement {agree:.4f} (bf16 {agree16:.4f}); "
              f"per-position median {med:.3e} (bf16 {med16:.3e})")  # fmt: skip
    assert err <= 2 * floor_hf
    assert err <= 2 * floor_self
    assert agree >= 0.95
    assert med <= 1.5 * med16


def test_block_outputs_match_transformers(run, capsys):
    """Layer by layer, free-running (each side from its own previous layer): the per-position median error stays at
    the level of transformers' own bf16 run."""
    lines = []
    for i, (ref, ref16) in enumerate(zip(run["hf_blocks"], run["hf16_blocks"], strict=True)):
        ours = np.asarray(run["ours"].captures[f"layer{i}"]["block_out"], np.float32)
        med, med16 = float(np.median(_row_rel(ours, ref))), float(np.median(_row_rel(ref16, ref)))
        lines.append(f"L{i} rel-RMS {rel_rms(ours, ref):.2e} median {med:.2e} (bf16 {rel_rms(ref16, ref):.2e} / "
                     f"{med16:.2e})")  # fmt: skip
        assert med <= 1.5 * med16 + BF16_EPS / 4, lines[-1]
    with capsys.disabled():
        print("\n[block outputs vs transformers fp32] " + "; ".join(lines))


def _indexer_fp32(attn, x, pos, layer):
    """transformers' indexer on `x`: (top-k indices `[S, k]`, its float32 scores `[S, T]`)."""
    ind = attn.compressor.indexer
    seen = {}
    scorer = ind.scorer.forward
    ind.scorer.forward = lambda *a: seen.setdefault("s", scorer(*a))
    try:
        idx = ind(x, attn.q_a_norm(attn.q_a_proj(x)), pos, None, layer)
    finally:
        del ind.scorer.forward
    return idx[0].numpy(), seen["s"][0].numpy()


def test_sublayers_on_same_inputs(run, capsys):
    """Each attention and MoE sublayer of transformers, fed our captured sublayer inputs, gives our sublayer outputs
    to bf16 rounding; indexer selections differ only at near-ties of transformers' float32 scores, MoE routing does
    not differ."""
    from transformers.masking_utils import create_sliding_window_causal_mask
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

    hf, caps, tokens = run["hf"], run["ours"].captures, torch.from_numpy(run["tokens"])
    pos = torch.arange(SEQ)[None]
    lines = []
    with torch.no_grad():
        dummy = torch.zeros(1, SEQ, run["cfg"].dim)
        pe = {k: hf.model.rotary_emb(dummy, pos, layer_type=k) for k in ("main", "compress")}
        mask = create_sliding_window_causal_mask(config=hf.config, inputs_embeds=dummy, attention_mask=None,
                                                 past_key_values=None, position_ids=pos)  # fmt: skip
        for i, layer in enumerate(hf.model.layers):
            rec = caps[f"layer{i}"]
            x = torch.from_numpy(np.asarray(rec["attn_in"], np.float32))
            y = layer.self_attn(x, position_embeddings=pe, position_ids=pos, attention_mask=mask)[0].numpy()
            e_attn = _row_rel(np.asarray(rec["attn_out"], np.float32), y)
            # KV rows: the tokens' own (window) KV and the compressed entries, before any selection.
            attn, kv_ours = layer.self_attn, np.asarray(rec["attn_kv"], np.float32)[0]
            cos, sin = pe[attn.rope_layer_type]
            kv = apply_rotary_pos_emb(attn.kv_norm(attn.kv_proj(x))[:, None], cos, sin)[0, 0].numpy()
            e_kv = _row_rel(kv_ours[None, :SEQ], kv[None])
            if attn.compressor is not None:
                entries = attn.compressor(x, attn.q_a_norm(attn.q_a_proj(x)), pos, None, i)[0][0, 0].numpy()
                assert entries.shape[0] == SEQ // attn.compressor.compress_rate == kv_ours.shape[0] - SEQ
                e_kv = np.concatenate([e_kv, _row_rel(kv_ours[None, SEQ:], entries[None])])
            assert e_kv.max() <= 2 * BF16_EPS, f"layer {i}: KV rows differ by up to {e_kv.max():.3e}"
            flipped = np.zeros(SEQ, bool)
            if layer.self_attn.layer_type == "compressed_sparse_attention":
                idx_hf, scores = _indexer_fp32(layer.self_attn, x, pos, i)
                idx_ours = np.asarray(rec["indexer_topk"])[0] - SEQ  # ours are offsets into [window ‖ entries]
                for t in range(SEQ):
                    a, b = set(idx_hf[t][idx_hf[t] >= 0]), set(idx_ours[t][idx_ours[t] >= 0])
                    if a == b:
                        continue
                    flipped[t] = True
                    gap = scores[t, sorted(a - b)].min() - scores[t, sorted(b - a)].max()
                    scale = np.abs(scores[t, : (t + 1) // 4]).max()
                    assert 0 <= gap <= 4 * BF16_EPS * scale, f"layer {i} t={t}: not a near-tie ({gap=}, {scale=})"
                assert flipped.mean() <= 0.05, f"layer {i}: indexer selection differs on {flipped.sum()} rows"
            # Large attention differences only where the indexer chose differently (rounding alone stays < 2.2^-8).
            big = e_attn > 3 * BF16_EPS
            assert not (big & ~flipped).any(), f"layer {i}: attention differs at positions {np.flatnonzero(big)}"
            assert np.median(e_attn) <= 2 * BF16_EPS

            xf = torch.from_numpy(np.asarray(rec["ffn_in"], np.float32))
            yf = layer.mlp(xf, input_ids=tokens).numpy()
            e_ffn = _row_rel(np.asarray(rec["ffn_out"], np.float32), yf)
            gate = layer.mlp.gate
            _, _, hf_idx = gate(xf, tokens) if layer.mlp.is_hash else gate(xf)
            ours_idx = np.asarray(rec["route_idx"])
            route_diff = sum(set(a) != set(b) for a, b in zip(ours_idx, hf_idx.numpy(), strict=True))
            assert route_diff == 0, f"layer {i}: routing differs on {route_diff} tokens"
            line = (f"L{i} kv max {e_kv.max():.2e}, attn median {np.median(e_attn):.2e} max {e_attn.max():.2e} "
                    f"(indexer flips {flipped.sum()}), ffn median {np.median(e_ffn):.2e} "
                    f"max {e_ffn.max():.2e}")  # fmt: skip
            assert np.median(e_ffn) <= 2 * BF16_EPS and e_ffn.max() <= 4 * BF16_EPS, line
            lines.append(line)
    with capsys.disabled():
        print("\n[sublayers on the same inputs] " + "; ".join(lines))
