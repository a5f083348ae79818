"""Two JAX processes on this machine (4 simulated CPU devices each, joined through `jax.distributed` on loopback)
run the expert-parallel program: `make_mesh(expert=8)` over the global devices, `init_random` straight into the
shardings (random bytes in the storage formats), `forward` on fixed tokens, the logits gathered with
`process_allgather`. They must give, bit for bit, the logits of the same model on one device (computed here, in the
test's own process).

The model code does not know how many processes there are; whether the MoE runs through XLA's automatic
partitioning or an explicit `shard_map`, two processes must compute exactly what one computes. Expert parallelism
splits no sum (every token's expert rows are computed whole and combined in expert-index order, `moe.combine`), so
the mesh gives the one-device logits exactly; that one process with the 8 devices does too is `test_pro_mesh`'s
check (and `test_expert_parallel`'s, through `generate`)."""

from __future__ import annotations

import numpy as np
from mesh_worker import VALUES, model_config, tokens_for
from multiproc import launch

import dsv4_jax
from dsv4_jax.parallel.plan import weight_bytes

TIMEOUT_S = 900


def test_two_processes_compute_what_one_does(tmp_path):
    multi = tmp_path / "multi.npz"
    r = launch(["tests/mesh_worker.py", str(multi), "--model", "tiny16", "--runs", "ep"], 2, 4, TIMEOUT_S)
    assert r.ok and all("WORKER OK" in out for out in r.outputs), r.report()
    a = np.load(multi)
    assert int(a["process_count"]) == 2
    # One mesh over both processes' devices, each process a contiguous half of the expert axis.
    assert a["mesh_processes"].reshape(-1).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len(set(a["mesh_ids"].reshape(-1).tolist())) == 8
    # The same model on one device (mesh_worker's `single` run): the same bits.
    cfg = model_config("tiny16")
    single = np.asarray(dsv4_jax.forward(dsv4_jax.init_random(cfg, 0, values=VALUES), tokens_for(cfg)))
    assert a["logits_ep"].shape == single.shape == (2, 40, 512)
    np.testing.assert_array_equal(a["logits_ep"], single)
    # Every device of both processes holds the bytes the memory plan says.
    want = weight_bytes(cfg, {"expert": 8})["per_device"]
    table = a["device_bytes_ep"]
    assert table.shape == (8, 2) and (table[:, 1] == want).all() and int(a["plan_bytes_ep"]) == want
