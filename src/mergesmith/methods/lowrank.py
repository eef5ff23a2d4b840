"""Low-rank decompositions: the one home of every truncated SVD in mergesmith.

Exact: `top_singular_triplets` (and `gram_svd` under it) take a matrix's singular values and
vectors from the eigendecomposition of its smaller Gram matrix (x xᵀ for a wide x, xᵀx for a
tall one), formed and solved in float64 on the tensor's device, never from an SVD. On one CPU
core that costs at most what an fp32 SVD does (2048×5632: 0.85 s for the Gram matrix and 2.8 s
for its eigh, against 6 s for the SVD; 2048²: 0.3 + 2.8 s against 3.4), and it is exact where
the SVD is not: results land within the fp32 rounding of a float64 SVD's (4e-8 of the largest
entry, against 1e-5 to 1e-4 through fp32 SVDs), and eigh never fails to converge (MKL's gesdd
does on matrices whose singular values are mostly exactly 1, depending on the data and the
thread count).

Singular values at the fp32 noise floor (σ ≤ σ1·max(m, n)·eps32) are left out: their singular
vectors are arbitrary, and keeping them would add random directions to a low-rank update (a
LoRA fine-tune, an untouched matrix). On full-rank matrices this changes nothing.

Approximate: `randomized_svd` (Halko, Martinsson & Tropp 2011, Alg. 4.4 and 5.1: a Gaussian
sketch with oversampling, power iterations re-orthonormalized by QR, then the exact SVD of the
small projected matrix). Seeded, so the same input gives the same factors. It pays when k is
far below min(m, n); its error is bounded by the tail singular values, not zero, so callers
that offer it label it approximate.

Rank selection (`select_rank`): a fixed rank, an absolute ε on the singular values
(mergekit-extract-lora's sv_epsilon) and an energy fraction min{k : Σ_{≤k} σ² ≥ e·‖x‖_F²},
whichever is smallest. ‖x‖_F² = Σ σ² over the whole spectrum, so a truncated spectrum suffices
when the caller passes the matrix's squared norm as `total`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

NOISE_EPS = torch.finfo(torch.float32).eps  # the precision of the checkpoints' values


def noise_floor(sigma1: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """σ1·max(m, n)·eps32: an fp32 matrix's singular values below this are rounding noise."""
    return sigma1 * max(shape) * NOISE_EPS


class GramSVD(NamedTuple):
    """x's SVD seen from its smaller side: a = x, or xᵀ when x is tall (`flipped`), in float64;
    a = Q diag(σ) Wᵀ with σ (descending) and Q from the eigendecomposition a aᵀ = Q diag(σ²) Qᵀ.
    Q is a whole orthonormal basis: its columns past the rank span the complement of a's
    column space. σ at the noise floor is 0."""

    a: torch.Tensor
    sigma: torch.Tensor
    q: torch.Tensor
    flipped: bool

    @property
    def rank(self) -> int:
        return int(torch.count_nonzero(self.sigma))

    def top(self, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x's k largest singular triplets (U_k, σ_k, V_kᵀ) above the floor; all when k is None."""
        k = self.rank if k is None else min(k, self.rank)
        left, s = self.q[:, :k], self.sigma[:k]
        right = (left.mT @ self.a).div_(s[:, None])  # a = Q Σ Wᵀ  ⇒  Wᵀ = Σ⁻¹ Qᵀ a
        return (right.mT, s, left.mT) if self.flipped else (left, s, right)


GRAM_BLOCKS = 4


def gram(a: torch.Tensor) -> torch.Tensor:
    """a aᵀ, computed in row blocks with each block above the diagonal mirrored below it: 10 of
    the 16 block products (a single matmul cannot use the symmetry; 2048×5632 in float64: 0.85 s
    against 1.15 s on one core)."""
    step = -(-a.shape[0] // GRAM_BLOCKS)
    rows = a.split(step)
    g = a.new_empty(a.shape[0], a.shape[0])
    for i, top in enumerate(rows):
        for j in range(i, len(rows)):
            block = top @ rows[j].mT
            g[i * step:(i + 1) * step, j * step:(j + 1) * step] = block
            if j > i:
                g[j * step:(j + 1) * step, i * step:(i + 1) * step] = block.mT
    return g


def gram_svd(x: torch.Tensor, floor: float | torch.Tensor = 0.0) -> GramSVD:
    """x's singular values and its smaller side's singular vectors, from an eigh of the smaller
    Gram matrix in float64. σ at or below the noise floor, or below `floor`, is set to 0."""
    flipped = x.shape[0] > x.shape[1]
    a = (x.mT if flipped else x).to(torch.float64)
    sigma, q = spectrum_of_gram(gram(a), x.shape, floor)
    return GramSVD(a, sigma, q, flipped)


def spectrum_of_gram(g: torch.Tensor, shape: torch.Size, floor: float | torch.Tensor = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ descending, Q) of a matrix of `shape` whose smaller Gram matrix g = Q diag(σ²) Qᵀ is
    given; σ at or below the noise floor, or below `floor`, set to 0."""
    eigenvalues, q = torch.linalg.eigh(g)
    sigma = eigenvalues.flip(0).clamp_(min=0).sqrt_()
    sigma[(sigma <= noise_floor(sigma[:1], shape)) | (sigma <= floor)] = 0
    return sigma, q.flip(1)


def top_singular_triplets(x: torch.Tensor, k: int | None = None,
                          floor: float | torch.Tensor = 0.0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x ≈ U_k diag(σ_k) V_kᵀ: the k largest singular triplets (all when k is None), without
    those at the noise floor (or below `floor`). Returns (U_k, σ_k, V_kᵀ) in float64."""
    return gram_svd(x, floor).top(k)


# Below this share of the spectrum, LAPACK's subset solver computes only the eigenvectors wanted
SUBSET_FRACTION = 0.5


def top_eigenpairs(g: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `rank` largest eigenpairs of the symmetric g (values descending, vectors as columns):
    exact, through a full eigh when `rank` is a large share of the spectrum (or off the CPU),
    else only those, by LAPACK's bisection and inverse iteration (2048² at rank 64: 0.4 s
    against 2.1 s for the whole eigh). Modifies g on the CPU path."""
    n = g.shape[0]
    if rank > SUBSET_FRACTION * n or g.device.type != "cpu":
        values, vectors = torch.linalg.eigh(g)
        return values.flip(0)[:rank], vectors.flip(1)[:, :rank]
    import scipy.linalg
    from threadpoolctl import threadpool_limits

    # g is symmetric, so its transpose is the same matrix in the Fortran order LAPACK takes:
    # no copy, and overwritten in place. One BLAS thread: the reduction is memory-bound, and
    # OpenBLAS's spinning threads on a busy machine took 2.2 s where one takes 0.07 (768²)
    with threadpool_limits(1, user_api="blas"):
        values, vectors = scipy.linalg.eigh(g.numpy().T, subset_by_index=[n - rank, n - 1],
                                            driver="evx", overwrite_a=True, check_finite=False)
    return torch.from_numpy(values[::-1].copy()), torch.from_numpy(vectors[:, ::-1].copy())


def randomized_svd(x: torch.Tensor, k: int, *, oversample: int = 10, power_iterations: int = 2,
                   seed: int = 0, dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """APPROXIMATE x ≈ U_k diag(σ_k) V_kᵀ (Halko et al. 2011): Y = (x xᵀ)^q x Ω with Ω a seeded
    Gaussian n×(k+p), Q = orth(Y), then the exact SVD of the small Qᵀx. Computed in `dtype`
    (default: float32, or x's dtype when wider); σ at the noise floor dropped as in the exact
    path. When k + p reaches min(m, n) a sketch saves nothing: the exact triplets are returned."""
    if k + oversample >= min(x.shape):
        u, s, vh = top_singular_triplets(x, k)
        return u.to(_working(x, dtype)), s.to(_working(x, dtype)), vh.to(_working(x, dtype))
    sketch = RangeSketch(x.shape, k, oversample=oversample, power_iterations=power_iterations,
                         seed=seed, dtype=_working(x, dtype), device=x.device)
    for _ in range(sketch.passes):
        sketch.add(0, x)
        sketch.end_pass()
    return sketch.factors()


class RangeSketch:
    """randomized_svd of an m×n matrix x that is read block of rows by block of rows: each of
    its 2 + 2q products with x is one pass over the blocks (`add` each block with its first
    row, then `end_pass`), so x is never whole in memory; only the sketches (m or n by k + p)
    are. The smaller side is sketched, as Halko et al. advise: for a tall x the products
    alternate x·M (a block of rows of the result per block of x) and xᵀ·M (a sum over the
    blocks), for a wide x the other way round; each result but the last is orthonormalized by
    QR and becomes the next M. `exact=True` (for k + p ≥ min(m, n), where a sketch saves
    nothing): one pass adding up the smaller Gram matrix in float64 instead, whose eigenvalues
    are the exact σ² (a wide x must then come as one block: x xᵀ couples all its rows)."""

    def __init__(self, shape, k: int, *, oversample: int = 10, power_iterations: int = 2,
                 seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, exact: bool = False):
        m, n = shape
        self.shape, self.k, self.exact = torch.Size(shape), k, exact
        self.tall = m >= n
        self.passes = 1 if exact else 2 + 2 * power_iterations
        self.step, self.product = 0, None
        if not exact:
            gen = torch.Generator(device=device).manual_seed(seed)
            self.operand = torch.randn(n if self.tall else m, k + oversample, generator=gen,
                                       dtype=dtype, device=device)

    def add(self, start: int, block: torch.Tensor) -> None:
        """Rows start … start + len(block) of x, in this pass."""
        if self.exact:
            if not self.tall and len(block) != self.shape[0]:
                raise ValueError("an exact spectrum of a wide matrix needs all its rows at once")
            a = block.double()
            part = a.mT @ a if self.tall else a @ a.mT
        elif (self.step % 2 == 0) == self.tall:  # x·M: these rows of the product
            if self.product is None:
                self.product = block.new_empty(self.shape[0], self.operand.shape[1],
                                               dtype=self.operand.dtype)
            self.product[start:start + len(block)] = block.to(self.operand.dtype) @ self.operand
            return
        else:  # xᵀ·M: this block's share of the sum
            part = block.to(self.operand.dtype).mT @ self.operand[start:start + len(block)]
        self.product = part if self.product is None else self.product.add_(part)

    def end_pass(self) -> None:
        self.step += 1
        if self.step < self.passes:
            self.operand, self.product = torch.linalg.qr(self.product).Q, None

    def values(self) -> torch.Tensor:
        """The k largest singular values above the noise floor (float64 when exact)."""
        if self.exact:
            sigma = spectrum_of_gram(self.product, self.shape)[0]
            return sigma[:min(self.k, int(torch.count_nonzero(sigma)))]
        s = torch.linalg.svdvals(self.product)
        return s[:self._kept(s)]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_k, σ_k, V_kᵀ): the last product is (Qᵀ·x)ᵀ for a tall x, with Q the last
        operand, and (x·Q) for a wide one, so the SVD of its transpose gives both sides."""
        small_u, s, vh = torch.linalg.svd(self.product.mT, full_matrices=False)
        keep = self._kept(s)
        basis = self.operand @ small_u[:, :keep]
        return (basis, s[:keep], vh[:keep]) if self.tall else (vh[:keep].mT, s[:keep], basis.mT)

    def _kept(self, s: torch.Tensor) -> int:
        return int(torch.count_nonzero(s[:self.k] > noise_floor(s[:1], self.shape)))


def _working(x: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.promote_types(x.dtype, torch.float32)


def select_rank(sigma: torch.Tensor, *, rank: int | None = None, epsilon: float = 0.0,
                energy: float | None = None, total: float | torch.Tensor | None = None) -> int:
    """The number of leading singular values kept: at most `rank`, only those above `epsilon`,
    and the fewest whose squares reach `energy`·total (total: Σσ², or ‖x‖_F² when `sigma` is a
    truncated spectrum). Every criterion given applies; the smallest k wins."""
    k = len(sigma) if rank is None else min(rank, len(sigma))
    k = min(k, int(torch.count_nonzero(sigma > epsilon)))
    if energy is not None:
        squares = sigma.double().square()
        total = squares.sum() if total is None else torch.as_tensor(total, dtype=torch.float64)
        # the smallest k with Σ_{≤k} σ² ≥ e·total (a relative slack absorbs the sum's rounding)
        reached = squares.cumsum(0) >= energy * total * (1 - 1e-12)
        k = min(k, int(reached.int().argmax()) + 1 if reached.any() else len(sigma))
    return k


def kept_energy(sigma: torch.Tensor, k: int, total: float | torch.Tensor | None = None) -> float:
    """Σ_{≤k} σ² / total (default total: Σσ²): the share of ‖x‖_F² a rank-k truncation keeps."""
    squares = sigma.double().square()
    total = squares.sum() if total is None else torch.as_tensor(total, dtype=torch.float64)
    return float(squares[:k].sum() / total) if total > 0 else 1.0
