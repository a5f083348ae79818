"""The converter's host memory is bounded by one item (a layer or a <= part_bytes piece of one), not by the model.

In a subprocess (clean RSS accounting): write a 7-block checkpoint of ~115 MB per block (~0.8 GB in all), convert
it, and sample RSS every 2 ms during the conversion. The growth must stay below the largest layer plus Orbax's copy
of it plus a small allowance, far below the checkpoint size (a converter holding the model would need ~0.8 GB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading, time
    import psutil
    from dsv4_jax.config import Config
    from dsv4_jax.checkpoint.writer import write_native
    from dsv4_jax.checkpoint.convert import convert, plan_items
    from dsv4_jax.checkpoint.layout import param_table

    out = sys.argv[1]
    cfg = Config.tiny(dim=1024, n_layers=6, compress_ratios=(0, 0, 4, 128, 0, 0, 0), n_hash_layers=1,
                      n_routed_experts=64, moe_inter_dim=1024, n_activated_experts=2)
    native = write_native(cfg, os.path.join(out, "native"), seed=0, values="random")
    groups = {}
    for s in param_table(cfg):
        groups[s.group] = groups.get(s.group, 0) + s.nbytes
    # warm up Orbax / tensorstore (thread pools, imports) on a small conversion first
    small = write_native(Config.tiny(), os.path.join(out, "small"), values="random")
    convert(small, os.path.join(out, "small-orbax"), progress=False)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, stop = [base], [False]
    def watch():
        while not stop[0]:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)
    th = threading.Thread(target=watch, daemon=True)
    th.start()
    convert(native, os.path.join(out, "orbax"), progress=False)
    stop[0] = True
    th.join()
    items = plan_items(cfg)
    print(json.dumps({"growth": peak[0] - base, "largest_layer": max(groups.values()), "total": sum(groups.values()),
                      "largest_item": max(sum(s.nbytes for s in sp) for _, sp in items), "n_groups": len(groups)}))
    """
)


def test_convert_peak_memory_is_one_layer_not_the_model(tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    mb = {k: round(v / 2**20) for k, v in m.items()}
    assert m["n_groups"] == 8 and m["total"] > 6 * m["largest_layer"], mb  # a multi-layer model
    # bound: the item being written + Orbax's encoded copy of it + 64 MiB of slack; the whole model would not fit
    assert m["growth"] <= 2 * m["largest_item"] + (64 << 20), mb
    assert m["growth"] < m["total"] / 2, mb
    assert m["growth"] <= m["largest_layer"] + (1 << 30), mb  # the bound
