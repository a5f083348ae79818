"""Running on several devices and hosts: the mesh and joining processes.

* `make_mesh(expert=None, data=1, tensor=1)`: a ("data", "expert", "tensor") mesh over every process's devices.
* `distributed.initialize()`: `jax.distributed` from arguments or `DSV4_JAX_*` variables (no-op for one process).

The sharding rules live in `dsv4_jax.sharding` (`ShardingRules.expert_parallel()`, `.expert_tensor_parallel()`).
"""

from dsv4_jax.parallel.distributed import initialize
from dsv4_jax.parallel.mesh import describe_mesh, make_mesh, mesh_shape, parse_mesh

__all__ = ["describe_mesh", "initialize", "make_mesh", "mesh_shape", "parse_mesh"]
