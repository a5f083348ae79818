"""Two JAX processes on this machine (4 simulated CPU devices each, joined through `jax.distributed` on loopback)
run the same expert-parallel program as one process with 8 devices: `make_mesh(expert=8)` over the global devices,
`init_random` straight into the shardings, `forward` on fixed tokens, the logits gathered with `process_allgather`.

The model code does not know how many processes there are; whether the MoE runs through XLA's automatic
partitioning or an explicit `shard_map`, two processes must compute exactly what one computes on the same mesh."""

from __future__ import annotations

import numpy as np
from multiproc import launch

from dsv4_jax.parallel.plan import weight_bytes

TIMEOUT_S = 900


def test_two_processes_compute_what_one_does(tmp_path):
    multi, single = tmp_path / "multi.npz", tmp_path / "single.npz"
    r = launch(["tests/mesh_worker.py", str(multi), "--model", "tiny16", "--runs", "ep"], 2, 4, TIMEOUT_S)
    assert r.ok and all("WORKER OK" in out for out in r.outputs), r.report()
    r = launch(["tests/mesh_worker.py", str(single), "--model", "tiny16", "--runs", "ep,single"], 1, 8, TIMEOUT_S)
    assert r.ok, r.report()
    a, b = np.load(multi), np.load(single)
    assert int(a["process_count"]) == 2 and int(b["process_count"]) == 1
    # One mesh over both processes' devices, each process a contiguous half of the expert axis.
    assert a["mesh_processes"].reshape(-1).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len(set(a["mesh_ids"].reshape(-1).tolist())) == 8
    # The same program on the same mesh: the same bits.
    assert a["logits_ep"].shape == (2, 40, 512)
    np.testing.assert_array_equal(a["logits_ep"], b["logits_ep"])
    # Expert parallelism splits no sum: every token's expert rows are computed whole and combined in expert-index
    # order (`moe.combine`), so the mesh gives the one-device logits exactly.
    np.testing.assert_array_equal(b["logits_ep"], b["logits_single"])
    # Every device of both processes holds the bytes the memory plan says.
    from mesh_worker import model_config

    want = weight_bytes(model_config("tiny16"), {"expert": 8})["per_device"]
    for table in (a["device_bytes_ep"], b["device_bytes_ep"]):
        assert table.shape == (8, 2) and (table[:, 1] == want).all() and int(a["plan_bytes_ep"]) == want
