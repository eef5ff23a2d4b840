"""`mergesmith analyze`: figures exact on hand-made task vectors, a recipe's analysis written
(JSON, plots, report), bad inputs refused, one tensor's inputs in memory at a time."""

from __future__ import annotations

import json
import math
import weakref

import pytest
import torch

from conftest import read_tensors, run_cli, write_recipe
from mergesmith.analyze import analyze
from mergesmith.analyze import run as analyze_run
from mergesmith.analyze.stats import add_sums, figures, spectrum, tensor_sums
from mergesmith.errors import OutputError, PlanError
from mergesmith.methods import get_method
from mergesmith.methods.registry import TensorContext
from mergesmith.toy import build_model

T1 = torch.tensor([1.0, 2, -3, 0, 4, -1])
T2 = torch.tensor([-1.0, 2, 3, 5, 0, -2])


def test_cosine_conflicts_and_masks_of_hand_made_task_vectors():
    sums = tensor_sums([T1, T2], densities=[0.5, 0.5], gammas=[0.2, 0.2])
    f = figures(sums, 2)
    assert f["norms"] == pytest.approx([math.sqrt(31), math.sqrt(43)], abs=1e-12)
    assert f["cosine"][0][1] == pytest.approx(-4 / math.sqrt(31 * 43), abs=1e-12)
    # signs differ at entries 0 and 2; entries 3 and 4 have a zero, which is no conflict
    assert sums["conflicts"] == 2 and f["sign_conflict_rate"] == pytest.approx(2 / 6)
    assert sums["pair_conflicts"] == [[0, 2], [2, 0]]
    # top-3 of |τ1| = {4, 2, 1}; of |τ2| = {3, 2} and both entries tied with the cut 2: {1, 5}
    assert sums["mask_overlap"] == [[3, 2], [2, 4]]
    assert f["jaccard"][0][1] == pytest.approx(2 / 5)


def test_what_ties_and_breadcrumbs_would_drop_by_hand():
    f = figures(tensor_sums([T1, T2], densities=[0.5, 0.5], gammas=[0.2, 0.2]), 2)["dropped"]
    # shares of the 5 non-zero entries of each. trim: τ1 keeps 4, -3, 2 (29 of 31); τ2 keeps
    # 5, 3, 2, -2 (42 of 43)
    assert f["ties_trim"]["entries"] == pytest.approx([2 / 5, 1 / 5])
    assert f["ties_trim"]["energy"] == pytest.approx([2 / 31, 1 / 43])
    # elect: Σ = [0, 4, 0, 5, 4, -2]; entry 2 (−3 against +3) elects no sign: both lose it
    assert f["ties_elect"]["entries"] == pytest.approx([3 / 5, 2 / 5])
    assert f["ties_elect"]["energy"] == pytest.approx([11 / 31, 10 / 43])
    # breadcrumbs, d = 0.5, γ = 0.2 on 6 entries: skip the largest, keep down to the 4th
    # largest (ties kept): τ1 keeps |τ| in [1, 3]: 1, 2, -3, -1 (15 of 31)
    assert f["breadcrumbs"]["entries"][0] == pytest.approx(1 / 5)
    assert f["breadcrumbs"]["energy"][0] == pytest.approx(16 / 31)


def test_dare_drops_are_the_merges_own_draws(one_thread):
    gen = torch.Generator().manual_seed(0)
    taus = [torch.randn(64, 48, generator=gen) for _ in range(2)]
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", 0, 4, seed=7)
    f = figures(tensor_sums(taus, densities=[0.3, 0.6], ctx=ctx), 2)["dropped"]["dare"]
    dare = get_method("dare_linear").fn
    base = torch.zeros(64, 48)
    for i, density in enumerate((0.3, 0.6)):
        densities = [1.0, 1.0]
        densities[i] = density
        kept = dare(base, taus, weights=[1.0 if j == i else 0.0 for j in range(2)],
                    densities=densities, rescale=False, ctx=ctx)
        assert f["entries"][i] == pytest.approx(1 - torch.count_nonzero(kept).item() / kept.numel())
        assert f["energy"][i] == pytest.approx(1 - kept.square().sum().item() / taus[i].square().sum().item(),
                                               rel=1e-5)


def _matrix(sigma: list[float], m: int, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(sigma), generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, len(sigma), generator=gen, dtype=torch.float64)).Q
    return (u * torch.tensor(sigma, dtype=torch.float64)) @ v.T


def test_spectra_and_ranks_of_known_matrices():
    three = spectrum(_matrix([1, 1, 1], 20, 12).float())
    assert three["exact"] and three["sigma"] == pytest.approx([1, 1, 1], abs=1e-5)
    assert three["effective_rank"] == pytest.approx(3, abs=1e-5)
    assert three["stable_rank"] == pytest.approx(3, abs=1e-5)
    two = spectrum(_matrix([2, 1], 16, 10).float())
    p = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    assert two["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), abs=1e-5)
    assert two["stable_rank"] == pytest.approx(5 / 4, abs=1e-5)
    # larger than the cap: the top values of a randomized SVD, marked as a truncated spectrum
    big = spectrum(_matrix([5, 3, 1], 300, 200).float(), max_rank=4)
    assert not big["exact"] and big["sigma"][:3] == pytest.approx([5, 3, 1], abs=1e-4)
    assert big["energy_kept"] == pytest.approx(1, abs=1e-5)


def test_merged_update_decomposes_on_the_task_vectors():
    gen = torch.Generator().manual_seed(1)
    taus = [torch.randn(30, 20, generator=gen) for _ in range(2)]
    delta = 0.5 * taus[0] + 0.3 * taus[1]
    merged = figures(tensor_sums(taus, delta, densities=[0.5, 0.5]), 2)["merged"]
    assert merged["coefficients"] == pytest.approx([0.5, 0.3], abs=1e-6)
    assert merged["residual"] == pytest.approx(0, abs=1e-6)
    assert sum(merged["share"]) == pytest.approx(1, abs=1e-6)
    assert merged["norm"] == pytest.approx(float(delta.norm()), rel=1e-6)
    assert merged["cosine"][0] == pytest.approx(float(torch.cosine_similarity(
        delta.flatten(), taus[0].flatten(), dim=0)), abs=1e-6)
    against = ((taus[1] * delta) < 0).sum().item() / taus[1].numel()
    assert merged["against"][1] == pytest.approx(against)


def test_groups_add_up_to_the_figures_of_their_tensors_joined():
    gen = torch.Generator().manual_seed(2)
    a = [torch.randn(8, 5, generator=gen) for _ in range(3)]
    b = [torch.randn(7, generator=gen) for _ in range(3)]
    joined = figures(tensor_sums([torch.cat([x.flatten(), y]) for x, y in zip(a, b)],
                                 densities=[1.0] * 3), 3)
    added = figures(add_sums(tensor_sums(a, densities=[1.0] * 3), tensor_sums(b, densities=[1.0] * 3)), 3)
    torch.testing.assert_close(torch.tensor(added["cosine"]), torch.tensor(joined["cosine"]),
                               rtol=0, atol=1e-12)
    assert added["sign_conflict_rate"] == joined["sign_conflict_rate"]
    assert added["pair_conflict_rate"] == joined["pair_conflict_rate"]


@pytest.fixture(scope="module")
def analysed(zoo, tmp_path_factory):
    """A TIES recipe of the llama zoo, its task-arithmetic merge, and the analysis against it."""
    from mergesmith.pipeline import merge

    root = tmp_path_factory.mktemp("analyze")
    models = zoo("llama")
    experts = [{"model": str(models[e]), "parameters": {"weight": w, "density": 0.5}}
               for e, w in (("e1", 0.5), ("e2", 0.3))]
    recipe = write_recipe(root / "ties.yaml", {"merge_method": "ties", "base_model": str(models["base"]),
                                               "models": experts})
    ta = write_recipe(root / "ta.yaml", {"merge_method": "task_arithmetic",
                                         "base_model": str(models["base"]), "models": experts})
    merged = merge(ta, root / "merged")
    out = analyze(recipe, root / "out", merged=merged)
    return models, merged, out


def test_recipe_analysis_writes_json_plots_and_report(analysed):
    models, merged, out = analysed
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "tensors.jsonl").read_text().splitlines()]
    base, e1, e2 = (read_tensors(models[k]) for k in ("base", "e1", "e2"))
    name = "model.layers.1.self_attn.q_proj.weight"
    record = next(r for r in records if r["name"] == name)
    t1, t2 = (e[name] - base[name] for e in (e1, e2))
    assert record["cosine"][0][1] == pytest.approx(float(torch.cosine_similarity(
        t1.flatten().double(), t2.flatten().double(), dim=0)), abs=1e-6)  # gram64: fp32 blocks
    assert record["layer"] == 1 and len(records) == summary["tensors"]
    # the merge is task arithmetic with weights 0.5 and 0.3: δ = 0.5 τ1 + 0.3 τ2 everywhere
    assert summary["model"]["merged"]["coefficients"] == pytest.approx([0.5, 0.3], abs=1e-4)
    assert summary["model"]["merged"]["residual"] == pytest.approx(0, abs=1e-6)
    assert set(summary["layers"]) == {"embeddings", "0", "1", "2", "3", "head"}
    assert summary["densities"].startswith("the recipe's ([0.5, 0.5]")
    for png in ("layers.png", "similarity.png", "drops.png", "spectra.png", "merged.png"):
        assert (out / png).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "## What sparsification would drop" in report and "![merged.png](merged.png)" in report
    page = (out / "report.html").read_text()
    # the same content as one page: every table row, the plots embedded (it can be sent alone)
    assert page.count("<tr>") == sum(line.startswith("| ") for line in report.splitlines())
    assert page.count('<img src="data:image/png;base64,') == report.count("![")
    assert "<h2>What sparsification would drop</h2>" in page and "<strong>" in page


def test_cli_analyze_and_bad_inputs(analysed, zoo, tmp_path, monkeypatch, capsys):
    models, merged, _ = analysed
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "linear", "base_model": str(models["base"]),
                                                "models": [{"model": str(models["e1"])},
                                                           {"model": str(models["e2"])}]})
    code, _, err = run_cli(monkeypatch, capsys, "analyze", recipe, tmp_path / "out", "-q", "--density", "0.3",
                           "--chunk-size", "1KiB")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["parameters_of"] == "task_arithmetic" and summary["densities"] == "0.3 (--density)"
    code, _, err = run_cli(monkeypatch, capsys, "analyze", recipe, tmp_path / "out", "-q")
    assert code == 1 and "not empty" in err
    other = build_model(tmp_path / "wide", "llama", seed=5, hidden=16)
    code, _, err = run_cli(monkeypatch, capsys, "analyze", recipe, tmp_path / "o2", "-q", "--merged", other)
    assert code == 1 and "shapes differ" in err and "Traceback" not in err
    no_base = write_recipe(tmp_path / "nb.yaml", {"merge_method": "linear", "models": [
        {"model": str(models["e1"])}, {"model": str(models["e2"])}]})
    with pytest.raises(PlanError, match="no base_model"):
        analyze(no_base, tmp_path / "o3")


def test_models_of_mismatched_shapes_are_refused(zoo, tmp_path):
    models = zoo("llama")
    wide = build_model(tmp_path / "wide", "llama", seed=5, hidden=16)
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "task_arithmetic",
                                                "base_model": str(models["base"]),
                                                "models": [{"model": str(models["e1"])}, {"model": str(wide)}]})
    with pytest.raises(PlanError, match="differ"):
        analyze(recipe, tmp_path / "out")
    with pytest.raises(PlanError, match="shapes differ"):
        analyze(recipe, tmp_path / "out2", allow_crimes=True)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_an_out_inside_an_input_is_refused_even_with_overwrite(zoo, tmp_path):
    models = zoo("llama")
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "task_arithmetic",
                                                "base_model": str(models["base"]),
                                                "models": [{"model": str(models["e1"]),
                                                            "parameters": {"weight": 1.0}}]})
    before = sorted(p.name for p in models["e1"].iterdir())
    for out in (models["e1"], models["e1"] / "analysis"):
        with pytest.raises(OutputError, match="the input"):
            analyze(recipe, out, overwrite=True)
    assert sorted(p.name for p in models["e1"].iterdir()) == before


def test_one_tensors_inputs_in_memory_at_a_time(zoo, tmp_path, monkeypatch):
    models = zoo("llama")
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "ties", "base_model": str(models["base"]),
                                                "parameters": {"weight": 1.0},
                                                "models": [{"model": str(models["e1"])},
                                                           {"model": str(models["e2"])}]})
    alive: list[weakref.ref] = []
    most = []
    read = analyze_run.read_unit

    def tracked(plan, unit, source=None):
        most.append(sum(r() is not None for r in alive))  # earlier tensors' inputs still held
        tensors = read(plan, unit, source)
        alive.extend(weakref.ref(t) for t in tensors)
        return tensors

    monkeypatch.setattr(analyze_run, "read_unit", tracked)
    analyze(recipe, tmp_path / "out", plots=False)
    assert len(most) > 30 and max(most) == 0


def test_streamed_blocks_give_the_whole_tensors_sums(analysed, tmp_path, monkeypatch):
    """The same analysis read in blocks of 1 KiB (every matrix in several blocks, each read once
    per pass) and read whole: counts equal; sums of squares and products, added in float64 from
    fp32 blocks that now end elsewhere, and spectra equal to fp32 rounding. With the default
    rank every spectrum of the toy model is exact (a Gram matrix); with rank 4 it is sketched."""
    models, merged, whole_out = analysed
    recipe = whole_out.parent / "ties.yaml"
    reads = []
    read = analyze_run.read_unit

    def tracked(plan, unit, source=None):
        tensors = read(plan, unit, source)
        reads.append((unit.job.out.name, unit.rows, tensors[0].numel()))
        return tensors

    sketched = analyze(recipe, tmp_path / "whole4", merged=merged, max_rank=4, plots=False)
    monkeypatch.setattr(analyze_run, "read_unit", tracked)
    for rank, whole_out, passes in ((32, whole_out, 3), (4, sketched, 6)):
        reads.clear()
        out = analyze(recipe, tmp_path / f"streamed{rank}", merged=merged, chunk_size=1024,
                      max_rank=rank, plots=False)
        whole = {r["name"]: r for r in map(json.loads, (whole_out / "tensors.jsonl").read_text().splitlines())}
        streamed = [json.loads(line) for line in (out / "tensors.jsonl").read_text().splitlines()]
        assert [r["name"] for r in streamed] == list(whole)
        blocked = {name for name, rows, _ in reads if rows is not None}
        assert len(blocked) >= 18  # the square and tall matrices (wide ones too when sketched)
        for name, rows, numel in reads:  # no read larger than a block unless it is one row
            if name in blocked:
                assert rows is not None and (numel * 4 <= 1024 or rows[1] - rows[0] == 1)
        for s in streamed:
            w = whole[s["name"]]
            a, b = s["sums"], w["sums"]
            for key in ("numel", "conflicts", "pair_conflicts", "mask_overlap", "nonzero", "against"):
                assert a[key] == b[key], (s["name"], key)
            for method in b["kept"]:
                assert [c for c, _ in a["kept"][method]] == [c for c, _ in b["kept"][method]]
                assert [e for _, e in a["kept"][method]] == pytest.approx(
                    [e for _, e in b["kept"][method]], rel=1e-6)
            torch.testing.assert_close(torch.tensor(a["gram"]), torch.tensor(b["gram"]),
                                       rtol=1e-6, atol=0)
            assert len(a.get("spectra", [])) == len(b.get("spectra", []))
            for x, y in zip(a.get("spectra", []), b.get("spectra", [])):
                assert x["exact"] == y["exact"] == (rank == 32)
                assert x["sigma"] == pytest.approx(y["sigma"], rel=1e-4)
        # each block read once per pass: 3, or 6 when the spectra are sketched (2 + 2q)
        name = "model.layers.1.self_attn.q_proj.weight"
        blocks = {rows for n, rows, _ in reads if n == name}
        assert len(blocks) > 1 and sum(n == name for n, *_ in reads) == passes * len(blocks)


def test_range_sketch_in_blocks_is_randomized_svd():
    from mergesmith.methods.lowrank import RangeSketch, randomized_svd

    gen = torch.Generator().manual_seed(3)
    for shape in ((90, 50), (50, 90)):
        x = _matrix([9, 5, 3, 2, 1, 0.5], *shape).float() + 1e-3 * torch.randn(*shape, generator=gen)
        sketch = RangeSketch(shape, 4, oversample=6, power_iterations=2, seed=1)
        for _ in range(sketch.passes):
            for start in range(0, shape[0], 7):
                sketch.add(start, x[start:start + 7])
            sketch.end_pass()
        _, s, _ = randomized_svd(x, 4, oversample=6, power_iterations=2, seed=1)
        torch.testing.assert_close(sketch.values(), s, rtol=1e-5, atol=0)
        exact_top = torch.linalg.svdvals(x.double())[:4]
        assert sketch.values().tolist() == pytest.approx(exact_top.tolist(), rel=1e-3)
        exact = RangeSketch(shape, 6, exact=True)
        if shape[0] > shape[1]:  # a tall matrix's exact spectrum adds up over blocks
            for start in range(0, shape[0], 7):
                exact.add(start, x[start:start + 7])
        else:  # a wide one's couples its rows: one block
            with pytest.raises(ValueError, match="all its rows"):
                exact.add(0, x[:7])
            exact.add(0, x)
        exact.end_pass()
        torch.testing.assert_close(exact.values(), torch.linalg.svdvals(x.double())[:6], rtol=1e-6, atol=0)
