"""Issue #17 rehearsal on 8 simulated CPU devices: a V4-Pro-shaped model at small width (Pro's layer pattern: two
hash-routed HCA layers, a hash-routed CSA layer, then HCA/CSA pairs; 16 heads, 16 indexer heads, 8 wo groups, vocab
and 16 experts all divisible by 8) under an 8-way expert mesh, with both rule presets, against one device.

* `ep` (experts split, the rest replicated): bit-exact. Expert parallelism splits no sum (see `test_multihost`).
* `ep-tp` (heads, vocab and wo groups split too): within reduction-order noise. A head-split layer may sum partial
  results across devices (wo_b's input dim is the wo groups; the indexer sums over its heads), which can reorder
  fp32 additions. Today XLA's partitioner gathers instead and the logits come out bit-exact; the tolerance leaves
  room for an explicit psum."""

from __future__ import annotations

import numpy as np
from conftest import rel_rms
from multiproc import launch

from dsv4_jax.parallel.plan import weight_bytes
from dsv4_jax.sharding import rules_preset


def test_pro_shaped_model_on_8_devices_matches_one_device(tmp_path):
    out = tmp_path / "pro.npz"
    r = launch(["tests/mesh_worker.py", str(out), "--model", "pro-small", "--runs", "single,ep,ep-tp"], 1, 8, 900)
    assert r.ok, r.report()
    res = np.load(out)
    ref = res["logits_single"]
    assert ref.shape == (2, 40, 1024) and np.isfinite(ref).all()
    np.testing.assert_array_equal(res["logits_ep"], ref)
    tp = res["logits_ep-tp"]
    assert rel_rms(tp, ref) < 1e-3 and (tp.argmax(-1) == ref.argmax(-1)).mean() > 0.99
    from mesh_worker import pro_small

    for run in ("ep", "ep-tp"):  # the placement is the plan's, and ep-tp holds about half as much
        want = weight_bytes(pro_small(), {"expert": 8}, rules_preset(run))["per_device"]
        assert (res[f"device_bytes_{run}"][:, 1] == want).all()
    assert res["device_bytes_ep-tp"][0, 1] < 0.6 * res["device_bytes_ep"][0, 1]
