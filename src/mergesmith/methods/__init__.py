"""Merge methods: pure functions of fp32 tensors, all in one registry.

    from mergesmith.methods import task_arithmetic
    merged = task_arithmetic(base, [expert_a, expert_b], weights=[1.0, -0.5])
"""

from mergesmith.methods.registry import (
    MethodSpec,
    Operation,
    Param,
    TensorContext,
    all_methods,
    all_operations,
    get_method,
    register,
    register_operation,
)
from mergesmith.methods.linear import linear, task_arithmetic
from mergesmith.methods.passthrough import layer_swap, passthrough
from mergesmith.methods.spherical import karcher, multislerp, nuslerp, slerp
from mergesmith.methods.stock import model_stock
from mergesmith.methods.fusion import arcee_fusion, nearswap
from mergesmith.methods.sce_merging import sce
from mergesmith.methods.ram_merging import ram, ramplus_tl
from mergesmith.methods.subspace import iso_c, iso_cts, tsv_m
from mergesmith.methods.doge import doge_ta
from mergesmith.methods.competition import pcb, widen
from mergesmith.methods.magnitude_trim import breadcrumbs, breadcrumbs_ties, ties
from mergesmith.methods.random_drop import dare_linear, dare_ties, della, della_linear
from mergesmith.methods.consensus import consensus_ta, consensus_ties, magmax
from mergesmith.methods.emr import emr
from mergesmith.methods.twin import twin
from mergesmith.methods.curvature import ffg, fisher, ota, regmean, stitch
from mergesmith.methods import adaptive, adaptive_masks  # noqa: F401,E402  (learned merges)
from mergesmith.methods import frank_wolfe  # noqa: F401,E402  (FW-Merging, learned)
from mergesmith.methods import lora_combine  # noqa: F401,E402  (adapters into an adapter)
from mergesmith.methods import lora_modular, rmm  # noqa: F401,E402  (modular LoRA merges)
from mergesmith.methods import moe_compress  # noqa: F401,E402  (MC-SMoE, HC-SMoE, Sub-MoE, by mergesmith moe-compress)
from mergesmith.methods import moe_assemble  # noqa: F401,E402  (dense experts into an MoE, by mergesmith moe)
from mergesmith.methods import moe_router  # noqa: F401,E402  (router rows; FlexOlmo, by mergesmith flexolmo)
from mergesmith.methods import permutation  # noqa: F401,E402  (weight matching, by mergesmith align)
from mergesmith.methods import pleas  # noqa: F401,E402  (PLeaS, by mergesmith align --method pleas)
from mergesmith.methods import continual  # noqa: F401,E402  (OPCM and sequential rules, by merge [--onto])
from mergesmith.methods import dam, dam_backdoor, somf  # noqa: F401,E402  (learned safety merges)
from mergesmith.methods import graft  # noqa: F401,E402  (GraftLLM delta packs, by mergesmith pack)
from mergesmith.methods import llm_merges, rcp_merging  # noqa: F401,E402  (VaRM, AIM, OptMerge; RCP-Merging, learned)
from mergesmith.methods import mergelock  # noqa: F401,E402  (MergeLock, by mergesmith lock / unlock)
from mergesmith.methods import negation  # noqa: F401,E402  (task negation, by mergesmith negate)

__all__ = [
    "MethodSpec", "Operation", "Param", "TensorContext", "all_methods", "all_operations", "get_method",
    "register", "register_operation",
    "linear", "task_arithmetic", "slerp", "multislerp", "karcher", "passthrough", "layer_swap",
]
