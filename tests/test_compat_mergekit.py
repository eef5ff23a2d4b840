"""`compat: mergekit` (`--compat mergekit`, `mergesmith.merge(..., compat="mergekit")`): mergekit
0.1.5's output, bit for bit, for the methods both tools have.

Each case merges one recipe file with mergekit (in process, as `mergekit-yaml` does: helpers
from test_parity.py) and with mergesmith under compat, on tiny Llamas stored in bf16 and in
fp32 (and fp16 recipes on fp16 and fp32 Llamas), and asserts the outputs are bitwise equal. mergekit computes in the recipe's `dtype`
(bf16 arithmetic for bf16 recipes), elects + where a sign vote is exactly even, rescales DARE
and DELLA by the L1 norm, keeps exactly ⌊d·n⌋ entries chosen by a sort, floors Model Stock's
norms and SCE's weights: the cases below are chosen so that each of these shows (without compat
the same recipes give other bytes: `test_the_cases_differ_without_compat`).

Not reproduced, and why (README, "Same bytes as mergekit"):
* DARE's and DELLA's random draws at density < 1: mergekit draws them with torch.bernoulli
  from torch's global generator, unseeded unless --random-seed, shared by all tensors in the
  order its task graph runs them; mergesmith draws each tensor's from its own counter-based
  stream. Tested here: the compat merge's statistics (keep rate, L1 norm kept).
* arcee_fusion on tensors over 10^6 entries: mergekit estimates the quartiles from a random
  sample (torch.randint, same generator); below that the masks are mergekit's. mergekit writes
  arcee_fusion's and ramplus_tl's output in fp32 whatever the recipe's dtype; mergesmith writes
  the recipe's dtype: mergekit's values rounded once.
* not switched yet: slerp with fp32 recipes (see ONLY and the README); with fp16 recipes it is
  within one fp16 rounding of mergekit's (1 ulp on 7-12 of 43k entries), not bitwise. Under compat, karcher
  ignores the weights, as mergekit does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_model, read_tensors, run_cli, write_recipe
from test_parity import compare, merge_both, run_mergekit
from safetensors.torch import load_file, save_file

import mergesmith
from mergesmith.errors import MergesmithError
from mergesmith.methods import get_method

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@pytest.fixture(scope="module")
def zoo16(zoo, tmp_path_factory):
    """{dtype: {"base", "e1", "e2", "e3"}}: the conftest Llamas, and the same stored in bf16."""
    fp32 = {k: str(v) for k, v in zoo("llama").items()}
    root = tmp_path_factory.mktemp("bf16")
    base = build_model(root / "base", "llama", seed=0, dtype=torch.bfloat16)
    bf16 = {"base": str(base)}
    for key, seed in (("e1", 1), ("e2", 2), ("e3", 3)):
        bf16[key] = str(build_model(root / key, "llama", seed=seed, base=base,
                                    dtype=torch.bfloat16))
    fp32["e3"] = str(build_model(root / "e3-fp32", "llama", seed=3, base=Path(fp32["base"])))
    return {"bfloat16": bf16, "float32": fp32}


def recipe(method: str, models: dict, dtype: str, experts=("e1", "e2"), weights=(0.6, 0.4),
           base=True, per_model: dict | None = None, **params) -> dict:
    entries = []
    for i, key in enumerate(experts):
        own = {"weight": weights[i]} if weights else {}
        own.update(per_model or {})
        entries.append({"model": models[key], **({"parameters": own} if own else {})})
    out = {"merge_method": method, "models": entries, "dtype": dtype}
    if base:
        out["base_model"] = models["base"]
    if params:
        out["parameters"] = params
    return out


# name: (method, experts, recipe options). Weights 0.6/0.4 unless given.
CASES = {
    "task_arithmetic": ("task_arithmetic", ("e1", "e2"), {"weights": (1.0, -0.6), "lambda": 0.8}),
    "task_arithmetic-normalize": ("task_arithmetic", ("e1", "e2", "e3"),
                                  {"weights": (1.0, 0.3, 0.6), "normalize": True}),
    "ties": ("ties", ("e1", "e2"), {"per_model": {"density": 0.5}}),
    "ties-3": ("ties", ("e1", "e2", "e3"), {"weights": (0.5, 0.3, 0.2),
                                            "per_model": {"density": 0.3}, "lambda": 0.9}),
    "ties-rescale": ("ties", ("e1", "e2"), {"per_model": {"density": 0.5}, "rescale": True}),
    "ties-density-1": ("ties", ("e1", "e2"), {"per_model": {"density": 1.0}}),
    "dare_ties-density-1": ("dare_ties", ("e1", "e2"), {"per_model": {"density": 1.0}}),
    "dare_linear-density-1": ("dare_linear", ("e1", "e2", "e3"),
                              {"weights": (0.5, 0.3, 0.2), "per_model": {"density": 1.0}}),
    "della-density-1": ("della", ("e1", "e2"), {"per_model": {"density": 1.0}}),
    "della_linear-density-1": ("della_linear", ("e1", "e2"), {"per_model": {"density": 1.0}}),
    "breadcrumbs": ("breadcrumbs", ("e1", "e2"), {"per_model": {"density": 0.5, "gamma": 0.05}}),
    # d·n < 1 on the norms (32 entries): mergekit keeps none of them, mergesmith at least one
    "breadcrumbs-small": ("breadcrumbs", ("e1", "e2"),
                          {"per_model": {"density": 0.02, "gamma": 0.01}}),
    "breadcrumbs_ties": ("breadcrumbs_ties", ("e1", "e2"),
                         {"per_model": {"density": 0.6, "gamma": 0.1}}),
    "model_stock": ("model_stock", ("e1", "e2", "e3"), {"weights": ()}),
    "model_stock-filter_wise": ("model_stock", ("e1", "e2"), {"weights": (), "filter_wise": True}),
    "sce": ("sce", ("e1", "e2", "e3"), {"weights": ()}),
    "sce-select": ("sce", ("e1", "e2", "e3"), {"weights": (), "select_topk": 0.5}),
    "arcee_fusion": ("arcee_fusion", ("e1",), {"weights": ()}),
    "nearswap": ("nearswap", ("e1",), {"weights": (), "t": 0.01}),
    "linear": ("linear", ("e1", "e2"), {"base": False}),
    "karcher": ("karcher", ("e1", "e2"), {"weights": (), "base": False}),
    "nuslerp": ("nuslerp", ("e1", "e2"), {"weights": (0.3, 0.7), "base": False}),
    "nuslerp-base": ("nuslerp", ("e1", "e2"), {"weights": (0.3, 0.7)}),
    "multislerp": ("multislerp", ("e1", "e2"), {"weights": (0.3, 0.7), "base": False}),
    "multislerp-base": ("multislerp", ("e1", "e2", "e3"), {"weights": (0.5, 0.3, 0.2)}),
    "nuslerp-rows": ("nuslerp", ("e1", "e2"), {"weights": (0.3, 0.7), "nuslerp_flatten": False,
                                               "nuslerp_row_wise": True}),
    "slerp": ("slerp", ("base", "e1"), {"weights": (), "t": 0.4}),
    "ram": ("ram", ("e1", "e2"), {"weights": (), "epsilon": 0.01}),
    "ramplus_tl": ("ramplus_tl", ("e1", "e2", "e3"), {"weights": (), "epsilon": 0.01}),
}
# SLERP has no compat switch yet: bitwise in bf16, within 1 ulp in fp32 (mergekit takes its
# norms chunk by chunk over a batch of tensors); README.
ONLY = {"slerp": "bfloat16"}


def case_recipe(case: str, models: dict, dtype: str) -> dict:
    method, experts, options = CASES[case]
    options = dict(options)
    weights = options.pop("weights", (0.6, 0.4, 0.2))
    base = options.pop("base", True)
    per_model = options.pop("per_model", None)
    return recipe(method, models, dtype, experts, weights, base, per_model, **options)


def compare_bitwise(theirs: Path, ours: Path, dtype: torch.dtype) -> None:
    """Bitwise equal, same names; where mergekit wrote fp32 for a 16-bit recipe (arcee_fusion),
    mergesmith's tensor is mergekit's rounded once to the recipe's dtype."""
    a, b = read_tensors(theirs), read_tensors(ours)
    assert sorted(a) == sorted(b)
    for name in a:
        assert b[name].dtype == dtype, name
        want = a[name].to(dtype)
        assert torch.equal(b[name], want), (
            f"{name}: {int((b[name] != want).sum())}/{want.numel()} entries differ")


@pytest.mark.parametrize("case, dtype", [(c, d) for c in CASES for d in DTYPES
                                         if ONLY.get(c, d) == d])
def test_same_bytes_as_mergekit(tmp_path, zoo16, case, dtype):
    models = zoo16[dtype]
    theirs, ours = merge_both(tmp_path, case_recipe(case, models, dtype), compat="mergekit")
    compare_bitwise(theirs, ours, DTYPES[dtype])


# the cases that differ without compat: each switch of compat is needed by one of them
DIFFER = {"bfloat16": ["task_arithmetic", "ties", "dare_ties-density-1", "breadcrumbs",
                       "model_stock", "sce", "arcee_fusion", "nearswap", "ram",
                       "ramplus_tl", "nuslerp-base", "multislerp", "karcher"],
          "float32": ["task_arithmetic", "ties-rescale", "breadcrumbs-small", "model_stock",
                      "sce-select", "nuslerp", "multislerp"]}


@pytest.mark.parametrize("dtype, case", [(d, c) for d, cases in DIFFER.items() for c in cases])
def test_the_cases_differ_without_compat(tmp_path, zoo16, case, dtype):
    """Guards the test above against vacuity: the papers' definitions (the default) give other
    bytes than mergekit on these recipes."""
    models = zoo16[dtype]
    theirs, ours = merge_both(tmp_path, case_recipe(case, models, dtype))
    with pytest.raises(AssertionError, match="differ"):
        compare_bitwise(theirs, ours, DTYPES[dtype])


# --------------------------------------------------------------------------------------------
# exact sign ties: τ2 = −τ1 on part of every tensor, all values exact in bf16 and fp32


@pytest.fixture(scope="module")
def tied(zoo, tmp_path_factory):
    """base, e1 = base + δ, e2 = base − δ on the even entries (base + δ' elsewhere), with values
    on a coarse binary grid, so that τ1 + τ2 = 0 exactly on half the entries, in any dtype."""
    source = Path(zoo("llama")["base"])
    root = tmp_path_factory.mktemp("tied")
    gen = torch.Generator().manual_seed(5)
    folders = {key: root / key for key in ("base", "e1", "e2")}
    tensors = {key: {} for key in folders}
    for name, t in load_file(source / "model.safetensors").items():
        base = torch.round(t.float() * 64) / 64
        delta = torch.randint(-4, 5, t.shape, generator=gen).float() / 256
        other = torch.randint(-4, 5, t.shape, generator=gen).float() / 256
        even = (torch.arange(t.numel()) % 2 == 0).view(t.shape)
        tensors["base"][name] = base
        tensors["e1"][name] = base + delta
        tensors["e2"][name] = torch.where(even, base - delta, base + other)
    for key, folder in folders.items():
        folder.mkdir()
        for f in source.iterdir():
            if f.suffix != ".safetensors":
                (folder / f.name).write_bytes(f.read_bytes())
        save_file(tensors[key], folder / "model.safetensors", metadata={"format": "pt"})
    return {key: str(folder) for key, folder in folders.items()}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("method, density", [("ties", 0.5), ("ties", 1.0), ("dare_ties", 1.0),
                                             ("della", 1.0), ("breadcrumbs_ties", 0.8),
                                             ("sce", None)])
def test_exact_sign_ties(tmp_path, tied, method, density, dtype):
    """Equal weights and τ2 = −τ1: the vote is exactly even on half the entries. mergekit elects
    + there (adding the positive τ), the default elects nothing (the base stays); compat gives
    mergekit's bytes."""
    per_model = {"density": density} if density is not None else None
    weights = (0.5, 0.5) if method != "sce" else ()
    r = recipe(method, tied, dtype, weights=weights, per_model=per_model)
    theirs, ours = merge_both(tmp_path, r, compat="mergekit")
    compare_bitwise(theirs, ours, DTYPES[dtype])
    default = Path(mergesmith.merge(tmp_path / "recipe.yaml", tmp_path / "default"))
    with pytest.raises(AssertionError, match="differ"):
        compare_bitwise(theirs, default, DTYPES[dtype])


# --------------------------------------------------------------------------------------------
# random draws: not mergekit's (see the module docstring); what compat keeps of them


def test_dare_compat_rescales_by_the_l1_norm_and_keeps_d(tmp_path, zoo16):
    """Under compat, `rescale: true` is mergekit's L1 rescale for DARE too: each τi's kept part
    is scaled to τi's L1 norm (the default: ÷ d). The draws are mergesmith's own: each entry kept
    with probability d, the same whatever the chunking."""
    models = zoo16["float32"]
    r = recipe("dare_linear", models, "float32", experts=("e1",), weights=(1.0,),
               per_model={"density": 0.3})
    path = write_recipe(tmp_path / "r.yaml", r)
    the_plan = mergesmith.plan(path, compat="mergekit")
    assert all(job.params["rescale"] == "l1" for job in the_plan.jobs)
    assert mergesmith.plan(path).jobs[0].params["rescale"] is True  # 1/d, the paper's
    ours = read_tensors(mergesmith.merge(path, tmp_path / "out", compat="mergekit"))
    base, e1 = read_tensors(models["base"]), read_tensors(models["e1"])
    kept = total = 0
    for name, got in ours.items():
        tau, merged = e1[name] - base[name], got - base[name]
        if tau.numel() < 1000:
            continue
        torch.testing.assert_close(merged.abs().sum(), tau.abs().sum(), rtol=1e-5, atol=0)
        kept += int((merged != 0).sum())
        total += tau.numel()
    assert abs(kept / total - 0.3) < 0.01
    chunked = read_tensors(mergesmith.merge(path, tmp_path / "chunked", compat="mergekit",
                                            chunk_size="1KiB"))
    assert all(torch.equal(ours[k], chunked[k]) for k in ours)


def test_della_compat_at_density_below_one_is_della_with_l1_rescale(tmp_path, zoo16):
    """DELLA's draws are mergesmith's; compat changes its rescale (L1), sign ties and dtype."""
    models = zoo16["bfloat16"]
    r = recipe("della", models, "bfloat16", per_model={"density": 0.5, "epsilon": 0.1})
    path = write_recipe(tmp_path / "r.yaml", r)
    job = next(j for j in mergesmith.plan(path, compat="mergekit").jobs if not j.copy)
    assert (job.params["rescale"], job.params["sign_ties"]) == ("l1", "plus")
    assert job.params["compute_dtype"] == torch.bfloat16
    out = read_tensors(mergesmith.merge(path, tmp_path / "out", compat="mergekit"))
    assert all(torch.isfinite(t).all() and t.dtype == torch.bfloat16 for t in out.values())


# --------------------------------------------------------------------------------------------
# the switch: recipe field, API keyword, CLI option, plan fingerprint and model card


def test_recipe_field_cli_option_and_card(tmp_path, zoo16, monkeypatch, capsys):
    models = zoo16["bfloat16"]
    theirs = run_mergekit(write_recipe(tmp_path / "r.yaml", case_recipe("ties", models,
                                                                         "bfloat16")),
                          tmp_path / "mergekit")
    # the recipe's own compat: mergekit
    r = dict(case_recipe("ties", models, "bfloat16"), compat="mergekit")
    field = Path(mergesmith.merge(write_recipe(tmp_path / "c.yaml", r), tmp_path / "field"))
    compare_bitwise(theirs, field, torch.bfloat16)
    assert "compat: mergekit" in (field / "README.md").read_text()
    # --compat on the command line, for merge and check
    code, _, err = run_cli(monkeypatch, capsys, "merge", tmp_path / "r.yaml", tmp_path / "cli",
                           "--compat", "mergekit", "--quiet")
    assert code == 0, err
    compare_bitwise(theirs, tmp_path / "cli", torch.bfloat16)
    assert "compat: mergekit" in (tmp_path / "cli" / "README.md").read_text()
    code, out, err = run_cli(monkeypatch, capsys, "check", tmp_path / "r.yaml", "--compat",
                             "mergekit")
    assert code == 0 and "ok" in out, err
    code, _, err = run_cli(monkeypatch, capsys, "check", tmp_path / "r.yaml", "--compat", "mk")
    assert code != 0 and "compat" in err and "Traceback" not in err
    # --compat none overrides the recipe's field: the papers' definitions
    none = Path(mergesmith.merge(tmp_path / "c.yaml", tmp_path / "none", compat="none"))
    default = Path(mergesmith.merge(tmp_path / "r.yaml", tmp_path / "default"))
    compare(default, none, max_ulps=0)


def test_compat_is_part_of_the_fingerprint(tmp_path, zoo16):
    """A merge interrupted under one compat is not resumed under another."""
    from mergesmith.engine.api import fingerprint

    path = write_recipe(tmp_path / "r.yaml", case_recipe("ties", zoo16["float32"], "float32"))
    device = torch.device("cpu")
    prints = {fingerprint(mergesmith.plan(path, compat=c), 1 << 20, device)
              for c in (None, "mergekit")}
    assert len(prints) == 2
    with pytest.raises(MergesmithError, match="compat"):
        mergesmith.plan(path, compat="mergekit-0.1")


def test_methods_with_a_compat_switch():
    """The methods whose default differs from mergekit's arithmetic carry compat options; the
    others compute what mergekit computes already (checked above)."""
    switched = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                "breadcrumbs_ties", "della", "della_linear", "model_stock", "sce",
                "arcee_fusion", "nearswap", "ram", "ramplus_tl", "nuslerp",
                "multislerp", "karcher"}
    assert {name for name in switched if get_method(name).compat is None} == set()


# --------------------------------------------------------------------------------------------
# fp16 recipes (dtype: float16, out_dtype: float16): mergekit computes in fp16


@pytest.fixture(scope="module")
def fp16_models(zoo16, tmp_path_factory):
    """The same Llamas stored in fp16 ("float16"), and the fp32 ones cast on load ("float32")."""
    root = tmp_path_factory.mktemp("fp16")
    base = build_model(root / "base", "llama", seed=0, dtype=torch.float16)
    stored = {"base": str(base)}
    for key, seed in (("e1", 1), ("e2", 2), ("e3", 3)):
        stored[key] = str(build_model(root / key, "llama", seed=seed, base=base, dtype=torch.float16))
    return {"float16": stored, "float32": zoo16["float32"]}


def fp16_recipe(case: str, models: dict) -> dict:
    return dict(case_recipe(case, models, "float16"), out_dtype="float16")


# SLERP has no compat switch (see ONLY): within one fp16 rounding of mergekit's, not bitwise
WITHIN_ONE_ROUNDING = {"slerp"}
CAST_ON_LOAD = ("ties", "model_stock", "slerp")


@pytest.mark.parametrize("stored, case", [("float16", c) for c in CASES]
                         + [("float32", c) for c in CAST_ON_LOAD])
def test_same_fp16_bytes_as_mergekit(tmp_path, fp16_models, stored, case):
    theirs, ours = merge_both(tmp_path, fp16_recipe(case, fp16_models[stored]), compat="mergekit")
    if case in WITHIN_ONE_ROUNDING:
        compare(theirs, ours, max_ulps=1, dtype=torch.float16)
    else:
        compare_bitwise(theirs, ours, torch.float16)


@pytest.mark.parametrize("case", ["task_arithmetic", "ties", "breadcrumbs", "model_stock"])
def test_the_fp16_cases_differ_without_compat(tmp_path, fp16_models, case):
    theirs, ours = merge_both(tmp_path, fp16_recipe(case, fp16_models["float16"]))
    with pytest.raises(AssertionError, match="differ"):
        compare_bitwise(theirs, ours, torch.float16)
