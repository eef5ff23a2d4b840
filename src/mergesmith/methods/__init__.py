"""Merge methods: pure functions of fp32 tensors, all in one registry.

    from mergesmith.methods import task_arithmetic
    merged = task_arithmetic(base, [expert_a, expert_b], weights=[1.0, -0.5])
"""

from mergesmith.methods.registry import (
    MethodSpec,
    Param,
    TensorContext,
    all_methods,
    get_method,
    register,
)
from mergesmith.methods.linear import linear, task_arithmetic
from mergesmith.methods.selection import layer_swap, passthrough
from mergesmith.methods.spherical import karcher, multislerp, slerp

__all__ = [
    "MethodSpec", "Param", "TensorContext", "all_methods", "get_method", "register",
    "linear", "task_arithmetic", "slerp", "multislerp", "karcher", "passthrough", "layer_swap",
]
