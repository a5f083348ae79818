"""The mesh over several processes' devices, the `--mesh` syntax, the distributed settings and the rules presets.
In-process, no compiles: devices of several processes are stand-ins with the attributes the mesh code reads."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from dsv4_jax.config import Config
from dsv4_jax.model import abstract
from dsv4_jax.parallel import distributed
from dsv4_jax.parallel.mesh import make_mesh, mesh_shape, parse_mesh
from dsv4_jax.sharding import AXES, TENSOR_PARALLEL_AXES, ShardingRules, logical_to_spec, param_shardings, rules_preset
from dsv4_jax.sharding import make_mesh as sharding_make_mesh


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    platform: str = "gpu"
    device_kind: str = "NVIDIA H200"


def _hosts(n_proc: int, per_proc: int) -> list[FakeDevice]:
    # jax.devices() lists devices by id; give each host ids in its own block, interleaved in the list to show the mesh
    # does not depend on the list order.
    devs = [FakeDevice(1000 * p + i, p) for p in range(n_proc) for i in range(per_proc)]
    return devs[::2] + devs[1::2]


def test_single_process_mesh_shapes_and_errors():
    mesh = make_mesh()  # one CPU device here: expert=1
    assert mesh.axis_names == AXES and dict(mesh.shape) == {"data": 1, "expert": 1, "tensor": 1}
    assert sharding_make_mesh().devices.tolist() == mesh.devices.tolist()  # the old entry point delegates
    eight = [FakeDevice(i, 0) for i in range(8)]
    m = make_mesh(expert=None, data=2, devices=eight)
    assert dict(m.shape) == {"data": 2, "expert": 4, "tensor": 1}
    assert [d.id for d in m.devices.flat] == list(range(8))
    with pytest.raises(ValueError, match=r"data=1 x expert=3 x tensor=1 = 3 devices, but there are 8"):
        make_mesh(expert=3, devices=eight)
    with pytest.raises(ValueError, match="8 devices do not divide into data=3"):
        make_mesh(data=3, devices=eight)
    with pytest.raises(ValueError, match="tensor=0 must be a positive integer"):
        make_mesh(tensor=0, devices=eight)
    with pytest.raises(ValueError, match="expert=2.5"):
        make_mesh(expert=2.5, devices=eight)


def test_processes_take_the_outer_axes_and_hold_contiguous_blocks():
    # 2 hosts x 4 devices, expert=8: each host holds one contiguous half of the expert axis.
    m = make_mesh(expert=8, devices=_hosts(2, 4))
    procs = np.vectorize(lambda d: d.process_index)(m.devices)
    assert procs.reshape(-1).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [d.id for d in m.devices.flat] == [0, 1, 2, 3, 1000, 1001, 1002, 1003]
    # data=2 x expert=4 over 2 hosts: the hosts split the data axis (no traffic), each holds a whole expert group.
    m = make_mesh(expert=4, data=2, devices=_hosts(2, 4))
    assert np.vectorize(lambda d: d.process_index)(m.devices)[:, :, 0].tolist() == [[0] * 4, [1] * 4]
    # 4 hosts x 2 devices, data=2 x expert=2 x tensor=2: hosts split data then expert; tensor stays inside a host.
    m = make_mesh(expert=2, data=2, tensor=2, devices=_hosts(4, 2))
    procs = np.vectorize(lambda d: d.process_index)(m.devices)
    assert (procs[:, :, 0] == procs[:, :, 1]).all() and len(np.unique(procs)) == 4
    # 4 hosts x 2 devices, expert=8: every host a contiguous pair of the expert axis.
    m = make_mesh(expert=8, devices=_hosts(4, 2))
    assert np.vectorize(lambda d: d.process_index)(m.devices).reshape(-1).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    uneven = _hosts(2, 4)[:-1] + [FakeDevice(2000, 2)]
    with pytest.raises(ValueError, match="different numbers of devices"):
        make_mesh(expert=8, devices=uneven)


def test_parse_mesh_and_mesh_shape():
    assert parse_mesh("expert=2") == {"expert": 2}
    assert parse_mesh(" expert=4, tensor=2 ,data=1") == {"expert": 4, "tensor": 2, "data": 1}
    bad_specs = [
        ("expert", "expected AXIS=N"),
        ("gpu=2", "expected AXIS=N"),
        ("expert=two", "positive integer"),
        ("expert=0", "positive integer"),
        ("expert=2,expert=4", "given twice"),
        ("", "e.g. expert=2"),
    ]
    for bad, msg in bad_specs:
        with pytest.raises(ValueError, match=msg):
            parse_mesh(bad)
    assert mesh_shape({"expert": 2}) == {"data": 1, "expert": 2, "tensor": 1}
    assert mesh_shape(AbstractMesh((2, 4, 1), AXES)) == {"data": 2, "expert": 4, "tensor": 1}
    with pytest.raises(ValueError, match="unknown mesh axes"):
        mesh_shape({"experts": 2})


def test_distributed_settings(monkeypatch):
    for k in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(k, raising=False)
    assert distributed.settings() == (None, 1, 0)
    assert distributed.initialize() is False  # one process: nothing to start
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "10.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "1")
    assert distributed.settings() == ("10.0.0.1:1234", 2, 1)
    assert distributed.settings(process_id=0) == ("10.0.0.1:1234", 2, 0)  # arguments win
    with pytest.raises(ValueError, match=r"process_id=2 must be in 0\.\.1"):
        distributed.settings(process_id=2)
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "one")
    with pytest.raises(ValueError, match="DSV4_JAX_PROCESS_ID='one' must be an integer"):
        distributed.settings()
    monkeypatch.delenv(distributed.ENV_COORDINATOR)
    with pytest.raises(ValueError, match="need a coordinator"):
        distributed.settings(process_id=0)


def test_rule_presets():
    ep, eptp = ShardingRules.expert_parallel(), ShardingRules.expert_tensor_parallel()
    assert rules_preset("ep") == ep and rules_preset("ep-tp") == eptp and rules_preset("default") == ShardingRules()
    with pytest.raises(ValueError, match="unknown sharding rules preset 'tp'"):
        rules_preset("tp")
    experts = ("expert", "expert_ffn", "embed")
    for r in (ep, eptp):
        assert logical_to_spec(experts, r) == PartitionSpec("expert", None, None)
    assert logical_to_spec(("vocab", "embed"), ep) == PartitionSpec(None, None)
    assert logical_to_spec(("q_heads", "q_lora"), ep) == PartitionSpec(None, None)
    # ep-tp: the tensor-parallel dims on the same mesh axis as the experts (one 2-device axis serves both) ...
    assert logical_to_spec(("vocab", "embed"), eptp) == PartitionSpec("expert", None)
    assert logical_to_spec(("embed", "o_groups"), eptp) == PartitionSpec(None, "expert")
    assert all(eptp.mesh_axes(a) == ("expert",) for a in TENSOR_PARALLEL_AXES)
    assert ShardingRules.expert_tensor_parallel(tensor="tensor").q_heads == "tensor"
    # ... which is no collision for any parameter of the full-size models: none has an expert and a head dim.
    # Every split dim divides into whole blocks on 8 devices: nothing falls back to replication.
    for cfg in (Config.flash(), Config.pro()):
        report: list[str] = []
        sh = param_shardings(abstract(cfg), AbstractMesh((1, 8, 1), AXES), eptp, report=report)
        assert not report, report[:3]
        for path, v in nnx.to_flat_state(sh):
            split = "expert" in tuple(v.spec)
            owner = path[-2] if path[-1] in ("weight", "scale") else path[-1]
            if "experts" in path or owner in ("wq_b", "wo_a", "wo_b", "attn_sink", "embed", "head", "weights_proj"):
                assert split, (path, v.spec)
            elif "shared_experts" in path or owner in ("wq_a", "wkv", "ape", "wgate", "kv_norm"):
                assert not split, (path, v.spec)
