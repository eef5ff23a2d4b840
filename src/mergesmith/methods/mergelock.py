"""MergeLock: function-preserving per-head transforms of attention that make a model
unmergeable (Wang et al., "Model Unmerging", arXiv 2509.01548), the invariants that give a lock
away, and an undo from a reference model. Pure tensor functions; engine/mergelock.py reads and
writes the models.

Row-vector convention as in the paper (q = x W_Q, W_Q^h is d × d_h); nn.Linear stores the
transpose, so head h's rows of q_proj.weight are (W_Q^h)ᵀ. Per layer and key/value head g:

    W_Q^h ← W_Q^h M_g,   W_K^g ← W_K^g M_g^{−T},   W_V^g ← W_V^g N_g,   W_O^h ← N_g^{−1} W_O^h

for every query head h of g's group (GQA: the group shares M_g and N_g), biases alike
(b_Q ← b_Q M, b_K ← b_K M^{−T}, b_V ← b_V N). Then x W_Q W_Kᵀ xᵀ and W_V W_O are unchanged.

RoPE rotates each frequency pair of q and k after the projection, so M must commute with every
rotation: per pair (i, i + d_h/2) (transformers' rotate_half layout) a rotation-scaling
[[a, −b], [b, a]], that is one complex number per frequency. The paper's code is not available
to us and how it treats RoPE models is unconfirmed; this restriction is ours, and required.

Detection and undo are ours (METHODS.md): the per-head products G_QK = W_Q W_Kᵀ and
G_VO = W_V W_O are invariant, so a model whose weights are far from a reference while these
are close is locked; M̂ = argmin ‖W_Q^ref M − W_Q^locked‖ (restricted to rotation-scalings under
RoPE) and N̂ likewise from W_V undo the lock when the model is close to the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergesmith.methods.registry import register_operation

register_operation(
    "mergelock", command="mergesmith lock MODEL OUT; mergesmith unlock LOCKED --reference REF OUT",
    summary="lock: random per-head transforms of Q/K and V/O that keep the model's outputs and "
            "break merging; `check` flags a locked input; unlock: undo from a close reference",
    paper="Model Unmerging (MergeLock), Wang et al. 2025 (arXiv 2509.01548); detect/undo: ours",
    needs="a Llama-family model (RoPE, GQA); unlock: a reference it was fine-tuned close to")

# A lock's weights differ by about their own norm; a fine-tune's by far less. A layer whose
# weights moved FLAG_WEIGHTS or more while its invariants moved FLAG_RATIO times less is locked.
FLAG_WEIGHTS = 0.3
FLAG_RATIO = 5.0


@dataclass(frozen=True)
class Heads:
    """An attention layer's shape: query heads, key/value heads, head dim; RoPE or not."""

    queries: int
    kv: int
    dim: int
    rope: bool = True

    @property
    def group(self) -> int:
        return self.queries // self.kv


@dataclass(frozen=True)
class LayerLock:
    """One layer's transforms: qk [kv, d_h, d_h] (M_g) and vo [kv, d_h, d_h] (N_g)."""

    qk: torch.Tensor
    vo: torch.Tensor

    def inverse(self) -> "LayerLock":
        return LayerLock(torch.linalg.inv(self.qk), torch.linalg.inv(self.vo))


def rotation_scaling(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The d_h × d_h matrix acting on each RoPE pair (i, i + d_h/2) of a row vector as the complex
    number a_i + i b_i: (x1, x2) ↦ (a x1 + b x2, −b x1 + a x2), which commutes with the rotations."""
    half = len(a)
    m = torch.zeros(2 * half, 2 * half, dtype=a.dtype)
    i = torch.arange(half)
    m[i, i], m[i + half, i + half] = a, a
    m[i, i + half], m[i + half, i] = -b, b
    return m


def pair_coefficients(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) read off a rotation-scaling's diagonal and lower-left block."""
    half = m.shape[0] // 2
    i = torch.arange(half)
    return m[i, i], m[i + half, i]


def is_rope_compatible(m: torch.Tensor, tol: float = 1e-5) -> bool:
    """Whether M commutes with every RoPE rotation (it is a rotation-scaling per pair)."""
    if m.shape[0] % 2:
        return False
    return bool(torch.allclose(m, rotation_scaling(*pair_coefficients(m)), atol=tol * m.abs().max()))


def _scales(n: int, spread: float, gen: torch.Generator) -> torch.Tensor:
    """n scales log-uniform in [1/spread, spread]: the lock stays well conditioned (κ ≤ spread²)."""
    return torch.exp((2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1) * math.log(spread))


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def draw_general(n: int, gen: torch.Generator, spread: float = 2.0) -> torch.Tensor:
    """U diag(s) V with U, V Haar-orthogonal and s log-uniform in [1/spread, spread]."""
    return _orthogonal(n, gen) @ torch.diag(_scales(n, spread, gen)) @ _orthogonal(n, gen)


def draw_rope(n: int, gen: torch.Generator, spread: float = 2.0) -> torch.Tensor:
    """A random rotation-scaling per RoPE pair: modulus log-uniform, angle uniform."""
    modulus = _scales(n // 2, spread, gen)
    angle = 2 * math.pi * torch.rand(n // 2, generator=gen, dtype=torch.float64)
    return rotation_scaling(modulus * torch.cos(angle), modulus * torch.sin(angle))


def draw_lock(heads: Heads, gen: torch.Generator, spread: float = 2.0) -> LayerLock:
    """One layer's random transforms (float64): M_g RoPE-compatible when the model uses RoPE."""
    draw_qk = draw_rope if heads.rope else draw_general
    return LayerLock(torch.stack([draw_qk(heads.dim, gen, spread) for _ in range(heads.kv)]),
                     torch.stack([draw_general(heads.dim, gen, spread) for _ in range(heads.kv)]))


def check_lock(lock: LayerLock, heads: Heads) -> None:
    """ValueError unless the transforms fit the layer and, under RoPE, commute with it."""
    want = (heads.kv, heads.dim, heads.dim)
    if tuple(lock.qk.shape) != want or tuple(lock.vo.shape) != want:
        raise ValueError(f"transforms of shape {tuple(lock.qk.shape)}, {tuple(lock.vo.shape)}; "
                         f"the layer needs {want}")
    if heads.rope and not all(is_rope_compatible(m) for m in lock.qk):
        raise ValueError("a Q/K transform is not a rotation-scaling per RoPE pair: it would not "
                         "commute with the rotary embedding and would change the model's outputs")


def transform_rows(kind: str, rows: torch.Tensor, lock: LayerLock, heads: Heads,
                   first_head: int = 0) -> torch.Tensor:
    """q_proj / k_proj / v_proj rows (weight [h·d_h, d] or bias [h·d_h]) of whole heads, from head
    `first_head` on, locked: q ← Mᵀ·q, k ← M^{−1}·k, v ← Nᵀ·v per head (PyTorch layout)."""
    d = heads.dim
    count = rows.shape[0] // d
    head = torch.arange(first_head, first_head + count)
    group = head // heads.group if kind == "q" else head
    if kind == "q":
        mats = lock.qk[group].transpose(1, 2)
    elif kind == "k":
        mats = torch.linalg.inv(lock.qk)[group]
    elif kind == "v":
        mats = lock.vo[group].transpose(1, 2)
    else:
        raise ValueError(f"unknown projection {kind!r}")
    blocks = rows.to(mats.dtype).reshape(count, d, -1)
    return torch.bmm(mats, blocks).reshape(rows.shape).to(rows.dtype)


def transform_o(weight: torch.Tensor, lock: LayerLock, heads: Heads) -> torch.Tensor:
    """o_proj.weight [d, h·d_h] (any block of its rows) locked: head h's columns ← cols·N_g^{−T}."""
    group = torch.arange(heads.queries) // heads.group
    mats = torch.linalg.inv(lock.vo)[group].transpose(1, 2)  # [heads, d_h, d_h]
    cols = weight.to(mats.dtype).reshape(weight.shape[0], heads.queries, heads.dim)
    return torch.einsum("rhi,hij->rhj", cols, mats).reshape(weight.shape).to(weight.dtype)


def fit_transform(ref: torch.Tensor, locked: torch.Tensor, rope: bool) -> torch.Tensor:
    """M̂ = argmin ‖ref·M − locked‖_F for [n, d_h] matrices (row convention); under RoPE over
    rotation-scalings only, in closed form per pair: a = (r1·l1 + r2·l2)/(‖r1‖² + ‖r2‖²),
    b = (r2·l1 − r1·l2)/(‖r1‖² + ‖r2‖²)."""
    ref, locked = ref.double(), locked.double()
    if not rope:
        return torch.linalg.lstsq(ref, locked).solution
    half = ref.shape[1] // 2
    r1, r2, l1, l2 = ref[:, :half], ref[:, half:], locked[:, :half], locked[:, half:]
    norm = (r1 * r1 + r2 * r2).sum(0).clamp_min(torch.finfo(torch.float64).tiny)
    return rotation_scaling(((r1 * l1 + r2 * l2).sum(0)) / norm, ((r2 * l1 - r1 * l2).sum(0)) / norm)


def product_gap(xa: torch.Tensor, ya: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor,
                group: int = 1) -> tuple[float, float]:
    """(‖Xa Yaᵀ − Xb Ybᵀ‖², ‖Xb Ybᵀ‖²) for [n, r] and [m, r] factors, or batches of them
    [B, n, r] summed over the batch, where each Y of a batch [B / group, m, r] serves `group`
    consecutive X's (GQA). From r × r Gram matrices: the n × m products are never formed."""
    xa, ya, xb, yb = (t.double().reshape(-1, *t.shape[-2:]) for t in (xa, ya, xb, yb))

    def gram(u, w, shared=False):
        g = torch.bmm(u.transpose(1, 2), w)
        return g.repeat_interleave(group, 0) if shared else g

    aa = torch.sum(gram(xa, xa) * gram(ya, ya, True))
    bb = torch.sum(gram(xb, xb) * gram(yb, yb, True))
    ab = torch.sum(gram(xa, xb) * gram(ya, yb, True))
    return float((aa - 2 * ab + bb).clamp_min(0)), float(bb)


def head_factors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 heads: Heads) -> tuple[torch.Tensor, ...]:
    """(W_Q^h, W_K^g, W_O^hᵀ, W_V^g) as batches over query heads h ([heads, in, d_h]) and over
    key/value heads g ([kv, in, d_h]), so that G_QK = W_Q^h W_K^gᵀ and G_VOᵀ = W_O^hᵀ W_V^gᵀ with
    g = h // group (product_gap's `group`). q/k/v are weights with their bias appended as a last
    input column (PyTorch layout [h·d_h, d(+1)]); o is o_proj.weight [d, h·d_h]."""
    d = heads.dim
    per_head = lambda w: w.reshape(-1, d, w.shape[-1]).transpose(1, 2)  # noqa: E731
    return per_head(q), per_head(k), o.reshape(o.shape[0], heads.queries, d).transpose(0, 1), per_head(v)


@dataclass
class Evidence:
    """One layer of a model against a reference: relative distances of the attention weights and
    of the per-head invariants G_QK and G_VO."""

    layer: int
    weights: float
    qk: float
    vo: float

    @property
    def locked(self) -> bool:
        return self.weights >= FLAG_WEIGHTS and max(self.qk, self.vo) * FLAG_RATIO <= self.weights


def layer_evidence(layer: int, mine: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                   heads: Heads) -> Evidence:
    """`mine`, `ref`: {"q", "k", "v", "o": weights (q/k/v with bias columns)} of one layer."""
    qa, ka, oa, va = head_factors(*(mine[n] for n in "qkvo"), heads)
    qb, kb, ob, vb = head_factors(*(ref[n] for n in "qkvo"), heads)
    qk, vo = product_gap(qa, ka, qb, kb, heads.group), product_gap(oa, va, ob, vb, heads.group)
    rel = lambda pair: math.sqrt(pair[0] / pair[1]) if pair[1] > 0 else 0.0  # noqa: E731
    return Evidence(layer, weight_distance(mine, ref), rel(qk), rel(vo))


def weight_distance(mine: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """‖mine − ref‖ / ‖ref‖ over a layer's attention weights (layer_evidence's layout)."""
    diff = sum(float((mine[n].double() - ref[n].double()).pow(2).sum()) for n in "qkvo")
    size = sum(float(ref[n].double().pow(2).sum()) for n in "qkvo")
    return math.sqrt(diff / size) if size > 0 else 0.0


def fit_lock(locked: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], heads: Heads) -> LayerLock:
    """The transforms that take `ref`'s layer closest to `locked`'s: M̂_g from the stacked Q
    heads of group g (and their biases), N̂_g from W_V^g. Same dict layout as layer_evidence."""
    d, qk, vo = heads.dim, [], []
    for g in range(heads.kv):
        rows = slice(g * heads.group * d, (g + 1) * heads.group * d)
        stack = lambda t: torch.cat(list(t[rows].reshape(heads.group, d, -1).transpose(1, 2)))  # noqa: E731
        qk.append(fit_transform(stack(ref["q"]), stack(locked["q"]), heads.rope))
        vo.append(fit_transform(ref["v"][g * d:(g + 1) * d].T, locked["v"][g * d:(g + 1) * d].T, False))
    return LayerLock(torch.stack(qk), torch.stack(vo))
