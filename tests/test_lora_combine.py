"""lora_combine (methods/lora_combine.py): PEFT add_weighted_adapter's combination types as pure
functions of one module's factors. Under mode: peft_compat every type gives PEFT 0.21.2's own
tensors (the random types seeded alike); the exact default combines the ΔW_i (METHODS.md,
lora_combine, "Tests that can fail" (1)-(4))."""

from __future__ import annotations

import hashlib

import pytest
import torch

from mergesmith.methods import get_method
from mergesmith.methods.lora_combine import COMBINATION_TYPES, PRUNING, lora_combine
from mergesmith.methods.registry import TensorContext
from mergesmith.toy import tiny_config

peft = pytest.importorskip("peft")

SEED = 3


def context_seed(name: str, seed: int = SEED) -> int:
    """The integer ctx.generator() seeds torch's generator with (registry.seeded_generator)."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def extra(kind: str) -> dict:
    return {"density": 0.6} if any(p in kind for p in PRUNING) else {}


@pytest.fixture(scope="module")
def peft_model():
    """A one-layer Llama (or GPT-2) with three random adapters on two modules: alphas differ,
    the second uses rsLoRA."""
    import transformers as tf

    def build(arch: str):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(tiny_config(arch, layers=1))
        targets = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn", "c_fc"]
        configs = [peft.LoraConfig(r=4, lora_alpha=alpha, target_modules=targets,
                                   init_lora_weights=False, use_rslora=rslora,
                                   fan_in_fan_out=arch == "gpt2")
                   for alpha, rslora in ((8, False), (3, True), (5, False))]
        wrapped = peft.get_peft_model(model, configs[0], adapter_name="a0")
        for i, config in enumerate(configs[1:], 1):
            wrapped.add_adapter(f"a{i}", config)
        return wrapped

    return build


def layers(wrapped):
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in wrapped.base_model.model.named_modules()
            if isinstance(module, LoraLayer)}


def seeded_like_mergesmith(monkeypatch, wrapped):
    """PEFT draws its DARE masks from torch's global generator, which its new adapter's own
    initialisation also draws from: reseed it, per module, as ctx.generator() seeds ours, just
    before that module's merge."""
    from peft.tuners.lora.model import LoraModel

    names = {id(module): f"{name}.weight" for name, module in layers(wrapped).items()}
    for method in ("_svd_generalized_task_arithmetic_weighted_adapter",
                   "_generalized_task_arithmetic_weighted_adapter"):
        original = getattr(LoraModel, method)

        def seeded(self, combination_type, adapters, weights, *args, _original=original, **kw):
            target = args[1] if "svd" in _original.__name__ else args[0]
            torch.manual_seed(context_seed(names[id(target)]))
            return _original(self, combination_type, adapters, weights, *args, **kw)

        monkeypatch.setattr(LoraModel, method, seeded)


@pytest.mark.parametrize("arch,kind", [("llama", k) for k in COMBINATION_TYPES]
                         + [("gpt2", k) for k in ("svd", "cat", "linear", "dare_ties_svd")])
def test_peft_compat_gives_peft_add_weighted_adapter_tensors(peft_model, monkeypatch, arch, kind):
    wrapped = peft_model(arch)
    names, weights = ["a0", "a1", "a2"], [0.7, -1.2, 0.4]
    seeded_like_mergesmith(monkeypatch, wrapped)
    wrapped.add_weighted_adapter(names, weights, "merged", combination_type=kind, **extra(kind))
    for name, layer in layers(wrapped).items():
        Bs = [layer.lora_B[n].weight.detach() for n in names]
        As = [layer.lora_A[n].weight.detach() for n in names]
        B, A, info = lora_combine(Bs, As, [layer.scaling[n] for n in names], weights=weights,
                                  ctx=TensorContext(f"{name}.weight", seed=SEED),
                                  combination_type=kind, mode="peft_compat",
                                  transposed=layer.fan_in_fan_out, **extra(kind))
        want_B, want_A = layer.lora_B["merged"].weight, layer.lora_A["merged"].weight
        # an SVD's last vectors move with the last bits of its input (the sum's rounding
        # order, the transposes' memory layout): 1e-4 of the largest entry, and their product
        # to 1e-5 of its largest; a different mask or cross term would move them by O(1)
        svd = kind.endswith("svd")
        pairs = [(B, want_B.detach()), (A, want_A.detach())]
        if svd:
            pairs.append((B @ A, (want_B @ want_A).detach()))
        for i, (got, want) in enumerate(pairs):
            atol = (1e-5 if i == 2 else 1e-4) * float(want.abs().max()) if svd else 1e-6
            torch.testing.assert_close(got, want, rtol=1e-5, atol=atol,
                                       msg=lambda m: f"{name}: {m}")
        assert ("energy" in info) == kind.endswith("svd")


def factors(ranks=(2, 3), d_out=12, d_in=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d_out, r, generator=gen) for r in ranks]
    As = [torch.randn(r, d_in, generator=gen) for r in ranks]
    return Bs, As


CTX = TensorContext("m.weight")


@pytest.mark.parametrize("mode", ["exact", "peft_compat"])
def test_cat_is_the_weighted_sum_of_the_deltas_negative_weights_included(mode):
    Bs, As = factors((2, 3))
    scalings, weights = [0.5, 2.0], [1.5, -0.75]
    B, A, _ = lora_combine(Bs, As, scalings, weights=weights, ctx=CTX, combination_type="cat",
                           mode=mode)
    expected = sum(w * s * b @ a for w, s, b, a in zip(weights, scalings, Bs, As))
    assert B.shape == (12, 5) and A.shape == (5, 10)
    torch.testing.assert_close(B @ A, expected, rtol=1e-5, atol=1e-5)


def test_compat_linear_has_cross_terms_where_exact_is_the_difference():
    Bs, As = factors((3, 3))
    scalings, weights = [0.5, 2.0], [1.0, -1.0]
    difference = scalings[0] * Bs[0] @ As[0] - scalings[1] * Bs[1] @ As[1]
    compat = lora_combine(Bs, As, scalings, weights=weights, ctx=CTX, combination_type="linear",
                          mode="peft_compat")
    B, A, _ = lora_combine(Bs, As, scalings, weights=weights, ctx=CTX, combination_type="linear")
    assert (compat[0] @ compat[1] - difference).abs().max() > 1.0
    torch.testing.assert_close(B @ A, difference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["exact", "peft_compat"])
def test_svd_with_room_for_every_rank_is_exact_and_keeps_the_top_singular_values(mode):
    Bs, As = factors((2, 3))
    scalings, weights = [0.5, 2.0], [1.0, 0.3]
    delta = sum(w * s * b @ a for w, s, b, a in zip(weights, scalings, Bs, As))
    B, A, info = lora_combine(Bs, As, scalings, weights=weights, ctx=CTX, svd_rank=6, mode=mode)
    torch.testing.assert_close(B @ A, delta, rtol=1e-5, atol=1e-5)
    assert info["energy"] == pytest.approx(1.0, abs=1e-9)
    # at rank 3: the top three singular values, and the energy they hold
    B, A, info = lora_combine(Bs, As, scalings, weights=weights, ctx=CTX, svd_rank=3, mode=mode)
    S = torch.linalg.svdvals(delta.double())
    torch.testing.assert_close(torch.linalg.svdvals(B.double() @ A.double())[:3], S[:3],
                               rtol=1e-5, atol=1e-5)
    assert info["energy"] == pytest.approx(float((S[:3] ** 2).sum() / (S ** 2).sum()), rel=1e-5)


@pytest.mark.parametrize("mode", ["exact", "peft_compat"])
def test_one_adapter_with_weight_minus_one_is_its_negation(mode):
    Bs, As = factors((3,))
    B, A, _ = lora_combine(Bs, As, [1.7], weights=[-1.0], ctx=CTX, mode=mode)
    torch.testing.assert_close(B @ A, -1.7 * Bs[0] @ As[0], rtol=1e-5, atol=1e-5)
    if mode == "peft_compat":  # PEFT forces linear: the sign goes on A alone
        torch.testing.assert_close(B, 1.7 ** 0.5 * Bs[0])


def test_exact_pruning_types_prune_the_deltas_not_the_factors():
    """magnitude_prune at rank d keeps the ⌊d·n⌋ largest entries of each ΔW_i, then sums."""
    Bs, As = factors((3, 3), d_out=6, d_in=5)
    scalings, weights = [1.0, 0.5], [1.0, 2.0]
    deltas = [s * b @ a for s, b, a in zip(scalings, Bs, As)]
    kept = []
    for d in deltas:
        threshold = d.abs().flatten().kthvalue(d.numel() - int(0.4 * d.numel()) + 1).values
        kept.append(torch.where(d.abs() >= threshold, d, 0))
    expected = weights[0] * kept[0] + weights[1] * kept[1]
    for kind in ("magnitude_prune", "magnitude_prune_svd"):
        B, A, info = lora_combine(Bs, As, scalings, weights=weights, ctx=CTX, svd_rank=5,
                                  combination_type=kind, density=0.4)
        torch.testing.assert_close(B @ A, expected, rtol=1e-5, atol=1e-5)
        assert info["energy"] == pytest.approx(1.0)


def test_dare_draws_depend_on_the_seed_and_module_only():
    Bs, As = factors((3, 3))
    run = lambda ctx: lora_combine(Bs, As, [1.0, 1.0], weights=[1.0, 1.0], ctx=ctx,  # noqa: E731
                                   combination_type="dare_linear_svd", density=0.5)
    first, again = run(TensorContext("m.weight", seed=1)), run(TensorContext("m.weight", seed=1))
    other = run(TensorContext("m.weight", seed=2))
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])


def test_registered_as_an_adapter_method_that_needs_density_to_prune():
    spec = get_method("lora_combine")
    assert spec.output == "adapter" and not spec.needs_base
    with pytest.raises(ValueError, match="density"):
        spec.validate({"combination_type": "ties", "density": None})
    params = {"combination_type": "linear", "mode": "peft_compat"}
    assert spec.equal_ranks_when(params)
    assert not spec.equal_ranks_when({**params, "mode": "exact"})
    assert not spec.equal_ranks_when({**params, "combination_type": "ties_svd"})


def test_randomized_svd_solver_is_nearly_as_good_as_the_exact_truncation():
    """Labelled approximate: its residual ‖ΔW − BA‖_F within 2% of the exact top-r residual
    (Eckart–Young's optimum), and the energy it reports is that of its own factors."""
    Bs, As = factors((8, 8), d_out=96, d_in=80, seed=4)
    kw = dict(weights=[1.0, 0.5], ctx=CTX, combination_type="ties_svd", density=0.3, svd_rank=6)
    exact = lora_combine(Bs, As, [1.0, 1.0], **kw)
    fast = lora_combine(Bs, As, [1.0, 1.0], svd_solver="randomized", **kw)
    delta = lora_combine(Bs, As, [1.0, 1.0], **{**kw, "svd_rank": 80})  # the whole pruned ΔW
    delta = delta[0] @ delta[1]
    residual = [torch.linalg.norm(delta - B @ A) for B, A, _ in (exact, fast)]
    assert residual[0] <= residual[1] * (1 + 1e-6) and residual[1] <= 1.02 * residual[0]
    total = float(delta.double().square().sum())
    kept = float((fast[0] @ fast[1]).double().square().sum())
    assert fast[2]["energy"] == pytest.approx(kept / total, rel=1e-4)


def test_adapters_that_cancel_give_a_zero_adapter_of_rank_one():
    Bs, As = factors((3,))
    B, A, info = lora_combine(Bs * 2, As * 2, [1.0, 1.0], weights=[1.0, -1.0], ctx=CTX)
    assert B.shape == (12, 1) and A.shape == (1, 10) and not (B @ A).any()
