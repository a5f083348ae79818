"""The model against DeepSeek's official inference code, through the `official-tiny` fixture.

Sublayers fed the recorded inputs are sharp (the fixture README: bit-exact is achievable where the math allows, and
a one-ulp nudge of 1% of the input moves attention ~2%, CSA ~5.5%, MoE ~1%); end-to-end logits of an FP8 model
differ at the ~4% noise floor the fixture records (`noise_prefill_logits`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_rms
from flax import nnx

from dsv4_jax import Capture, Opts, forward_outputs

LAYERS = range(6)
CSA_LAYERS = (2, 4)


# Sublayers and blocks run as (graph definition, parameters) of the layer's own module: the graph definition is the
# layer's kind, so the layers of one kind (0-1, 2 and 4, 3 and 5) share one compiled program.
def _split(state, layer: int, part: str | None = None):
    block = state.block(layer)
    return nnx.split(block if part is None else getattr(block, part))


@functools.partial(jax.jit, static_argnums=0)
def _attn(graphdef, params, x):
    rec = Capture()
    y = nnx.merge(graphdef, params)(x, Opts(), rec)
    return y, rec


@functools.partial(jax.jit, static_argnums=0)
def _ffn(graphdef, params, x, tokens):
    rec = Capture()
    y = nnx.merge(graphdef, params)(x, tokens, Opts(), rec)
    return y, rec


@functools.partial(jax.jit, static_argnums=0)
def _block(graphdef, params, X, tokens):
    return nnx.merge(graphdef, params)(X, tokens, Opts())


def _bf16(a):
    return jnp.asarray(a).astype(jnp.bfloat16)


@pytest.fixture(scope="module")
def attn_runs(official_state, oracle):
    return {l: _attn(*_split(official_state, l, "attn"), _bf16(oracle["prefill_attn_in"][l])) for l in LAYERS}


@pytest.fixture(scope="module")
def prefill(official_state, oracle):
    return forward_outputs(official_state, oracle["prompt_tokens"], mtp_tokens=oracle["mtp_prefill_tokens"])


def _tie_rows(oracle, layer):
    return oracle[f"indexer_boundary_tie_L{layer}"][0] if layer in CSA_LAYERS else np.zeros(160, bool)


def _rows_reading_other_kv(rec, oracle, layer):
    """Rows whose official index list names a KV row that is not bit-identical to ours: a one-ulp flip upstream (an
    FP8 or bf16 rounding of a compressed entry at a rounding boundary, where the fp32 summation order of the
    compressor decides) reaches every row that attends to that entry. The KV rows themselves are held to 3e-4 below;
    the attention math is judged on the rows whose inputs agree."""
    kv, okv = np.asarray(rec["attn_kv"])[0], oracle[f"attn_kv_L{layer}"][0]
    differing = np.flatnonzero(np.any(kv != okv, axis=-1))
    return np.isin(oracle[f"attn_topk_L{layer}"][0], differing).any(-1)


@pytest.mark.parametrize("layer", LAYERS)
def test_attention_sublayer(attn_runs, oracle, layer):
    y, rec = attn_runs[layer]
    ref = oracle["prefill_attn_out"][layer][0]
    got = np.asarray(y, np.float32)[0]
    # rows whose indexer selection is decided by an exact tie, and rows that read a KV row one ulp off the official one
    keep = ~_tie_rows(oracle, layer) & ~_rows_reading_other_kv(rec, oracle, layer)
    assert keep.sum() >= 32, f"layer {layer}: only {keep.sum()} rows read the official KV rows"
    err = rel_rms(got[keep], ref[keep])
    exact = np.mean(got[keep] == ref[keep])
    assert err < 5e-3, f"layer {layer}: attention output rel-rms {err:.2e}"
    assert exact > 0.85, f"layer {layer}: only {exact:.1%} of elements bit-exact"
    # The KV rows handed to sparse attention (window after FP8 fake-quant, then compressed entries).
    assert rel_rms(rec["attn_kv"], oracle[f"attn_kv_L{layer}"]) < 3e-4


@pytest.mark.parametrize("layer", LAYERS)
def test_attention_index_lists(attn_runs, oracle, layer):
    _, rec = attn_runs[layer]
    got = np.sort(np.asarray(rec["attn_topk"])[0], axis=-1)
    ref = np.sort(oracle[f"attn_topk_L{layer}"][0], axis=-1)
    keep = ~_tie_rows(oracle, layer)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got[keep], ref[keep])


@pytest.mark.parametrize("layer", CSA_LAYERS)
def test_indexer_scores_and_selection(attn_runs, oracle, layer):
    _, rec = attn_runs[layer]
    ref = oracle[f"indexer_scores_L{layer}"][0]
    got = np.asarray(rec["indexer_scores"])[0]
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))  # visibility mask
    fin = np.isfinite(ref)
    assert np.mean(got[fin] == ref[fin]) > 0.99, "bf16 indexer scores should match bit for bit almost everywhere"
    assert rel_rms(got[fin], ref[fin]) < 1e-3
    sel = np.sort(np.asarray(rec["indexer_topk"])[0], -1)
    sel_ref = np.sort(oracle[f"indexer_topk_L{layer}"][0], -1)
    ties = oracle[f"indexer_boundary_tie_L{layer}"][0]
    np.testing.assert_array_equal(sel[~ties], sel_ref[~ties])
    # The selection really drops entries: some queries see more entries than index_topk.
    assert (np.isfinite(ref).sum(-1) > sel.shape[-1]).sum() > 100


@pytest.mark.parametrize("layer", LAYERS)
def test_moe_sublayer_bit_exact(official_state, oracle, layer):
    tokens = jnp.asarray(oracle["prompt_tokens"], jnp.int32)
    y, rec = _ffn(*_split(official_state, layer, "ffn"), _bf16(oracle["prefill_ffn_in"][layer]), tokens)
    np.testing.assert_array_equal(np.asarray(y, np.float32)[0], oracle["prefill_ffn_out"][layer][0])
    np.testing.assert_array_equal(np.asarray(rec["route_idx"]), oracle[f"route_idx_L{layer}"])
    np.testing.assert_allclose(np.asarray(rec["route_w"]), oracle[f"route_w_L{layer}"], rtol=1e-6)


@pytest.mark.parametrize("layer", LAYERS)
def test_block_chains(official_state, oracle, layer):
    """Block `layer` fed the recorded output of block `layer - 1` reproduces the recorded block output."""
    tokens = jnp.asarray(oracle["prompt_tokens"], jnp.int32)
    if layer == 0:
        X = official_state.model().streams(tokens)
    else:
        X = _bf16(oracle["prefill_block_out"][layer - 1])
    got = _block(*_split(official_state, layer), X, tokens)
    keep = ~_tie_rows(oracle, layer)
    assert rel_rms(np.asarray(got)[0][keep], oracle["prefill_block_out"][layer][0][keep]) < 5e-3


def test_prefill_logits_within_noise_floor(prefill, oracle):
    ref = oracle["prefill_logits"]
    noise = max(rel_rms(n, ref) for n in oracle["noise_prefill_logits"])  # ~0.038: two correct implementations
    err = rel_rms(prefill.logits, ref)
    agree = np.mean(np.argmax(prefill.logits, -1) == np.argmax(ref, -1))
    assert err < 1.5 * noise, f"prefill logits rel-rms {err:.4f} vs noise floor {noise:.4f}"
    assert agree > 0.85


def test_mtp_logits_within_noise_floor(prefill, oracle):
    ref = oracle["mtp_prefill_logits"]
    err = rel_rms(prefill.mtp_logits, ref)
    assert err < 0.06, f"MTP logits rel-rms {err:.4f}"
    assert np.mean(np.argmax(prefill.mtp_logits, -1) == np.argmax(ref, -1)) > 0.85


def test_full_logits_longer_sequence(official_state, oracle):
    """The one-shot prefill of 200 tokens (past the window and a second CSA indexer regime)."""
    out = forward_outputs(official_state, oracle["full_tokens"], mtp_tokens=oracle["mtp_full_tokens"])
    assert rel_rms(out.logits, oracle["full_logits"]) < 0.06
    assert rel_rms(out.mtp_logits, oracle["mtp_full_logits"]) < 0.06
