"""Permutohedral-lattice Gaussian filter: torch products, built by compiled code on the CPU.

This is the lattice of Adams, Baek & Davis (2010) exactly as Krähenbühl's
densecrf v2.2 (the C++ code behind ``pydensecrf``) builds and applies it, so
that a filter here reproduces ``pydensecrf`` to float32 round-off. It
approximates the dense Gaussian filter

    out_i = sum_j exp(-1/2 |f_i - f_j|^2) v_j

over features ``f`` that are already divided by their bandwidths (see
:func:`segrefine.crf.exact.exact_gaussian_filter` for the exact, O(N^2)
version). The approximation is coarse: ``K @ 1`` differs from the exact sum by
tens of percent per pixel (more in 5-D than in 2-D); it is the filter the dense
CRF literature actually uses.

Building (:class:`PermutohedralLattice` constructor) depends only on the
features. It is done once, with host synchronisation allowed (sort, sizes);
applying the filter afterwards (:meth:`PermutohedralLattice.filter`) is a fixed
sequence of index-based sparse products with no data-dependent shapes and no
host synchronisation, so it can be reused for the normalisation, every
mean-field iteration and all classes.

On the CPU the build is :mod:`segrefine.crf.cpu_lattice` (densecrf's per-pixel
loop and hash table, compiled with numba, threaded). Elsewhere, and with
``build="torch"``, it is done here in torch ops, as follows; both give the same
lattice.

The torch build follows densecrf step by step (elevation, rounding, ranking,
barycentric weights, enclosing simplex) for all pixels at once.
Lattice keys are packed into int64 (mixed radix, batch index most
significant); pixels are first grouped by simplex (one sort), the ``d+1``
vertex keys of each distinct simplex deduplicated (a second sort), the splat
rows listed by expanding each (point, simplex vertex) entry into that
simplex's pixels (no sort), and the blur neighbours found by sorting the
points along each axis's lattice lines (``d+1`` sorts of ``M`` keys) instead
of hash lookups. Index arithmetic is int32 when sizes allow.

Splat, each blur step and slice are linear maps stored as precomputed
index/weight "bags" (CSR rows):

* splat  ``(M, N)``: per lattice point, the pixels that touch it and their
  barycentric weights;
* blur along axis ``j`` ``(M, M)``: per lattice point, itself (weight 1) and
  its existing neighbours ``key ∓ (1, ..., 1) ± (d+1) e_j`` (weight 1/2). This
  matrix is symmetric;
* slice ``(N, M)``: per pixel, its ``d+1`` enclosing vertices with weights
  ``alpha * barycentric``, ``alpha = 1 / (1 + 2^-d)``.

On CPU the products run through ``torch.nn.functional.embedding_bag`` (an
optimised gather-weighted-sum); elsewhere through ``index_select`` /
``index_add_``. Each product is a custom autograd function whose backward is
the transposed product, so gradients w.r.t. the filtered values are exact
(the whole filter is linear in the values). Gradients w.r.t. the features are
not provided: the features are treated as constants.

Images of a batch never interact: the batch index is part of every lattice
key, so each image gets its own disjoint set of lattice points.

Memory, per image of ``N`` pixels with ``d``-dimensional features and ``M``
lattice points (``M`` is ~1-3 % of ``N (d+1)`` for natural photographs with
the usual bilateral bandwidths, up to ~30 % for pure noise), with int32
indices:

* slice and splat (the same ``N (d+1)`` pairs stored pixel-major and
  point-major, each with its index, barycentric weight and alpha-scaled
  weight): ``24 N (d+1)`` bytes, plus ``4 (N + M)`` bytes of offsets (and
  ``4 N (d+1)`` more for the ``index`` backend);
* blur: ``(d+1)`` axes x ``3 M`` (int32 index + float32 weight) =
  ``24 M (d+1)`` bytes, plus ``12 M`` bytes for the packed keys/offsets;
* a normalised kernel made with :meth:`PermutohedralLattice.scaled` adds its
  own ``16 N (d+1)`` bytes of weights (the indices are shared; ``8 N (d+1)``
  with ``transposes=False``); :meth:`PermutohedralLattice.scale_`, which the
  mean field uses, scales in place and adds nothing;
* ``transposes=False`` (inference only) keeps one weight array per
  direction: ``16 N (d+1)`` bytes for splat and slice instead of 24;
* temporaries while building: about ``100 N (d+1)`` bytes with the torch build,
  about ``8 N (d+1) + 20 N`` with the compiled CPU build, freed afterwards;
* while filtering ``C`` channels: a few ``M x C`` buffers plus the output.

For a 500x375 RGB image (``d = 5``) that is ~30 MB for the bilateral kernel.
Nothing is ``N x N``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .limits import EXACT_LIMIT, features_too_large

__all__ = ["PermutohedralLattice"]

# simplexes are sorted by one packed int64 key when its range is below this,
# else by two stable sorts (vertex key, then permutation code)
_SINGLE_KEY_LIMIT = 2**62
# pixels per chunk of the per-pixel build steps (their temporaries are ~200
# bytes per pixel for 5-D features)
_CHUNK = 2**17
# splat entries per chunk when scaling them in place: the gathered factors (256 KiB) stay a
# small temporary next to the N (d+1) weights they scale
_SCALE_CHUNK = 2**16


# --------------------------------------------------------------------------
# Sparse "bag" products (CSR rows) with exact transposed backward
# --------------------------------------------------------------------------


@dataclass
class _Bags:
    """A sparse matrix ``A (num_rows x num_cols)`` stored as CSR rows.

    ``indices[offsets[r]:offsets[r+1]]`` are the columns of row ``r`` and
    ``weights`` the matching values (flat tensors, ``None`` = all ones;
    ``offsets`` has ``num_rows + 1`` entries). ``width`` is set when every
    row has that many entries. ``rows`` (the row of each entry) is only kept
    for variable-width bags under the ``index`` backend.
    """

    indices: Tensor
    offsets: Tensor
    weights: Tensor | None
    rows: Tensor | None
    num_rows: int
    num_cols: int
    width: int | None = None

    def reweighted(self, weights: Tensor) -> "_Bags":
        return _Bags(self.indices, self.offsets, weights, self.rows, self.num_rows, self.num_cols, self.width)

    def compact(self) -> "_Bags":
        """int32 indices/offsets when they fit (half the memory)."""
        limit = 2**31 - 1
        if max(self.num_cols, self.indices.numel(), self.num_rows) >= limit:
            return self.wide()
        i32 = torch.int32
        rows = None if self.rows is None else self.rows.to(i32)
        return _Bags(self.indices.to(i32), self.offsets.to(i32), self.weights, rows, self.num_rows, self.num_cols, self.width)

    def wide(self) -> "_Bags":
        i64 = torch.int64
        rows = None if self.rows is None else self.rows.to(i64)
        return _Bags(self.indices.to(i64), self.offsets.to(i64), self.weights, rows, self.num_rows, self.num_cols, self.width)

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.indices, self.offsets, self.weights, self.rows) if t is not None]


def _weights_as(w: Tensor | None, dtype: torch.dtype, cache: dict) -> Tensor | None:
    if w is None or w.dtype == dtype:
        return w
    key = (id(w), dtype)
    hit = cache.get(key)
    if hit is None or hit[0] is not w:
        hit = (w, w.to(dtype))
        cache[key] = hit
    return hit[1]


def _apply_bags(x: Tensor, bags: _Bags, backend: str, cache: dict) -> Tensor:
    """``A @ x`` for ``x (num_cols, C)`` -> ``(num_rows, C)``."""
    w = _weights_as(bags.weights, x.dtype, cache)
    if backend == "embedding_bag":
        return F.embedding_bag(
            bags.indices, x, bags.offsets, per_sample_weights=w, mode="sum", include_last_offset=True
        )
    # generic: gather + weighted sum / scatter-add (any device, no host sync)
    contrib = x.index_select(0, bags.indices)
    if w is not None:
        contrib = contrib * w.unsqueeze(1)
    if bags.width is not None:
        return contrib.view(bags.num_rows, bags.width, -1).sum(1)
    out = x.new_zeros(bags.num_rows, x.shape[1])
    return out.index_add_(0, bags.rows, contrib)


def _repeat_bags(b: _Bags, k: int) -> _Bags:
    """Block-diagonal ``diag(A, A, ..., A)`` (k blocks)."""
    ar = torch.arange(k, device=b.indices.device).unsqueeze(1)
    b = b.wide()
    nnz = b.indices.numel()
    idx = (b.indices.unsqueeze(0) + ar * b.num_cols).reshape(-1)
    offsets = torch.cat([(b.offsets[:-1].unsqueeze(0) + ar * nnz).reshape(-1), b.offsets[-1:] + (k - 1) * nnz])
    rows = None if b.rows is None else (b.rows.unsqueeze(0) + ar * b.num_rows).reshape(-1)
    w = None if b.weights is None else b.weights.repeat(k)
    return _Bags(idx, offsets, w, rows, b.num_rows * k, b.num_cols * k, b.width).compact()


class _BagProduct(torch.autograd.Function):
    """``y = A x`` with ``A`` given as bags; the backward is ``A^T g``, with
    ``A^T`` given as its own bags (so double backward works too)."""

    @staticmethod
    def forward(ctx, x, fwd, bwd, backend, cache):  # type: ignore[override]
        ctx.fwd, ctx.bwd, ctx.backend, ctx.cache = fwd, bwd, backend, cache
        return _apply_bags(x, fwd, backend, cache)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        gx = _BagProduct.apply(g.contiguous(), ctx.bwd, ctx.fwd, ctx.backend, ctx.cache)
        return gx, None, None, None, None


def _elevate(f: Tensor, d: int) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 1-5 of the build for pixels ``f (n, d)`` float32, independently
    per pixel (so they can run in chunks): ``q (d, n)`` float (exact small
    integers, rem0 / (d+1)), ``code (n,)`` int64 (the permutation pos[:d] in
    base d+1) and ``bary (n, d+1)`` float32 barycentric weights."""
    d1 = d + 1
    n = f.shape[0]
    dev = f.device
    i64, i32, f32 = torch.int64, torch.int32, torch.float32
    fT = f.t().contiguous()  # (d, n): coordinate-major, contiguous rows

    # 1. scale factors, exactly as densecrf computes them (double -> float)
    inv_std_dev = np.float32(math.sqrt(2.0 / 3.0) * d1)
    scale = [float(np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * float(inv_std_dev))) for i in range(d)]
    down = float(np.float32(1.0) / np.float32(d1))

    # 2. elevate: e_j = sum_{k>=j} c_k - j c_{j-1}, same float op order as C++
    E = torch.empty(d1, n, dtype=f32, device=dev)
    sm = torch.zeros(n, dtype=f32, device=dev)
    for j in range(d, 0, -1):
        cf = fT[j - 1] * scale[j - 1]
        torch.sub(sm, cf * float(j), out=E[j])
        sm += cf
    E[0] = sm
    del sm, cf, fT
    if bool((E.abs() >= EXACT_LIMIT).any()):  # build-time sync
        raise features_too_large(float(f.abs().max()))

    # 3. nearest remainder-0 point: round(e * float(1/(d+1))), half to even
    v = torch.mul(E, down).round_()  # rem0 = (d+1) v

    # 4. rank = position in a stable descending sort of delta = e - rem0
    #    (ties: the earlier coordinate counts as larger), then shifted by
    #    sum(v) and wrapped into [0, d] (moving rem0 by -+(d+1))
    delta = torch.sub(E, v, alpha=d1)  # exact: e and rem0 are close
    rank = torch.arange(d1, dtype=i32, device=dev).unsqueeze(1).repeat(1, n)
    for i in range(d):
        for j in range(i + 1, d1):
            c = (delta[i] < delta[j]).to(i32)
            rank[i] += c
            rank[j] -= c
    del delta, c
    rank += v.sum(0).to(i32)  # exact small integers
    shift = (rank < 0).to(i32)
    shift -= (rank > d).to(i32)
    rank.add_(shift, alpha=d1)
    v += shift
    del shift

    # 5. barycentric weights, pixel-major (n, d1): with g[d - rank_i] =
    #    (e_i - rem0_i) / (d+1): b[k] = g[k] - g[k-1], b[0] = g[0] + (1 - g[d])
    pos = d - rank.to(i64)  # (d1, n) sorted position of each coordinate
    del rank
    bv = torch.sub(E, v, alpha=d1).mul_(down)
    del E
    g = torch.empty(n, d1, dtype=f32, device=dev)
    g.scatter_(1, pos.t(), bv.t())
    del bv
    bary = torch.empty_like(g)
    torch.sub(g[:, 1:], g[:, :-1], out=bary[:, 1:])
    bary[:, 0] = g[:, 0] + (1.0 - g[:, d])
    del g
    code = torch.zeros(n, dtype=i64, device=dev)
    for i in range(d):
        code.add_(pos[i], alpha=d1**i)
    return v[:d], code, bary


# --------------------------------------------------------------------------
# Build steps 6-10 (all pixels at once). Hot paths use index_select / scatter_
# / cumsum rather than advanced indexing or boolean masks, which are several
# times slower on CPU. Callers drop each step's inputs once it returns.
# --------------------------------------------------------------------------


def _elevate_pixels(f: Tensor, d: int) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 1-5 (:func:`_elevate`) for all pixels ``f (BN, d)``, in chunks of ``_CHUNK``
    pixels (bounded temporaries): ``q (d, BN)``, ``code (BN,)``, ``bary (BN, d+1)``."""
    BN, dev = f.shape[0], f.device
    q = torch.empty(d, BN, dtype=torch.float32, device=dev)
    code = torch.empty(BN, dtype=torch.int64, device=dev)
    bary = torch.empty(BN, d + 1, dtype=torch.float32, device=dev)
    for a in range(0, BN, _CHUNK):
        qc, cc, bc = _elevate(f[a : a + _CHUNK], d)
        q[:, a : a + _CHUNK] = qc
        code[a : a + _CHUNK] = cc
        bary[a : a + _CHUNK] = bc
        del qc, cc, bc
    return q, code, bary


@dataclass
class _KeyBox:
    """The int64 packing of lattice keys: mixed radix over the box of vertex coordinates
    (coordinate 0 least significant), the batch index most significant.

    Vertex coordinate ``i`` lies in ``[(d+1) qlo_i - d, (d+1) qhi_i + d]``; the radix has
    ``d`` more values of margin so that a packed difference equal to a blur step implies
    that coordinate difference (step 10)."""

    qlo: list[int]
    vstrides: list[int]
    size: int  # one image's key range: prod(vradix)
    batch: int

    @classmethod
    def around(cls, q: Tensor, batch: int) -> "_KeyBox":
        d = q.shape[0]
        d1 = d + 1
        qlo = [int(x) for x in q.amin(1).tolist()]  # build-time sync
        qhi = [int(x) for x in q.amax(1).tolist()]
        vradix = [d1 * (h - l) + 3 * d + 1 for l, h in zip(qlo, qhi)]
        vstrides = []
        size = 1
        for r in vradix:
            vstrides.append(size)
            size *= r
        if size * batch >= 2**62:
            raise OverflowError(
                "lattice key range too large for int64 packing "
                f"(vertex coordinate ranges {vradix}, batch {batch}); use larger bandwidths "
                "or filter fewer images at once"
            )
        return cls(qlo, vstrides, size, batch)

    @property
    def dim(self) -> int:
        return len(self.vstrides)

    @property
    def ones(self) -> int:
        """The packed ``(1, ..., 1)``."""
        return sum(self.vstrides)

    @property
    def code_radix(self) -> int:
        """Permutation codes (``pos[:d]`` in base ``d+1``) lie in ``[0, code_radix)``."""
        return (self.dim + 1) ** self.dim


def _vertex0_keys(q: Tensor, box: _KeyBox, Np: int) -> Tensor:
    """Step 6a: the packed key of each pixel's simplex vertex 0 (``key_i - lo_i = (d+1)(q_i -
    qlo_i) + d``), the image index (pixels ``b * Np ...``) most significant: ``(BN,)`` int64."""
    d, BN = q.shape
    d1 = d + 1
    vkey = torch.zeros(BN, dtype=torch.int64, device=q.device)
    for i in range(d):
        vkey.add_(q[i].to(torch.int64), alpha=d1 * box.vstrides[i])
    vkey -= sum(d1 * box.vstrides[i] * box.qlo[i] for i in range(d))
    if box.batch > 1:
        vkey.add_(torch.arange(box.batch, device=q.device).repeat_interleave(Np), alpha=box.size)
    return vkey


def _sort_by_simplex(vkey: Tensor, code: Tensor, box: _KeyBox) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Step 6b: simplexes. ``(rem0[:d] / (d+1), rank[:d])`` identify the d+1 vertices: sort
    the pixels by simplex, by vertex 0's key then by the permutation ``code``.

    Returns ``perm_pix`` (pixels in simplex order), ``sid_sorted`` (simplex of each pixel in
    that order), ``sid`` (simplex of each pixel), and per simplex ``vbase`` (vertex 0's key)
    and ``code_rep`` (its code). Overwrites ``vkey``."""
    BN, dev = vkey.numel(), vkey.device
    code_radix = box.code_radix
    if box.size * box.batch * code_radix < _SINGLE_KEY_LIMIT:  # one key: (vertex 0, code)
        skey = vkey.mul_(code_radix).add_(code)
        skey_sorted, perm_pix = torch.sort(skey, stable=True)
        del skey
        s_new = torch.ones(BN, dtype=torch.bool, device=dev)
        torch.ne(skey_sorted[1:], skey_sorted[:-1], out=s_new[1:])
        s_first = s_new.nonzero().squeeze(1)  # (S,) first sorted position; sync
        skey_rep = skey_sorted.index_select(0, s_first)
        del skey_sorted
        vbase = torch.div(skey_rep, code_radix, rounding_mode="floor")
        code_rep = skey_rep.remainder_(code_radix)
    else:  # high d: lexicographic (vertex 0, code) by two stable sorts
        code_sorted, perm_pix = torch.sort(code, stable=True)
        vkey_sorted, perm2 = torch.sort(vkey.index_select(0, perm_pix), stable=True)
        perm_pix = perm_pix.index_select(0, perm2)
        code_sorted = code_sorted.index_select(0, perm2)
        del perm2
        s_new = torch.ones(BN, dtype=torch.bool, device=dev)
        torch.ne(vkey_sorted[1:], vkey_sorted[:-1], out=s_new[1:])
        s_new[1:] |= code_sorted[1:] != code_sorted[:-1]
        s_first = s_new.nonzero().squeeze(1)
        vbase = vkey_sorted.index_select(0, s_first)
        code_rep = code_sorted.index_select(0, s_first)
        del vkey_sorted, code_sorted
    del s_first
    sdt = torch.int32 if BN < 2**31 else torch.int64  # simplex ids: S <= BN
    sid_sorted = torch.cumsum(s_new, 0, dtype=sdt).sub_(1)  # simplex of each pixel, simplex order
    del s_new
    sid = torch.empty(BN, dtype=sdt, device=dev).scatter_(0, perm_pix, sid_sorted)  # simplex of each pixel
    return perm_pix, sid_sorted, sid, vbase, code_rep


def _simplex_vertex_keys(vbase: Tensor, code_rep: Tensor, box: _KeyBox) -> Tensor:
    """Step 7: the packed keys of each simplex's vertices, ``(d+1, S)`` r-major:
    ``key^r = key^0 + r (1,...,1) - (d+1) sum_{i: pos_i < r} e_i``. Overwrites ``vbase``."""
    d, S, dev = box.dim, vbase.numel(), vbase.device
    d1, ones = d + 1, box.ones
    vbase += d * ones
    posr = torch.empty(d, S, dtype=torch.int64, device=dev)
    for i in range(d):
        torch.remainder(code_rep, d1, out=posr[i])
        code_rep = torch.div(code_rep, d1, rounding_mode="floor")
    del code_rep
    s_sorted = torch.zeros(d1, S, dtype=torch.int64, device=dev)  # stride of the coordinate at sorted position p
    s_sorted.scatter_(0, posr, torch.tensor(box.vstrides, dtype=torch.int64, device=dev).unsqueeze(1).expand(d, S))
    del posr
    keys = torch.empty(d1, S, dtype=torch.int64, device=dev)
    keys[0] = vbase
    run = torch.zeros(S, dtype=torch.int64, device=dev)
    for r in range(1, d1):
        run += s_sorted[r - 1]
        torch.add(vbase, run, alpha=-d1, out=keys[r])
        keys[r] += r * ones
    return keys


@dataclass
class _LatticePoints:
    """Step 8's result. Entry ``e = r * S + s`` is vertex ``r`` of simplex ``s``; entries are
    sorted by key, so those of one lattice point are contiguous."""

    num_points: int  # M
    num_simplexes: int  # S
    unique_keys: Tensor  # (M,) int64 packed keys, ascending
    perm_e: Tensor  # (SE,) idt: the entry at each sorted position
    first_e: Tensor  # (M,) int64: the first sorted position of each point
    point_of_e: Tensor | None  # (SE,) idt: the point at each sorted position (index backend only)
    idt: torch.dtype


def _lattice_points(keys: Tensor, idt: torch.dtype, keep_point_of_entry: bool) -> tuple[_LatticePoints, Tensor]:
    """Step 8: deduplicate the simplex vertices ``keys (d+1, S)`` into lattice points (one
    sort), and the point of each vertex, ``(d+1, S)``. ``idt``: the index dtype, widened to
    int64 if the points need it."""
    d1, S = keys.shape
    SE, dev = d1 * S, keys.device
    keys_sorted, perm_e = torch.sort(keys.view(-1), stable=True)
    v_new = torch.ones(SE, dtype=torch.bool, device=dev)
    torch.ne(keys_sorted[1:], keys_sorted[:-1], out=v_new[1:])
    point_of_e = torch.cumsum(v_new, 0) - 1  # sorted entry -> lattice point
    M = int(point_of_e[-1].item()) + 1  # sync
    first_e = v_new.nonzero().squeeze(1)  # (M,) first sorted entry of each point
    del v_new
    unique_keys = torch.empty(M, dtype=torch.int64, device=dev).scatter_(0, point_of_e, keys_sorted)
    del keys_sorted
    idt = idt if M < 2**31 else torch.int64
    svid = torch.empty(SE, dtype=idt, device=dev).scatter_(0, perm_e, point_of_e.to(idt))  # entry -> point
    # keep only what the later steps need, in idt (the int64 copies are the build's largest arrays)
    points = _LatticePoints(M, S, unique_keys, perm_e.to(idt), first_e,
                            point_of_e.to(idt) if keep_point_of_entry else None, idt)
    return points, svid.view(d1, S)


def _drop_phantoms(vid: Tensor, bary: Tensor, perm_pix: Tensor, sid_sorted: Tensor, B: int, Np: int, N: int):
    """Step 9: drop the phantom pixels (the last ``Np - N`` of each image); their lattice
    points stay. Pixel ``b * Np + i`` becomes ``b * N + i``."""
    d1 = vid.shape[1]
    vid = vid.view(B, Np, d1)[:, :N]
    bary = bary.view(B, Np, d1)[:, :N]
    real = (perm_pix.remainder(Np) < N).nonzero().squeeze(1)
    perm_pix = perm_pix.index_select(0, real)
    sid_sorted = sid_sorted.index_select(0, real)
    perm_pix -= torch.div(perm_pix, Np, rounding_mode="floor") * (Np - N)
    return vid, bary, perm_pix, sid_sorted


@dataclass
class _SplatRows:
    """Per lattice point, the (pixel, weight) pairs that splat onto it, as CSR rows."""

    pixels: Tensor
    offsets: Tensor
    weights: Tensor
    rows: Tensor | None  # the point of each pair (index backend only)


def _splat_rows(points: _LatticePoints, perm_pix: Tensor, sid_sorted: Tensor, bary: Tensor) -> _SplatRows:
    """Step 9: the splat rows (point -> the pixels that touch it, with their barycentric
    weights ``bary``, flat pixel-major). No sort: walking the sorted entries (point-major)
    and expanding each entry (r, s) into the pixels of simplex s (contiguous in simplex
    order, ``perm_pix``) lists every (pixel, r) pair grouped by point."""
    idt, S, dev = points.idt, points.num_simplexes, perm_pix.device
    total = bary.numel()
    d1 = total // perm_pix.numel()
    # all index arithmetic below in idt (int32 when sizes allow: half the memory traffic)
    cnt = torch.bincount(sid_sorted, minlength=S).to(idt)  # real pixels per simplex
    e_s = points.perm_e.remainder(S)  # simplex of each sorted entry
    lens = cnt.index_select(0, e_s)
    out_start = torch.cumsum(lens, 0, dtype=idt).sub_(lens)  # first pair of each sorted entry
    # pair q of sorted entry k is pixel perm_pix[start(s_k) + q - out_start_k]
    shift = torch.cumsum(cnt, 0, dtype=idt).sub_(cnt).index_select(0, e_s).sub_(out_start)
    del cnt, e_s
    rep = torch.repeat_interleave(lens, output_size=total)  # sorted entry of each pair
    del lens
    src = torch.arange(total, dtype=idt, device=dev).add_(shift.index_select(0, rep))
    del shift
    sp_pix = perm_pix.to(idt).index_select(0, src)
    del src
    sp_r = torch.div(points.perm_e, S, rounding_mode="floor").index_select(0, rep)  # vertex r of each pair
    sp_w = bary.index_select(0, sp_r.add_(sp_pix * d1))
    del sp_r
    sp_off = torch.cat([out_start.index_select(0, points.first_e), out_start.new_full((1,), total)])
    sp_rows = None if points.point_of_e is None else points.point_of_e.index_select(0, rep)
    return _SplatRows(sp_pix, sp_off, sp_w, sp_rows)


def _blur_bags(unique_keys: Tensor, box: _KeyBox) -> list[_Bags]:
    """Step 10: the blur along each axis ``j`` as fixed-width bags (self, n1, n2) with
    weights (1, 1/2, 1/2). ``u`` and ``u'`` are neighbours iff ``P(u') - P(u) = delta_j``
    (the packing is injective on the key box). Sorting by ``(P mod |delta|, P div |delta|)``
    makes every line of the axis contiguous, so neighbours are adjacent in that order. A
    missing neighbour points at the point itself with weight 0, which keeps the matrix
    exactly symmetric."""
    d, M, dev = box.dim, unique_keys.numel(), unique_keys.device
    d1, ones = d + 1, box.ones
    deltas = [d1 * box.vstrides[j] - ones for j in range(d)] + [-ones]
    pmax = int(unique_keys[-1].item())
    comp = torch.empty(d1, M, dtype=torch.int64, device=dev)
    for j, dj in enumerate(deltas):
        a = abs(dj)
        qmax = pmax // a + 2
        if a * qmax >= 2**62:
            raise OverflowError("lattice key range too large for int64 packing")
        torch.remainder(unique_keys, a, out=comp[j])
        comp[j] *= qmax
        comp[j] += torch.div(unique_keys, a, rounding_mode="floor")
    comp_sorted, order = torch.sort(comp, dim=1)
    del comp
    adjacent = (comp_sorted[:, 1:] - comp_sorted[:, :-1]) == 1  # (d1, M-1)
    del comp_sorted
    blur = []
    ar = torch.arange(M, device=dev)
    blur_off = torch.arange(0, 3 * M + 1, 3, dtype=torch.int32 if 3 * M < 2**31 else torch.int64, device=dev)
    for j in range(d1):
        pairs = adjacent[j].nonzero().squeeze(1)
        a_idx = order[j].index_select(0, pairs)
        b_idx = order[j].index_select(0, pairs + 1)
        nb = ar.unsqueeze(1).repeat(1, 3)
        w = torch.zeros(M, 3, dtype=torch.float32, device=dev)
        w[:, 0] = 1.0
        nb[:, 1].index_copy_(0, a_idx, b_idx)
        w[:, 1].index_fill_(0, a_idx, 0.5)
        nb[:, 2].index_copy_(0, b_idx, a_idx)
        w[:, 2].index_fill_(0, b_idx, 0.5)
        blur.append(_Bags(nb.view(-1).to(blur_off.dtype), blur_off, w.view(-1), None, M, M, 3))
    return blur


# --------------------------------------------------------------------------
# Lattice
# --------------------------------------------------------------------------


class PermutohedralLattice:
    """Permutohedral lattice over ``features`` (densecrf v2.2 semantics).

    Args:
        features: ``(B, N, d)`` or ``(N, d)`` features already divided by
            their widths (e.g. ``(x/sxy, y/sxy, r/schan, g/schan, b/schan)``). They
            are detached and the geometry is computed in float32 (as
            densecrf does), whatever their dtype. Images of the batch are
            independent.
        backend: ``"auto"`` (``embedding_bag`` on CPU, ``index`` elsewhere),
            ``"embedding_bag"`` or ``"index"``.
        densecrf_padding: reproduce a quirk of densecrf's (SSE) lattice
            build, which processes pixels in blocks of 4: when ``N`` is not a
            multiple of 4, the zero-padded phantom features of the last block
            add the vertices of the simplex around the origin to the lattice.
            They receive no value and are never sliced, but take part in the
            blur, which changes results near feature 0 (e.g. dark pixels near
            the top-left corner) by up to ~1e-3. Default True (parity with
            ``pydensecrf``); False gives the plain lattice.
        build: ``"auto"`` (on CPU the compiled hash-table build of
            :mod:`segrefine.crf.cpu_lattice`, elsewhere the torch build),
            ``"compiled"`` or ``"torch"`` (the sort-based build in torch ops,
            on any device: the reference the compiled one is tested against).
            Both give the same lattice; only the numbering of its points
            differs.
        transposes: keep the transposed splat/slice products, which the
            backward pass and ``filter(transpose=True)`` need. False (for
            inference only, e.g. :func:`segrefine.crf.dense_crf`) stores
            about a third less; asking such a lattice for a gradient or a
            transposed filter raises ``RuntimeError``.

    The filter itself (:meth:`filter`) works in the dtype of the values
    (float32 or float64) and is differentiable w.r.t. them.

    Attributes:
        batch, num_pixels (per image), dim (``d``), num_points (``M``, all
        images together).
    """

    def __init__(
        self,
        features: Tensor,
        *,
        backend: str = "auto",
        densecrf_padding: bool = True,
        transposes: bool = True,
        build: str = "auto",
    ) -> None:
        if features.dim() == 2:
            features = features.unsqueeze(0)
        elif features.dim() != 3:
            raise ValueError(f"features must be (N, d) or (B, N, d), got shape {tuple(features.shape)}")
        B, N, d = features.shape
        if d < 1:
            raise ValueError("features need at least one dimension (d >= 1)")
        if N < 1 or B < 1:
            raise ValueError(f"empty features: shape {tuple(features.shape)}")
        if backend == "auto":
            backend = "embedding_bag" if features.device.type == "cpu" else "index"
        if backend not in ("embedding_bag", "index"):
            raise ValueError(f"backend must be 'auto', 'embedding_bag' or 'index', got {backend!r}")
        if build not in ("auto", "compiled", "torch"):
            raise ValueError(f"build must be 'auto', 'compiled' or 'torch', got {build!r}")
        if build == "compiled" and features.device.type != "cpu":
            raise ValueError(f"build='compiled' runs on the CPU only; features are on {features.device}")
        self.backend = backend
        self.batch, self.num_pixels, self.dim = B, N, d
        self.device = features.device
        self.transposes = transposes
        self._cache: dict = {}
        self._ones: Tensor | None = None
        self.alpha = float(np.float32(1.0) / (np.float32(1.0) + np.float32(2.0) ** np.float32(-d)))
        f = features.detach().to(torch.float32)
        compiled = self.device.type == "cpu" and build != "torch"
        if not compiled and not bool(torch.isfinite(f).all()):  # build-time sync
            raise ValueError("features contain NaN or infinite values")
        # densecrf's SSE build processes pixels in blocks of 4, zero-padding
        # the last block; the padded "phantom" features (all zero) insert
        # their simplex's vertices into the lattice. They get no splat and
        # are never sliced, but those extra points take part in the blur.
        pad = (-N) % 4 if densecrf_padding else 0
        if pad:
            f = torch.cat([f, f.new_zeros(B, pad, d)], 1)
        with torch.no_grad():
            if not (compiled and self._build_compiled(f.contiguous(), N, fallback=build == "auto")):
                self._build(f.reshape(B * (N + pad), d).contiguous(), N + pad)

    # ------------------------------------------------------------------
    def _build_compiled(self, f: Tensor, N: int, fallback: bool) -> bool:
        """The CPU build (:mod:`segrefine.crf.cpu_lattice`, compiled, hash-based) on ``f (B, Np,
        d)``, with torch's intra-op thread count; False when its int64 key packing does not fit
        and ``fallback`` allows the torch build to try (it packs differently)."""
        from . import cpu_lattice  # numba loads on first use, not with segrefine.crf

        try:
            out = cpu_lattice.build(f.numpy(), N, torch.get_num_threads(), np.float32(self.alpha))
        except OverflowError:
            if fallback:
                return False
            raise
        self._ones = torch.from_numpy(out.ones)
        d1 = self.dim + 1
        M = self.num_points = out.num_points
        self.unique_keys = None
        vid = torch.from_numpy(out.vid).view(-1)
        bary = torch.from_numpy(out.bary).view(-1)
        offsets = torch.from_numpy(out.splat_offsets)
        rows = None
        if self.backend == "index":
            rows = torch.repeat_interleave(torch.arange(M, dtype=torch.int32), offsets.diff(), output_size=vid.numel())
        splat = _SplatRows(torch.from_numpy(out.splat_pixels), offsets, torch.from_numpy(out.splat_weights), rows)
        self._set_splat_slice(vid, bary, splat)
        blur_off = torch.arange(0, 3 * M + 1, 3, dtype=torch.int32 if 3 * M < 2**31 else torch.int64)
        nb, w = torch.from_numpy(out.blur_nb), torch.from_numpy(out.blur_w)
        self._blur = [_Bags(nb[j].reshape(-1), blur_off, w[j].reshape(-1), None, M, M, 3) for j in range(d1)]
        return True

    # ------------------------------------------------------------------
    def _build(self, f: Tensor, Np: int) -> None:
        """The build, densecrf's steps in order, on ``f (B * Np, d)`` float32 (``Np >= N``
        includes the phantom padding pixels). Each step's temporaries are dropped as soon as
        no later step needs them: the build's peak memory is several times the lattice's."""
        B, N, d = self.batch, self.num_pixels, self.dim
        q, code, bary = _elevate_pixels(f, d)  # 1-5
        del f
        box = _KeyBox.around(q, B)
        vkey = _vertex0_keys(q, box, Np)  # 6
        del q
        perm_pix, sid_sorted, sid, vbase, code_rep = _sort_by_simplex(vkey, code, box)
        del vkey, code
        keys = _simplex_vertex_keys(vbase, code_rep, box)  # 7
        del vbase, code_rep
        idt = torch.int32 if B * N * (d + 1) < 2**31 else torch.int64  # index dtype (capped by M below)
        points, svid = _lattice_points(keys, idt, keep_point_of_entry=self.backend == "index")  # 8
        del keys
        self.num_points = points.num_points
        self.unique_keys = points.unique_keys
        vid = svid.t().contiguous().index_select(0, sid)  # 9: slice rows, the point of (pixel, r)
        del svid, sid
        if Np != N:
            vid, bary, perm_pix, sid_sorted = _drop_phantoms(vid, bary, perm_pix, sid_sorted, B, Np, N)
        vid = vid.reshape(-1)
        bary = bary.reshape(-1).contiguous()
        splat = _splat_rows(points, perm_pix, sid_sorted, bary)
        del perm_pix, sid_sorted, points
        self._set_splat_slice(vid, bary, splat)
        del vid, bary, splat
        self._blur = _blur_bags(self.unique_keys, box)  # 10

    def _set_splat_slice(self, vid: Tensor, bary: Tensor, splat: "_SplatRows") -> None:
        """The splat and slice products (forward and, with ``transposes``, transposed) from the
        pixel-major rows (``vid``, ``bary``: each pixel's d+1 points and weights) and the
        point-major rows ``splat``. Slicing scales by ``alpha = 1 / (1 + 2^-d)``, as densecrf."""
        d1 = self.dim + 1
        BN, M = self.batch * self.num_pixels, self.num_points
        alpha = self.alpha
        pix_off = torch.arange(0, BN * d1 + 1, d1, dtype=torch.int32 if BN * d1 < 2**31 else torch.int64,
                               device=vid.device)
        pix = _Bags(vid, pix_off, bary, None, BN, M, d1).compact()  # splat^T
        pts = _Bags(splat.pixels, splat.offsets, splat.weights, splat.rows, M, BN).compact()  # splat
        # (forward, transposed) bags of each stage
        if self.transposes:
            self._splat_f, self._splat_b = pts, pix
            self._slice_f, self._slice_b = pix.reweighted(bary * alpha), pts.reweighted(splat.weights * alpha)
        else:  # forward products only: no copies of the weights
            self._splat_f, self._splat_b = pts, None
            self._slice_f, self._slice_b = pix.reweighted(bary.mul_(alpha)), None

    # ------------------------------------------------------------------
    def _stages(self) -> list[_Bags]:
        return [b for b in (self._splat_f, self._splat_b, self._slice_f, self._slice_b, *self._blur) if b is not None]

    def repeat(self, batch: int) -> "PermutohedralLattice":
        """A lattice over ``batch`` copies of this lattice's images.

        Equivalent to building from ``features.repeat(batch, 1, 1)`` but
        without re-sorting (index arithmetic only). Useful for the spatial
        kernel, whose features are the same for every image of a size.
        """
        if batch == 1:
            return self
        new = object.__new__(PermutohedralLattice)
        new.__dict__.update(self.__dict__)
        new._cache = {}
        new.batch = self.batch * batch
        new.num_points = self.num_points * batch
        new.unique_keys = None
        new._ones = None if self._ones is None else self._ones.repeat(batch)
        new._splat_f = _repeat_bags(self._splat_f, batch)
        pix = _repeat_bags(self._slice_f, batch)  # pixel-major indices
        new._slice_f = pix
        new._splat_b = None if self._splat_b is None else pix.reweighted(self._splat_b.weights.repeat(batch))
        new._slice_b = None if self._slice_b is None else new._splat_f.reweighted(self._slice_b.weights.repeat(batch))
        new._blur = [_repeat_bags(b, batch) for b in self._blur]
        return new

    def scaled(self, pre: Tensor | None = None, post: Tensor | None = None) -> "PermutohedralLattice":
        """The filter ``diag(post) K diag(pre)`` with the scalings folded
        into the splat / slice weights (no extra passes over the values).

        ``pre`` and ``post`` are per-pixel ``(B*N,)`` (or ``(B*N, 1)``)
        float tensors, treated as constants (no gradient). Shares all index
        tensors with this lattice.
        """
        new = object.__new__(PermutohedralLattice)
        new.__dict__.update(self.__dict__)
        # own copies of the weights that get scaled; indices and the other weights stay shared
        stages = (("_splat_f", "_splat_b") if pre is not None else ()) + (
            ("_slice_f", "_slice_b") if post is not None else ())
        for name in stages:
            bags = getattr(self, name)
            if bags is not None:
                setattr(new, name, bags.reweighted(bags.weights.clone()))
        return new.scale_(pre, post)

    def scale_(self, pre: Tensor | None = None, post: Tensor | None = None) -> "PermutohedralLattice":
        """:meth:`scaled` in place: this lattice's weights are multiplied, no copies (for a
        lattice nobody else holds: a normalised kernel right after its build). Returns self."""
        BN = self.batch * self.num_pixels
        pts_idx = self._splat_f.indices  # pixel of each point-major entry
        pre = None if pre is None else pre.detach().reshape(BN).to(torch.float32)
        post = None if post is None else post.detach().reshape(BN).to(torch.float32)
        for factors, point_major, pixel_major in ((pre, self._splat_f, self._splat_b),
                                                  (post, self._slice_b, self._slice_f)):
            if factors is None:
                continue
            if point_major is not None:  # gathered in chunks: a bounded temporary
                w = point_major.weights
                for a in range(0, w.numel(), _SCALE_CHUNK):
                    w[a : a + _SCALE_CHUNK].mul_(factors.index_select(0, pts_idx[a : a + _SCALE_CHUNK]))
            if pixel_major is not None:
                pixel_major.weights.view(BN, -1).mul_(factors.unsqueeze(1))
        self._ones = None  # another filter now
        self._cache = {}
        return self

    def ones_response(self) -> Tensor:
        """``K 1``: the filter applied to all-ones values, ``(B*N,)`` float32 (what the kernel
        normalisations divide by). The CPU build computes it on the way; otherwise one filter
        pass."""
        if self._ones is not None:
            return self._ones
        ones = torch.ones(self.batch * self.num_pixels, 1, device=self.device)
        with torch.no_grad():
            return self.filter(ones).view(-1)

    def nbytes(self) -> int:
        """Bytes held by the precomputed structure (all images)."""
        seen = {}
        for b in self._stages():
            for t in b.tensors():
                seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    def _apply(self, x: Tensor, fwd: _Bags | None, bwd: _Bags | None) -> Tensor:
        if fwd is None or (bwd is None and x.requires_grad and torch.is_grad_enabled()):
            raise RuntimeError(
                "this lattice was built with transposes=False (inference only): it has no transposed "
                "filter and no gradient; build it with transposes=True"
            )
        return _BagProduct.apply(x, fwd, bwd, self.backend, self._cache)

    def splat(self, values: Tensor) -> Tensor:
        """``(B*N, C)`` pixel values -> ``(M, C)`` lattice values."""
        return self._apply(values, self._splat_f, self._splat_b)

    def blur(self, lattice_values: Tensor, *, reverse: bool = False) -> Tensor:
        """Blur along axes ``0..d`` (``d..0`` if ``reverse``)."""
        axes = range(self.dim, -1, -1) if reverse else range(self.dim + 1)
        out = lattice_values
        for j in axes:
            out = self._apply(out, self._blur[j], self._blur[j])
        return out

    def slice(self, lattice_values: Tensor) -> Tensor:
        """``(M, C)`` lattice values -> ``(B*N, C)`` pixel values (times alpha)."""
        return self._apply(lattice_values, self._slice_f, self._slice_b)

    def filter(self, values: Tensor, *, transpose: bool = False) -> Tensor:
        """Approximate ``sum_j exp(-|f_i - f_j|^2 / 2) v_j``.

        Args:
            values: ``(B, N, C)`` (or ``(N, C)`` if the lattice was built from
                ``(N, d)`` features, or ``(B*N, C)`` flat), float32/float64.
            transpose: apply the transposed filter (blur axes in reverse
                order), i.e. densecrf's ``compute(..., reverse=true)``.

        Returns:
            Filtered values, same shape and dtype as ``values``.
        """
        shape = values.shape
        if values.dim() == 3:
            if shape[0] != self.batch or shape[1] != self.num_pixels:
                raise ValueError(f"values {tuple(shape)} do not match lattice (B={self.batch}, N={self.num_pixels})")
        elif values.dim() == 2:
            if shape[0] != self.batch * self.num_pixels:
                raise ValueError(f"values {tuple(shape)} do not match lattice (B*N={self.batch * self.num_pixels})")
        else:
            raise ValueError(f"values must be 2-D or 3-D, got shape {tuple(shape)}")
        if values.device != self.device:
            raise ValueError(f"values on {values.device}, lattice on {self.device}")
        x = values.reshape(self.batch * self.num_pixels, -1)
        if not x.is_contiguous():
            x = x.contiguous()
        if transpose:
            out = self._apply(x, self._slice_b, self._slice_f)
            out = self.blur(out, reverse=True)
            out = self._apply(out, self._splat_b, self._splat_f)
        else:
            out = self.splat(x)
            out = self.blur(out)
            out = self.slice(out)
        return out.view(shape)

    __call__ = filter
