"""One run of a small model on a mesh, as a script: `python tests/mesh_worker.py OUT.npz --model M --runs R,...`.

Started by the multi-device tests in a fresh process (jax fixes its device count at start), possibly as one of
several processes (`tests/multiproc.py` sets the `DSV4_JAX_*` variables). For each run in `--runs`:

* `single`: the model on one device (`init_random` without a mesh), `forward` on the fixed tokens;
* `ep`, `ep-tp`, `default`: `make_mesh(expert=all devices)`, the parameters in the shardings of that rules preset,
  `forward`; the logits gathered to every host with `process_allgather`; and each device's bytes of parameters as
  placed (the sum of its shards), to compare with the memory plan. The first mesh run draws its parameters with
  `init_random` straight into the shardings (each device its own shards); later ones move those parameters to their
  shardings (a partitioned init compiles a program of its own: ~20 s each on the 2-core CI box).

Parameters are random bytes in the storage formats (`init_random(values="bytes")`: no quantization pass to compile).

Process 0 writes `logits_<run>`, `device_bytes_<run>` (per global device id), `plan_bytes_<run>` and the mesh's
process layout to OUT.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys

import numpy as np


def model_config(name: str):
    from dsv4_jax.config import Config

    if name == "tiny16":  # sliding, CSA, HCA, hash and bias routing, MTP; 16 experts: 2 per device on 8
        return Config.tiny(n_layers=3, compress_ratios=(0, 4, 128, 0), n_hash_layers=1, n_routed_experts=16)
    if name == "pro-small":  # V4-Pro's layer pattern and head / expert divisibility at small width
        return pro_small()
    raise ValueError(name)


def pro_small():
    """`Config.pro()` with small dims and 7 layers: [HCA, hash] x 2, [CSA, hash] x 1, [HCA, CSA] x 2, plus MTP.
    Every tensor-parallel dim splits 8 ways in whole 128-blocks: 16 heads x 128, 8 wo groups x 128 rows, 16 indexer
    heads, vocab 1024; 16 experts."""
    from dsv4_jax.config import Config

    ratios = (128, 128) + tuple(4 if i % 2 == 0 else 128 for i in range(2, 7)) + (0,)
    return Config.pro(vocab_size=1024, dim=256, n_layers=7, compress_ratios=ratios, n_heads=16, head_dim=128,
                      q_lora_rank=128, o_groups=8, o_lora_rank=128, index_n_heads=16, index_topk=8,
                      n_routed_experts=16, n_activated_experts=2, moe_inter_dim=128, max_seq_len=8192)  # fmt: skip


VALUES = "bytes"  # init_random's values: the tests that compare with one device draw the same


def tokens_for(cfg) -> np.ndarray:
    """Fixed `[2, 40]` tokens: past 32 positions, so CSA's indexer selects among more entries than index_topk."""
    return np.random.default_rng(7).integers(2, cfg.vocab_size, (2, 40)).astype(np.int32)


def device_bytes(state) -> dict[int, int]:
    """Bytes of parameters each addressable device holds, by device id."""
    import jax

    out: dict[int, int] = {}
    for leaf in jax.tree.leaves(state.params):
        for s in leaf.addressable_shards:
            out[s.device.id] = out.get(s.device.id, 0) + s.data.nbytes
    return out


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--model", default="tiny16")
    p.add_argument("--runs", default="ep")
    args = p.parse_args(argv)
    # A process that hangs (e.g. waiting at a collective for another) shows where, in the log the test reports.
    faulthandler.dump_traceback_later(300, repeat=True)

    from dsv4_jax.parallel import distributed

    distributed.initialize()  # a no-op for one process
    import jax
    from jax.experimental import multihost_utils

    import dsv4_jax
    from dsv4_jax.parallel import make_mesh, memory_plan
    from dsv4_jax.sharding import param_shardings, rules_preset

    cfg = model_config(args.model)
    tokens = tokens_for(cfg)
    results: dict[str, np.ndarray] = {}
    placed = None  # the first mesh run's parameters
    n = len(jax.devices())
    for run in args.runs.split(","):
        if run == "single":
            state = dsv4_jax.init_random(cfg, 0, values=VALUES)
            results["logits_single"] = np.asarray(dsv4_jax.forward(state, tokens))
            continue
        mesh = make_mesh(expert=n)
        rules = rules_preset(run)
        if placed is None:
            state = placed = dsv4_jax.init_random(cfg, 0, mesh=mesh, rules=rules, values=VALUES)
        else:
            shardings = param_shardings(placed, mesh, rules)
            state = dsv4_jax.ModelState(placed.graphdef, jax.device_put(placed.params, shardings), cfg)
        with jax.set_mesh(mesh):  # the mesh in context: the routed experts run expert-parallel (a shard_map)
            logits = dsv4_jax.forward(state, tokens)
        results[f"logits_{run}"] = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
        local = device_bytes(state)
        ids = sorted(local)
        table = np.asarray([[i, local[i]] for i in ids], np.int64)
        results[f"device_bytes_{run}"] = np.asarray(multihost_utils.process_allgather(table)).reshape(-1, 2)
        results[f"plan_bytes_{run}"] = np.asarray(memory_plan(cfg, dict(mesh.shape), rules).weights)
        results["mesh_processes"] = np.vectorize(lambda d: d.process_index)(mesh.devices)
        results["mesh_ids"] = np.vectorize(lambda d: d.id)(mesh.devices)
    results["process_count"] = np.asarray(jax.process_count())
    if jax.process_index() == 0:
        np.savez(args.out, **results)
    if jax.process_count() > 1:  # leave together: a process that exits alone waits at jax's shutdown barrier
        multihost_utils.sync_global_devices("mesh_worker done")
        jax.distributed.shutdown()
    print("WORKER OK", jax.process_index(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
