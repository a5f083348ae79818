"""Running on several devices and hosts: the mesh, joining processes, and the memory plan.

* `make_mesh(expert=None, data=1, tensor=1)`: a ("data", "expert", "tensor") mesh over every process's devices.
* `distributed.initialize()`: `jax.distributed` from arguments or `DSV4_JAX_*` variables (no-op for one process).
* `memory_plan(cfg, {"expert": 2}, rules, batch, context) -> Plan`: weights / cache / workspace per device against
  the device's memory, and the longest context and largest batch that fit.

The sharding rules live in `dsv4_jax.sharding` (`ShardingRules.expert_parallel()`, `.expert_tensor_parallel()`).
"""

from dsv4_jax.parallel.distributed import initialize
from dsv4_jax.parallel.mesh import describe_mesh, make_mesh, mesh_shape, parse_mesh
from dsv4_jax.parallel.plan import Plan, memory_plan

__all__ = ["Plan", "describe_mesh", "initialize", "make_mesh", "memory_plan", "mesh_shape", "parse_mesh"]
