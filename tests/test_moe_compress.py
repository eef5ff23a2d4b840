"""MoE compression (mergesmith moe-compress): MC-SMoE, HC-SMoE, Sub-MoE on tiny transformers MoEs."""

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import read_tensors, run_cli
from mergesmith.calibrate.data import draw
from mergesmith.calibrate.moe_routing import LayerRouting, RoutingStatistics, routing_statistics
from mergesmith.moe.compress import compress_moe, read_moe
from mergesmith.errors import CalibrationError, PlanError
from mergesmith.methods import moe_compress as mc
from mergesmith.toy import build_model, build_moe

METHODS = ("mc_smoe", "hc_smoe", "sub_moe")
IDS = torch.tensor([[3, 5, 7, 11, 2, 9, 14, 30]])
W = "model.layers.{}.block_sparse_moe.experts.{}.w{}.weight"  # Mixtral's per-expert names
ROUTER = "model.layers.{}.block_sparse_moe.gate.weight"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe-data") / "data.txt"
    path.write_text("\n".join(" ".join(f"w{(i * 7 + j * 3) % 90}" for j in range(4 + i % 6)) for i in range(24)))
    return path


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return build_moe(tmp_path_factory.mktemp("moe") / "mixtral", "mixtral", router_scale=50)


def logits(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(IDS).logits


def edit_tensors(folder, edit):
    """Rewrite a toy checkpoint's single safetensors file with `edit(tensors)` applied."""
    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})
    return folder


def groups(out, layer=0):
    return json.loads((out / "compression.json").read_text())["layers"][str(layer)]["groups"]


# ---- K = E, identical experts -----------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_k_equal_to_the_experts_returns_the_input(method, mixtral, data, tmp_path):
    out = compress_moe(mixtral, tmp_path / "out", method=method, experts=4, data=data, samples=8)
    got, want = read_tensors(out), read_tensors(mixtral)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(logits(out), logits(mixtral))


def test_k_equal_to_the_experts_from_the_fused_layout(data, tmp_path):
    """A fused checkpoint (experts.gate_up_proj [E, 2I, H]) comes out per expert, tensor for tensor."""
    src = build_moe(tmp_path / "fused", "qwen2_moe", fused=True, router_scale=50)
    out = compress_moe(src, tmp_path / "out", method="hc_smoe", experts=4, data=data, samples=8)
    got, fused = read_tensors(out), read_tensors(src)
    for layer in range(2):
        gate_up, down = (fused[f"model.layers.{layer}.mlp.experts.{n}"] for n in ("gate_up_proj", "down_proj"))
        for e in range(4):
            name = f"model.layers.{layer}.mlp.experts.{e}.{{}}_proj.weight"
            assert torch.equal(got[name.format("gate")], gate_up[e, :gate_up.shape[1] // 2])
            assert torch.equal(got[name.format("up")], gate_up[e, gate_up.shape[1] // 2:])
            assert torch.equal(got[name.format("down")], down[e])
    torch.testing.assert_close(logits(out), logits(src), rtol=0, atol=1e-6)
    experts = read_moe(src).experts  # rows read by byte range, as the engine reads chunks
    half = gate_up.shape[1] // 2
    assert torch.equal(experts.read("model.layers.1.mlp.experts.2.up_proj.weight", (3, 7)),
                       gate_up[2, half + 3:half + 7])


def paired(folder, arch="mixtral"):
    """Experts 1 and 3 made copies of 0 and 2 (weights and router rows) in every layer."""
    def edit(tensors):
        for name in list(tensors):
            for copy, of in ((".1.", ".0."), (".3.", ".2.")):
                if f"experts{copy}" in name:
                    tensors[name] = tensors[name.replace(f"experts{copy}", f"experts{of}")].clone()
            if name.endswith("gate.weight") and "shared" not in name:
                tensors[name][1], tensors[name][3] = tensors[name][0].clone(), tensors[name][2].clone()
    return edit_tensors(folder, edit)


@pytest.mark.parametrize("method,arch", [(m, "mixtral") for m in METHODS] + [("mc_smoe", "qwen2_moe"),
                                                                             ("sub_moe", "qwen3_moe")])
def test_identical_pairs_merge_into_half_without_changing_the_logits(method, arch, data, tmp_path):
    """Top-k = E: every expert is active and the layer mixes them by the softmax of the router
    logits, so a pair's two equal logits carry 2·exp(l)/Σ, exactly the merged expert's share
    of the softmax over the halved router (its rows are the pair's common row). With top-2 of 4
    a token would use one pair, and the halved MoE's top-2 of 2 two different experts."""
    src = paired(build_moe(tmp_path / "src", arch, top_k=4, router_scale=50), arch)
    out = compress_moe(src, tmp_path / "out", method=method, experts=2, data=data, samples=8)
    assert groups(out) == groups(out, 1) == [[0, 1], [2, 3]]
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts_per_tok"] == 2
    assert config.get("num_local_experts", config.get("num_experts")) == 2
    torch.testing.assert_close(logits(out), logits(src), rtol=1e-5, atol=1e-5)


# ---- MC-SMoE ----------------------------------------------------------------------------------

def test_usage_frequencies_and_groups_by_hand():
    """A toy router of 4 experts over 5 tokens; top-2 by hand."""
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [1.0, -1.0]])
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.4], [-1.0, -0.2]])
    routed = hidden @ rows.T
    # token 0: [1, 0, .5, -1] -> 0, 2; token 1: [0, 1, .4, -.2] -> 1, 2; token 2: [1, 1, .9, -1.2] -> 0, 1;
    # token 3: [-1, 0, -.5, 1] -> 3, 1; token 4: [1, -1, .1, -.8] -> 0, 2
    counts = mc.selection_counts(routed, 2)
    assert counts.tolist() == [3, 3, 3, 1]
    f = mc.usage_frequencies(counts)
    assert torch.allclose(f, torch.tensor([0.3, 0.3, 0.3, 0.1], dtype=torch.float64))
    similarity = mc.router_similarity(routed.T.double() @ routed.double())
    cos = torch.nn.functional.cosine_similarity(routed.T[:, None], routed.T[None], dim=-1).double()
    assert torch.allclose(similarity, (cos + 1) / 2)
    labels = mc.dominant_groups(f, similarity, 2)  # dominant 0 and 1 (ties by index)
    want = [0, 1, int(cos[2, 1] > cos[2, 0]), int(cos[3, 1] > cos[3, 0])]
    assert labels.tolist() == mc.canonical(want).tolist()
    assert mc.member_weights(f, [0, 3]) == pytest.approx([0.3, 0.1])


def hand_statistics(counts, gram, outputs=None):
    return RoutingStatistics({layer: LayerRouting(torch.tensor(counts, dtype=torch.float64), gram,
                                                  outputs, tokens=10) for layer in (0, 1)}, top_k=2, examples=5)


def test_mc_smoe_merges_by_usage_and_keeps_singletons(mixtral, tmp_path):
    """Usage 6, 3, 1, 2 and logit columns where 2 resembles 0 and 3 resembles 1: dominant 0 and 1,
    groups {0, 2} and {1, 3}, experts Σ f W / Σ f (no alignment) and router rows likewise; with
    K = 3 the singletons {1} and {3} stay as they are, bitwise."""
    columns = torch.tensor([[1.0, 0.0, 0.9, 0.1], [0.0, 1.0, 0.2, 0.8], [0.3, 0.3, 0.3, 0.3]], dtype=torch.float64)
    stats = hand_statistics([6, 3, 1, 2], columns.T @ columns)
    out = compress_moe(mixtral, tmp_path / "two", method="mc_smoe", experts=2, statistics=stats, align=False)
    assert groups(out) == [[0, 2], [1, 3]]
    got, src = read_tensors(out), read_tensors(mixtral)
    for layer in (0, 1):
        for w in (1, 2, 3):
            want = (6 * src[W.format(layer, 0, w)] + 1 * src[W.format(layer, 2, w)]) / 7
            torch.testing.assert_close(got[W.format(layer, 0, w)], want, rtol=1e-6, atol=1e-7)
            want = (3 * src[W.format(layer, 1, w)] + 2 * src[W.format(layer, 3, w)]) / 5
            torch.testing.assert_close(got[W.format(layer, 1, w)], want, rtol=1e-6, atol=1e-7)
        router = src[ROUTER.format(layer)]
        torch.testing.assert_close(got[ROUTER.format(layer)],
                                   torch.stack([(6 * router[0] + router[2]) / 7, (3 * router[1] + 2 * router[3]) / 5]))
    out = compress_moe(mixtral, tmp_path / "lr", method="mc_smoe", experts=2, statistics=stats, align=False,
                       rank=4, sparse=0.1)
    merged = (6 * src[W.format(1, 0, 2)] + src[W.format(1, 2, 2)]) / 7
    torch.testing.assert_close(read_tensors(out)[W.format(1, 0, 2)], mc.low_rank_plus_sparse(merged, 4, 0.1),
                               rtol=1e-5, atol=1e-6)
    out = compress_moe(mixtral, tmp_path / "three", method="mc_smoe", experts=3, statistics=stats)
    assert groups(out) == [[0, 2], [1], [3]]  # dominant 0, 1 and 3 (usage 2 > 1)
    got = read_tensors(out)
    for w in (1, 2, 3):
        assert torch.equal(got[W.format(0, 1, w)], src[W.format(0, 1, w)])
        assert torch.equal(got[W.format(0, 2, w)], src[W.format(0, 3, w)])
    assert torch.equal(got[ROUTER.format(0)][[1, 2]], src[ROUTER.format(0)][[1, 3]])


def test_mc_smoe_keep_router_leaves_routing_unchanged(mixtral, data, tmp_path):
    """MC-SMoE's own form: every expert slot points at its group's merge and the router is
    untouched, so router logits, selected experts and routing weights are the input's."""
    out = compress_moe(mixtral, tmp_path / "out", method="mc_smoe", experts=2, data=data, samples=8,
                       keep_router=True)
    got, src = read_tensors(out), read_tensors(mixtral)
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 2
    for layer in (0, 1):
        assert torch.equal(got[ROUTER.format(layer)], src[ROUTER.format(layer)])
        for members in groups(out, layer):
            assert all(torch.equal(got[W.format(layer, e, 1)], got[W.format(layer, members[0], 1)]) for e in members)

    def routing(folder):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        seen = []
        model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, r: seen.append(r))
        with torch.no_grad():
            model(IDS)
        return seen[0]

    for a, b in zip(routing(out), routing(mixtral)):
        assert torch.equal(a, b)


def test_mc_smoe_aligns_a_permuted_copy_back(tmp_path, data):
    """Expert 1 is expert 0 with its hidden units permuted (same function, same router row): the
    aligned merge of {0, 1} computes expert 0's function; the plain average does not."""
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(1))

    def edit(tensors):
        for layer in (0, 1):
            for w in (1, 3):
                tensors[W.format(layer, 1, w)] = tensors[W.format(layer, 0, w)][perm].clone()
            tensors[W.format(layer, 1, 2)] = tensors[W.format(layer, 0, 2)][:, perm].clone()
            tensors[ROUTER.format(layer)][1] = tensors[ROUTER.format(layer)][0].clone()

    src = edit_tensors(build_moe(tmp_path / "src", "mixtral", router_scale=50), edit)
    aligned = read_tensors(compress_moe(src, tmp_path / "a", method="mc_smoe", experts=3, data=data, samples=8))
    plain = read_tensors(compress_moe(src, tmp_path / "p", method="mc_smoe", experts=3, data=data, samples=8,
                                      align=False))
    assert groups(tmp_path / "a") == [[0, 1], [2], [3]]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))

    def expert(tensors, e):
        w1, w2, w3 = (tensors[W.format(0, e, i)] for i in (1, 2, 3))
        return (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T

    want = expert(read_tensors(src), 0)
    torch.testing.assert_close(expert(aligned, 0), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expert(plain, 0), want, atol=1e-3)


def test_mc_smoe_adaptive_group_counts(mixtral, tmp_path):
    """A budget of 4 groups over 2 layers: each layer's top expert first, then the two largest
    remaining frequencies of both layers together (0.3 and 0.25, both in layer 1)."""
    f = [torch.tensor([0.4, 0.2, 0.2, 0.2]), torch.tensor([0.35, 0.3, 0.25, 0.1])]
    assert mc.layer_group_counts(f, 4) == [1, 3]
    assert mc.layer_group_counts(f, 2) == [1, 1] and mc.layer_group_counts(f, 8) == [4, 4]
    columns = torch.eye(4, dtype=torch.float64)
    stats = RoutingStatistics({0: LayerRouting(torch.tensor([40.0, 20, 20, 20], dtype=torch.float64), columns, None),
                               1: LayerRouting(torch.tensor([35.0, 30, 25, 10], dtype=torch.float64), columns, None)},
                              top_k=2, examples=5)
    out = compress_moe(mixtral, tmp_path / "out", method="mc_smoe", experts=2, statistics=stats, keep_router=True,
                       adaptive=True)
    assert [len(groups(out, layer)) for layer in (0, 1)] == [1, 3]
    with pytest.raises(PlanError, match="--keep-router"):
        compress_moe(mixtral, tmp_path / "o", method="mc_smoe", experts=2, statistics=stats, adaptive=True)


def test_low_rank_plus_sparse():
    w = torch.randn(12, 9, generator=torch.Generator().manual_seed(0))
    u, s, vh = np.linalg.svd(w.double().numpy(), full_matrices=False)
    low = torch.from_numpy((u[:, :3] * s[:3]) @ vh[:3]).float()
    torch.testing.assert_close(mc.low_rank_plus_sparse(w, 3), low, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mc.low_rank_plus_sparse(w, 9), w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mc.low_rank_plus_sparse(w, 3, keep=1.0), w, rtol=1e-5, atol=1e-5)
    residual = mc.low_rank_plus_sparse(w, 3, keep=0.25) - low
    kept = residual.abs() > 1e-6
    assert kept.sum() == round(0.25 * w.numel())
    assert (w - low)[kept].abs().min() >= (w - low)[~kept].abs().max() - 1e-6


# ---- HC-SMoE ----------------------------------------------------------------------------------

def test_agglomerative_groups_by_hand_and_no_seed(mixtral, tmp_path):
    points = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.1, 0.0], [10.0, 0.2], [5.0, 9.0]])
    for linkage in mc.LINKAGES:
        assert mc.agglomerative_groups(points, 3, linkage).tolist() == [0, 1, 0, 1, 2]
    assert mc.agglomerative_groups(points, 5).tolist() == [0, 1, 2, 3, 4]
    outputs = torch.randn(4, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats = hand_statistics([4, 3, 2, 1], torch.eye(4, dtype=torch.float64), outputs)
    a = compress_moe(mixtral, tmp_path / "a", method="hc_smoe", experts=2, statistics=stats, seed=0)
    b = compress_moe(mixtral, tmp_path / "b", method="hc_smoe", experts=2, statistics=stats, seed=7)
    got_a, got_b = read_tensors(a), read_tensors(b)
    assert all(torch.equal(got_a[k], got_b[k]) for k in got_a)
    from scipy.cluster.hierarchy import fcluster, linkage as tree
    assert groups(a) == mc.groups(mc.canonical(fcluster(tree(outputs.numpy(), "ward"), 2, "maxclust")))


# ---- Sub-MoE ----------------------------------------------------------------------------------

def test_joint_svd_reconstructs_every_member_and_merges_in_the_shared_basis():
    g = torch.Generator().manual_seed(0)
    members = [torch.randn(8, 5, generator=g) for _ in range(3)]
    u, s, vs = mc.joint_svd(members)
    for w, v in zip(members, vs):
        torch.testing.assert_close((u * s) @ v.T, w.double(), rtol=1e-10, atol=1e-10)
    f = [0.5, 0.3, 0.2]
    average = sum(fi * w for fi, w in zip(f, members))
    torch.testing.assert_close(mc.subspace_merge(members, f), average, rtol=1e-5, atol=1e-6)
    basis = u[:, :3].float()
    torch.testing.assert_close(mc.subspace_merge(members, f, rank=3), basis @ basis.T @ average, rtol=1e-4, atol=1e-5)


def test_cosine_kmeans_is_seeded_and_finds_clear_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g)
    scale = torch.rand(7, 1, generator=g).add(0.5)
    points = centres[[0, 1, 0, 2, 1, 2, 0]] * scale + 0.01 * torch.randn(7, 16, generator=g)
    for seed in range(4):
        assert mc.cosine_kmeans_groups(points, 3, seed).tolist() == [0, 1, 0, 2, 1, 2, 0]
    assert mc.cosine_kmeans_groups(points, 7, 0).tolist() == list(range(7))


def test_sub_moe_keeps_a_singleton_without_truncation(mixtral, data, tmp_path):
    out = compress_moe(mixtral, tmp_path / "out", method="sub_moe", experts=3, data=data, samples=8)
    got, src = read_tensors(out), read_tensors(mixtral)
    for layer in (0, 1):
        for new, members in enumerate(groups(out, layer)):
            if len(members) == 1:
                assert all(torch.equal(got[W.format(layer, new, w)], src[W.format(layer, members[0], w)])
                           for w in (1, 2, 3))
    ranked = compress_moe(mixtral, tmp_path / "r", method="sub_moe", experts=3, data=data, samples=8, rank=4)
    got = read_tensors(ranked)
    assert torch.linalg.matrix_rank(got[W.format(0, 0, 2)]) <= 4


# ---- statistics and bad inputs ----------------------------------------------------------------

def test_routing_statistics_against_transformers_router_logits(mixtral, data):
    stats = routing_statistics(mixtral, data, samples=6, outputs=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(mixtral).eval()
    tok = transformers.AutoTokenizer.from_pretrained(mixtral)
    lines = draw(data.read_text().splitlines(), 6, 0)  # the examples routing_statistics draws
    counts, grams, inputs = torch.zeros(4), torch.zeros(4, 4, dtype=torch.float64), []
    model.model.layers[1].mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0][0]))
    with torch.no_grad():
        for line in lines:
            out = model(**tok(line, return_tensors="pt"), output_router_logits=True)
            routed = out.router_logits[1]
            counts += torch.bincount(routed.topk(2).indices.flatten(), minlength=4)
            grams += routed.double().T @ routed.double()
    layer = stats.layers[1]
    assert layer.counts.tolist() == counts.tolist() and layer.tokens == sum(len(l.split()) for l in lines)
    torch.testing.assert_close(layer.logit_gram, grams, rtol=1e-5, atol=1e-6)
    x, w = torch.cat(inputs), read_tensors(mixtral)
    for e in range(4):
        w1, w2, w3 = (w[W.format(1, e, i)] for i in (1, 2, 3))
        mean = ((torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T).mean(0)
        torch.testing.assert_close(layer.mean_output[e].float(), mean, rtol=1e-4, atol=1e-6)


def test_bad_inputs(mixtral, data, tmp_path, monkeypatch, capsys):
    with pytest.raises(PlanError, match="only 4 experts"):
        compress_moe(mixtral, tmp_path / "o", method="hc_smoe", experts=5, data=data)
    dense = build_model(tmp_path / "dense", "llama", seed=0, layers=2)
    with pytest.raises(PlanError, match="not an MoE"):
        compress_moe(dense, tmp_path / "o", method="hc_smoe", experts=2, data=data)
    with pytest.raises(CalibrationError, match="no such calibration file"):
        compress_moe(mixtral, tmp_path / "o", method="hc_smoe", experts=2, data=tmp_path / "none.txt")
    with pytest.raises(PlanError, match="hc_smoe has no rank"):
        compress_moe(mixtral, tmp_path / "o", method="hc_smoe", experts=2, data=data, rank=2)
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli(monkeypatch, capsys, "moe-compress", mixtral, tmp_path / "o", "--method", "mc_smoe",
                           "--experts", "9", "--data", data)
    assert code == 1 and "error: --experts 9" in err and "Traceback" not in err
    # K below the experts per token: top-k follows K, and the model runs
    code, _, _ = run_cli(monkeypatch, capsys, "moe-compress", mixtral, tmp_path / "one", "--method", "hc_smoe",
                         "--experts", "1", "--data", data, "--samples", "4", "-q")
    assert code == 0
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert config["num_local_experts"] == 1 and config["num_experts_per_tok"] == 1
    assert torch.isfinite(logits(tmp_path / "one")).all()
