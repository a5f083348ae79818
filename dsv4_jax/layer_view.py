"""`LayerSlice`: one layer of a parameter (or cache) stacked over layers, without slicing it out.

Layers of the same kind are stored stacked (`[R, ...]`) and run under `lax.scan` (`dsv4_jax.runner`). Inside the
scan body a layer's weight is `LayerSlice(stack, i)`. XLA ops read it as `stack[i]` (`x[...]`; XLA fuses the dynamic
slice into its consumer), while a custom call can take the whole stack and the index instead: a dynamic slice that
feeds a custom call is materialised, i.e. every decode step would copy every weight (3.4 GB of experts per layer).
"""

from __future__ import annotations

import dataclasses

import jax

__all__ = ["LayerSlice", "materialize", "take", "stack_and_index", "stacks_and_index"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerSlice:
    """`stack[index]` for `stack [R, *shape]`, `index` an int32 scalar (traced)."""

    stack: jax.Array
    index: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stack.shape[1:])

    @property
    def dtype(self):
        return self.stack.dtype

    @property
    def ndim(self) -> int:
        return self.stack.ndim - 1

    def get(self) -> jax.Array:
        return jax.lax.dynamic_index_in_dim(self.stack, self.index, axis=0, keepdims=False)

    def __getitem__(self, key):
        return self.get()[key]


def materialize(x):
    """The array a `LayerSlice` (or a `dsv4_jax.kv_format.PackedKV`) stands for; any other value passes through."""
    from dsv4_jax.kv_format import PackedKV

    return x.get() if isinstance(x, (LayerSlice, PackedKV)) else x


def take(x, *idx):
    """`x[idx]` (advanced indexing) of an array, or of the array a `LayerSlice` stands for, read straight from its
    stack: only the indexed elements are gathered."""
    return x.stack[(x.index, *idx)] if isinstance(x, LayerSlice) else x[idx]


def stack_and_index(x):
    """`(stack [R, ...], index)` of a `LayerSlice`, or `(x[None], 0)` for a plain array (a stack of one)."""
    if isinstance(x, LayerSlice):
        return x.stack, x.index
    return x[None], 0


def stacks_and_index(*values):
    """`(stacks, index)` of values that are all `LayerSlice`s at one index (a kernel that reads several parameters
    of one layer in place), else `(the values materialised, None)`."""
    if all(isinstance(v, LayerSlice) for v in values) and all(v.index is values[0].index for v in values):
        return [v.stack for v in values], values[0].index
    return [materialize(v) for v in values], None
