"""The permutohedral lattice build on the CPU, compiled with numba.

The torch build in :mod:`segrefine.crf.lattice` expresses densecrf's per-pixel
steps as whole-tensor ops and replaces its hash table by sorts; on a CPU that
costs about as much as the whole of pydensecrf's inference. This module does
what densecrf does instead: one pass per pixel (elevate, round, rank,
barycentric weights) and a hash table of lattice keys, in compiled loops that
release the GIL. With several threads (torch's intra-op count) the per-pixel
pass, the hashing (each thread hashes a range of pixels into its own table;
the tables are then merged and the points renumbered), the blur-neighbour
lookups and the splat counting sort are split between them.

It produces exactly the arrays the torch build produces, in the same float32
arithmetic (same rounding, same tie rules, same operation order), so the two
builds give the same lattice; only the numbering of the lattice points
differs (first-seen order per image and thread range here, sorted keys
there), which changes nothing but the order of float additions. ``tests/crf/test_cpu_lattice.py``
checks the two against each other.

Keys are the ``d`` coordinates of a lattice vertex (the ``d+1``-th is implied),
packed into one int64 over the box of coordinates the image's pixels can
reach; a box too large for int64 raises ``OverflowError`` and the caller falls
back to the torch build.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numba
import numpy as np

__all__ = ["CompiledLattice", "build"]

from .limits import EXACT_LIMIT, features_too_large

_JIT = dict(nogil=True, cache=True, boundscheck=False)
_EXACT_LIMIT = np.float32(EXACT_LIMIT)  # a float32 constant inside the compiled loop


@numba.njit(**_JIT)
def _elevate(f, scale, down, first, stop, v_out, pos_out, bary_out, vmin, vmax):
    """Steps 1-5 of the build for pixels ``first..stop`` of ``f (n, d)`` float32: the
    remainder-0 point ``v_out (n, d)`` int32 (rem0 / (d+1)), the sorted position of each
    coordinate ``pos_out (n, d+1)`` int8 and the barycentric weights ``bary_out (n, d+1)``
    float32. Float32 throughout, in the torch build's operation order. ``vmin``/``vmax``
    (d,) receive the range of ``v_out`` over these pixels. Returns 0, or stops at the first
    NaN or infinite feature (1) or elevated coordinate too large for float32 integers (2)."""
    d = f.shape[1]
    # the range is kept in this call's own arrays and written out once: threads writing their
    # ranges side by side on every pixel would share a cache line
    lo = np.full(d, 2**62, np.int64)
    hi = np.full(d, -(2**62), np.int64)
    d1 = d + 1
    fd1 = np.float32(d1)
    E = np.empty(d1, np.float32)
    v = np.empty(d1, np.float32)
    delta = np.empty(d1, np.float32)
    rank = np.empty(d1, np.int64)
    g = np.empty(d1, np.float32)
    for p in range(first, stop):
        sm = np.float32(0.0)
        for j in range(d, 0, -1):
            cf = f[p, j - 1] * scale[j - 1]
            E[j] = sm - cf * np.float32(j)
            sm = sm + cf
        E[0] = sm
        total = 0
        for i in range(d1):
            if not abs(E[i]) < _EXACT_LIMIT:  # also true for NaN: one test per coordinate
                for j in range(d):
                    if not np.isfinite(f[p, j]):
                        return 1
                return 2
            v[i] = np.rint(E[i] * down)  # half to even, as torch.round
            delta[i] = E[i] - v[i] * fd1
            rank[i] = i
            total += np.int64(v[i])
        for i in range(d):
            for j in range(i + 1, d1):
                # branch-free: the comparisons' outcomes are data-dependent coin flips
                c = np.int64(delta[i] < delta[j])
                rank[i] += c
                rank[j] -= c
        for i in range(d1):
            r = rank[i] + total
            if r < 0:
                r += d1
                v[i] += np.float32(1.0)
            elif r > d:
                r -= d1
                v[i] -= np.float32(1.0)
            pos = d - r
            pos_out[p, i] = pos
            g[pos] = (E[i] - v[i] * fd1) * down
        for k in range(1, d1):
            bary_out[p, k] = g[k] - g[k - 1]
        bary_out[p, 0] = g[0] + (np.float32(1.0) - g[d])
        for i in range(d):
            vi = np.int64(v[i])
            v_out[p, i] = vi
            if vi < lo[i]:
                lo[i] = vi
            if vi > hi[i]:
                hi[i] = vi
    vmin[:] = lo
    vmax[:] = hi
    return 0


@numba.njit(**_JIT)
def _hash_slot(key, mask):
    h = np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)
    return np.int64((h >> np.uint64(29)) & np.uint64(mask))


@numba.njit(**_JIT)
def _make_room(slots, keys, coords, m):
    """Room for point ``m``: the point arrays doubled when full, the table doubled and rehashed
    when its load would pass 1/2."""
    if m == keys.shape[0]:
        keys2 = np.empty(2 * m, np.int64)
        keys2[:m] = keys[:m]
        keys = keys2
        coords2 = np.empty((2 * m, coords.shape[1]), np.int32)
        coords2[:m] = coords[:m]
        coords = coords2
    if 2 * (m + 1) > slots.shape[0]:
        cap = 2 * slots.shape[0]
        mask = cap - 1
        slots = np.full(cap, -1, np.int32)
        for q in range(m):
            t = _hash_slot(keys[q], mask)
            while slots[t] >= 0:
                t = (t + 1) & mask
            slots[t] = q
    return slots, keys, coords


@numba.njit(**_JIT)
def _insert_pixels(v, pos, first, stop, real_stop, lo, stride, vid, table_size):
    """Hash the ``d+1`` vertices of pixels ``first..stop`` into a new table; pixels from
    ``real_stop`` on are densecrf's phantom padding (their vertices are inserted, not
    recorded). ``vid[p, r]`` = the point of vertex ``r`` of pixel ``p``, numbered from 0 in
    first-seen order. Returns ``(m, slots, keys, coords)`` (the first ``m`` keys are used)."""
    d = v.shape[1]
    d1 = d + 1
    slots = np.full(table_size, -1, np.int32)  # point id per slot
    keys = np.empty(max(table_size // 8, 16), np.int64)  # grows by doubling
    coords = np.empty((keys.shape[0], d), np.int32)
    key_c = np.empty(d, np.int32)
    m = 0
    for p in range(first, stop):
        real = p < real_stop
        # neighbouring pixels often lie in the same simplex: reuse the previous pixel's points
        if p > first and real:
            same = True
            for i in range(d):
                if v[p, i] != v[p - 1, i] or pos[p, i] != pos[p - 1, i]:
                    same = False
                    break
            if same:
                for r in range(d1):
                    vid[p, r] = vid[p - 1, r]
                continue
        for r in range(d1):
            packed = np.int64(0)
            for i in range(d):
                c = v[p, i] * d1 + r - d1 * np.int32(pos[p, i] < r)  # branch-free
                key_c[i] = c
                packed += np.int64(c - lo[i]) * stride[i]
            # the probe is written out here, not called: this loop runs 6 times per pixel, and a
            # call with array arguments made it several times slower
            mask = slots.shape[0] - 1
            s = _hash_slot(packed, mask)
            while True:
                pid = slots[s]
                if pid < 0:
                    if m == keys.shape[0] or 2 * (m + 1) > slots.shape[0]:
                        slots, keys, coords = _make_room(slots, keys, coords, m)
                        mask = slots.shape[0] - 1
                        s = _hash_slot(packed, mask)
                        continue
                    slots[s] = m
                    keys[m] = packed
                    coords[m] = key_c
                    pid = m
                    m += 1
                    break
                if keys[pid] == packed:
                    break
                s = (s + 1) & mask
            if real:
                vid[p, r] = pid
    return m, slots, keys, coords


@numba.njit(**_JIT)
def _merge_points(slots, keys, coords, m, other_keys, other_coords, other_m, mapping):
    """Add another table's points to this one: ``mapping[q]`` = this table's point for the
    other's point ``q``. Returns ``(m, slots, keys, coords)``."""
    for q in range(other_m):
        if m == keys.shape[0] or 2 * (m + 1) > slots.shape[0]:
            slots, keys, coords = _make_room(slots, keys, coords, m)
        # the probe written out, as in _insert_pixels (a shared helper, even numba-inlined,
        # measured 13 % slower there: the arrays it returns are reference-counted per call)
        packed = other_keys[q]
        mask = slots.shape[0] - 1
        s = _hash_slot(packed, mask)
        while True:
            pid = slots[s]
            if pid < 0:
                slots[s] = m
                keys[m] = packed
                coords[m] = other_coords[q]
                pid = m
                m += 1
                break
            if keys[pid] == packed:
                break
            s = (s + 1) & mask
        mapping[q] = pid
    return m, slots, keys, coords


@numba.njit(**_JIT)
def _renumber(vid, first, stop, mapping):
    for p in range(first, stop):
        for r in range(vid.shape[1]):
            vid[p, r] = mapping[vid[p, r]]


@numba.njit(**_JIT)
def _lookup(slots, keys, packed):
    mask = slots.shape[0] - 1
    s = _hash_slot(packed, mask)
    while True:
        pid = slots[s]
        if pid < 0:
            return -1
        if keys[pid] == packed:
            return pid
        s = (s + 1) & mask


@numba.njit(**_JIT)
def _blur_neighbours(coords, slots, keys, lo, hi, stride, offset, first, stop, nb, w):
    """Per point ``first..stop`` and axis ``j``: ``nb[j, p] = (p, n1, n2)`` with ``n1 = key -
    (1..1) + (d+1) e_j`` and ``n2 = key + (1..1) - (d+1) e_j`` (axis ``d``: the implied
    coordinate), weights ``(1, 1/2, 1/2)``; a missing neighbour is the point itself with
    weight 0. Point ids are shifted by ``offset`` (the image's first point)."""
    d = coords.shape[1]
    d1 = d + 1
    for p in range(first, stop):
        for j in range(d1):
            for side in range(2):
                sign = 1 if side == 0 else -1
                packed = np.int64(0)
                inside = True
                for i in range(d):
                    c = coords[p, i] - sign
                    if i == j:
                        c += sign * d1
                    if c < lo[i] or c > hi[i]:
                        inside = False
                        break
                    packed += np.int64(c - lo[i]) * stride[i]
                q = _lookup(slots, keys, packed) if inside else -1
                if q >= 0:
                    nb[j, offset + p, 1 + side] = offset + q
                    w[j, offset + p, 1 + side] = np.float32(0.5)
                else:
                    nb[j, offset + p, 1 + side] = offset + p
                    w[j, offset + p, 1 + side] = np.float32(0.0)
            nb[j, offset + p, 0] = offset + p
            w[j, offset + p, 0] = np.float32(1.0)


@numba.njit(**_JIT)
def _count_points(vid, first, stop, counts):
    """``counts[k]`` = how many (pixel, vertex) pairs of pixels ``first..stop`` touch point ``k``."""
    counts[:] = 0
    for p in range(first, stop):
        for r in range(vid.shape[1]):
            counts[vid[p, r]] += 1


@numba.njit(**_JIT)
def _fill_splat(vid, bary, first, stop, fill, pixels, weights):
    """Write the pairs of pixels ``first..stop`` into the splat rows, each point's at
    ``fill[k]`` onwards (so rows list their pixels in ascending order)."""
    for p in range(first, stop):
        for r in range(vid.shape[1]):
            k = vid[p, r]
            e = fill[k]
            pixels[e] = p
            weights[e] = bary[p, r]
            fill[k] = e + 1


@numba.njit(**_JIT)
def _ones_splat(splat_offsets, splat_weights, first, stop, a):
    """``K 1``, step 1 for points ``first..stop``: each point's splatted weight (its row's sum,
    in row order, float32)."""
    for k in range(first, stop):
        acc = np.float32(0.0)
        for e in range(splat_offsets[k], splat_offsets[k + 1]):
            acc += splat_weights[e]
        a[k] = acc


@numba.njit(**_JIT)
def _ones_blur(a, nb, w):
    """``K 1``, step 2: the splatted weights blurred along axes 0..d (the filter's order)."""
    b = np.empty_like(a)
    for j in range(nb.shape[0]):
        for k in range(a.shape[0]):
            b[k] = w[j, k, 0] * a[nb[j, k, 0]] + w[j, k, 1] * a[nb[j, k, 1]] + w[j, k, 2] * a[nb[j, k, 2]]
        a, b = b, a
    return a


@numba.njit(**_JIT)
def _ones_slice(vid, bary, a, alpha, first, stop, out):
    """``K 1``, step 3 for pixels ``first..stop``: sliced with ``alpha`` as the filter does."""
    for p in range(first, stop):
        acc = np.float32(0.0)
        for r in range(vid.shape[1]):
            acc += (bary[p, r] * alpha) * a[vid[p, r]]
        out[p] = acc


def _scale_factors(d: int) -> tuple[np.ndarray, np.float32]:
    """densecrf's elevation scale factors (double -> float) and ``1/(d+1)`` in float32."""
    d1 = d + 1
    inv_std_dev = np.float32(math.sqrt(2.0 / 3.0) * d1)
    scale = np.array([np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * float(inv_std_dev)) for i in range(d)],
                     np.float32)
    return scale, np.float32(np.float32(1.0) / np.float32(d1))


def _chunks(total: int, parts: int) -> list[tuple[int, int]]:
    step = max(1, -(-total // max(parts, 1)))
    return [(a, min(total, a + step)) for a in range(0, total, step)]


class CompiledLattice(NamedTuple):
    """What ``build`` returns (numpy arrays; see its docstring)."""

    num_points: int
    vid: np.ndarray
    bary: np.ndarray
    splat_pixels: np.ndarray
    splat_offsets: np.ndarray
    splat_weights: np.ndarray
    blur_nb: np.ndarray
    blur_w: np.ndarray
    ones: np.ndarray


def build(f: np.ndarray, num_real: int, threads: int, alpha: np.float32) -> CompiledLattice:
    """The lattice of ``f (B, Np, d)`` float32 (each image's last ``Np - num_real`` pixels are
    phantom padding: hashed, never splatted or sliced), with ``threads`` worker threads.

    Returns numpy arrays: ``num_points`` (all images), ``vid (B*N, d+1)`` int32 and ``bary (B*N,
    d+1)`` float32 (the slice rows, pixel-major), ``splat_pixels`` / ``splat_offsets`` /
    ``splat_weights`` (the splat rows, point-major) and ``blur_nb`` / ``blur_w`` ``(d+1, M, 3)``
    (the blur along each axis: self, neighbour, neighbour), and the filter's response to
    all-ones values ``ones (B*N,)`` (slice scaled by ``alpha``). Raises
    ``OverflowError`` when a key box does not fit int64, ``ValueError`` for non-finite features
    or features too large for float32 lattice coordinates."""
    B, Np, d = f.shape
    d1 = d + 1
    N = num_real
    flat = np.ascontiguousarray(f.reshape(B * Np, d), dtype=np.float32)
    scale, down = _scale_factors(d)
    v = np.empty((B * Np, d), np.int32)
    pos = np.empty((B * Np, d1), np.int8)
    bary_all = np.empty((B * Np, d1), np.float32)
    threads = max(1, int(threads))
    pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def run_jobs(fn, jobs):
        if pool is None or len(jobs) <= 1:
            return [fn(job) for job in jobs]
        return list(pool.map(fn, jobs))

    try:
        # per image, in chunks: elevate, and the range of the remainder-0 points
        parts = [(b, a, e) for b in range(B) for a, e in _chunks(Np, -(-threads // B))]
        v_range = np.empty((len(parts), 2, d), np.int64)

        def elevate(k):
            b, a, e = parts[k]
            return _elevate(flat, scale, down, b * Np + a, b * Np + e, v, pos, bary_all, v_range[k, 0], v_range[k, 1])

        status = run_jobs(elevate, range(len(parts)))
        if 1 in status:
            raise ValueError("features contain NaN or infinite values")
        if 2 in status:
            raise features_too_large(float(np.abs(flat).max()))

        # per image: the key box, then the hash table
        image_of_part = np.array([b for b, _, _ in parts])
        boxes = []
        for b in range(B):
            mine = v_range[image_of_part == b]
            lo = mine[:, 0].min(0) * d1 - d
            hi = mine[:, 1].max(0) * d1 + d
            radix = hi - lo + 1
            strides = [1]
            for r in radix.tolist():
                strides.append(strides[-1] * r)
            if strides[-1] >= 2**62:
                raise OverflowError(f"lattice key box too large for int64 packing (ranges {radix.tolist()})")
            stride = np.array(strides[:-1], np.int64)
            boxes.append((lo, hi, stride))

        # per image: its pixels hashed in one range per thread, each range into its own table;
        # then the tables merged into the first and the other ranges' points renumbered
        vid = np.empty((B * Np, d1), np.int32)
        split = max(1, threads // B)
        ranges = [[(b * Np + a, b * Np + e) for a, e in _chunks(Np, split)] for b in range(B)]

        def insert(b, k):
            lo, _, stride = boxes[b]
            a, e = ranges[b][k]
            # start small and let the table grow (rehashing is cheap): natural images have
            # ~1-3 % of N (d+1) points, and a table sized for the worst case spills the caches
            table_size = 1 << max(10, int((e - a) // 8).bit_length())
            return _insert_pixels(v, pos, a, e, b * Np + N, lo, stride, vid, table_size)

        jobs = [(b, k) for b in range(B) for k in range(len(ranges[b]))]
        tables = dict(zip(jobs, run_jobs(lambda job: insert(*job), jobs)))
        hashed, renumbering = [], []
        for b in range(B):
            mine = [tables[b, k] for k in range(len(ranges[b]))]
            m, slots, keys, coords = mine[0]
            for k, (om, _, okeys, ocoords) in enumerate(mine[1:], start=1):
                mapping = np.empty(om, np.int32)
                m, slots, keys, coords = _merge_points(slots, keys, coords, m, okeys, ocoords, om, mapping)
                a, e = ranges[b][k]
                renumbering.append((vid, a, min(e, b * Np + N), mapping))
            hashed.append((m, keys[:m], coords[:m], slots))
        run_jobs(lambda job: _renumber(*job), renumbering)
        v = pos = None  # the per-pixel temporaries are done with: lower the build's peak
        offsets = np.concatenate([[0], np.cumsum([h[0] for h in hashed])]).astype(np.int64)
        M = int(offsets[-1])
        if M >= 2**31 or B * N * d1 >= 2**31:
            raise OverflowError("lattice too large for int32 indices")

        nb = np.empty((d1, M, 3), np.int32)
        w = np.empty((d1, M, 3), np.float32)
        def blur(job):
            b, a, e = job
            _, keys, coords, slots = hashed[b]
            lo, hi, stride = boxes[b]
            _blur_neighbours(coords, slots, keys, lo, hi, stride, offsets[b], a, e, nb, w)

        run_jobs(blur, [(b, a, e) for b, h in enumerate(hashed) for a, e in _chunks(h[0], threads)])

        # drop the phantom pixels, number the points globally
        vid = vid.reshape(B, Np, d1)[:, :N]
        bary = bary_all.reshape(B, Np, d1)[:, :N]
        if B > 1:
            vid = vid + offsets[:-1].astype(np.int32).reshape(B, 1, 1)
        vid = np.ascontiguousarray(vid.reshape(B * N, d1))
        bary = np.ascontiguousarray(bary.reshape(B * N, d1))
        # the splat rows (point-major, pixels ascending): a counting sort of the pairs by
        # point, each thread counting and then writing its own range of pixels
        pix_ranges = list(enumerate(_chunks(B * N, threads)))
        counts = np.empty((len(pix_ranges), M), np.int64)
        run_jobs(lambda job: _count_points(vid, *job[1], counts[job[0]]), pix_ranges)
        splat_off = np.zeros(M + 1, np.int64)
        np.cumsum(counts.sum(0), out=splat_off[1:])
        starts = splat_off[:-1] + np.cumsum(counts, 0) - counts
        pixels = np.empty(B * N * d1, np.int32)
        splat_w = np.empty(B * N * d1, np.float32)
        run_jobs(lambda job: _fill_splat(vid, bary, *job[1], starts[job[0]], pixels, splat_w), pix_ranges)
        # K 1 (what the normalisations divide by), in the filter's own float32 order
        splatted = np.empty(M, np.float32)
        run_jobs(lambda job: _ones_splat(splat_off, splat_w, *job, splatted), _chunks(M, threads))
        blurred = _ones_blur(splatted, nb, w)
        ones = np.empty(B * N, np.float32)
        run_jobs(lambda job: _ones_slice(vid, bary, blurred, alpha, *job, ones), _chunks(B * N, threads))
    finally:
        if pool is not None:
            pool.shutdown()
    return CompiledLattice(num_points=M, vid=vid, bary=bary, splat_pixels=pixels, splat_offsets=splat_off,
                           splat_weights=splat_w, blur_nb=nb, blur_w=w, ones=ones)

