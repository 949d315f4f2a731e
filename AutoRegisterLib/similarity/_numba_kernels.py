"""Numba kernels for the fused CPU LNCC: the whole forward and backward, streamed plane by plane.

Every box sum is a separable clipped running sum accumulated in float64 on centred, scaled values:
rows along x, then columns along y into a ring of per-plane 2D sums, then a running sum of that
ring along z. Work is split into (z-chunk, y-tile) items so that each item's rings stay in cache and
two threads never share a buffer; nothing volume-sized is allocated except what the caller passes in.

Quantity layout of the forward sums: 0 F, 1 M, 2 F², 3 M², 4 F·M, [5 mask].
Backward, with v the per-voxel value (cc or signed zncc) and A = cross, B = varF, C = varM:
a = ∂v/∂A, bF = ∂v/∂B, bM = ∂v/∂C, γM = −(a·S_F + 2·bM·S_M)/N, γF = −(a·S_M + 2·bF·S_F)/N, and

    dL/dM_k = w_k · (F_k·box(g·a)_k + 2·M_k·box(g·bM)_k + box(g·γM)_k)     (same for F with F↔M)

because a clipped symmetric box is its own adjoint.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _count(i, r, n):
    """Voxels of a window of half-width r around i that lie inside [0, n)."""
    return min(n - 1, i + r) - max(0, i - r) + 1


@njit(cache=True)
def _box_x_inplace(buf, nq, nrows, width, rx, tmp):
    """Replace every row of buf[q, :nrows] by its clipped running sum of half-width rx."""
    if rx == 0:
        return
    for q in range(nq):
        for y in range(nrows):
            for x in range(width):
                tmp[x] = buf[q, y, x]
            s = 0.0
            for x in range(min(rx, width)):
                s += tmp[x]
            for x in range(width):
                if x + rx < width:
                    s += tmp[x + rx]
                buf[q, y, x] = s
                if x - rx >= 0:
                    s -= tmp[x - rx]


@njit(cache=True)
def _box_y(src, src_y0, nq, dst, dst_y0, ya, yb, height, ry, width, acc):
    """dst rows [ya, yb) = clipped column sums of src (whose row 0 is image row src_y0)."""
    for q in range(nq):
        for x in range(width):
            acc[x] = 0.0
        for yy in range(max(0, ya - ry), min(height - 1, ya + ry) + 1):
            for x in range(width):
                acc[x] += src[q, yy - src_y0, x]
        for y in range(ya, yb):
            for x in range(width):
                dst[q, y - dst_y0, x] = acc[x]
            add = y + 1 + ry
            sub = y - ry
            if add <= height - 1:
                for x in range(width):
                    acc[x] += src[q, add - src_y0, x]
            if sub >= 0:
                for x in range(width):
                    acc[x] -= src[q, sub - src_y0, x]


@njit(cache=True)
def _load_plane(F, M, mask, weighted, z, ylo, yhi, width, stats, buf):
    """Write the five (six with a mask) per-voxel quantities of plane z, rows [ylo, yhi), into buf."""
    f_mean, f_inv, m_mean, m_inv = stats[0], stats[1], stats[2], stats[3]
    for y in range(ylo, yhi):
        j = y - ylo
        for x in range(width):
            f = (F[z, y, x] - f_mean) * f_inv
            m = (M[z, y, x] - m_mean) * m_inv
            if weighted:
                w = 1.0 if mask[z, y, x] else 0.0
                f *= w
                m *= w
                buf[5, j, x] = w
            buf[0, j, x] = f
            buf[1, j, x] = m
            buf[2, j, x] = f * f
            buf[3, j, x] = m * m
            buf[4, j, x] = f * m


@njit(cache=True)
def _load_box_x(F, M, mask, weighted, z, ylo, yhi, width, rx, stats, nq, row, buf):
    """buf[q, y − ylo] = x-box of quantity q on row y of plane z, for rows [ylo, yhi).

    The quantities of one row go to `row` (zero-padded: rx + 1 in front, rx behind; in L1 cache),
    so the raw quantities never make a round trip through memory. The x running sums of all the
    quantities advance together: five or six independent chains keep the core busy where a single
    running sum would wait on each addition.
    """
    f_mean, f_inv, m_mean, m_inv = stats[0], stats[1], stats[2], stats[3]
    span = 2 * rx + 1
    r0, r1, r2, r3, r4, r5 = row[0], row[1], row[2], row[3], row[4], row[nq - 1]
    for y in range(ylo, yhi):
        j = y - ylo
        for x in range(width):
            f = (F[z, y, x] - f_mean) * f_inv
            m = (M[z, y, x] - m_mean) * m_inv
            if weighted:
                w = 1.0 if mask[z, y, x] else 0.0
                f *= w
                m *= w
                r5[rx + 1 + x] = w
            r0[rx + 1 + x] = f
            r1[rx + 1 + x] = m
            r2[rx + 1 + x] = f * f
            r3[rx + 1 + x] = m * m
            r4[rx + 1 + x] = f * m
        # The window of x covers padded positions [x + 1, x + span]; position 0 is a zero.
        s0 = s1 = s2 = s3 = s4 = s5 = 0.0
        for k in range(1, span):
            s0 += r0[k]
            s1 += r1[k]
            s2 += r2[k]
            s3 += r3[k]
            s4 += r4[k]
            s5 += r5[k]
        b0, b1, b2, b3, b4, b5 = buf[0, j], buf[1, j], buf[2, j], buf[3, j], buf[4, j], buf[nq - 1, j]
        if weighted:
            for x in range(width):
                s0 += r0[x + span] - r0[x]
                s1 += r1[x + span] - r1[x]
                s2 += r2[x + span] - r2[x]
                s3 += r3[x + span] - r3[x]
                s4 += r4[x + span] - r4[x]
                s5 += r5[x + span] - r5[x]
                b0[x] = s0
                b1[x] = s1
                b2[x] = s2
                b3[x] = s3
                b4[x] = s4
                b5[x] = s5
        else:
            for x in range(width):
                s0 += r0[x + span] - r0[x]
                s1 += r1[x + span] - r1[x]
                s2 += r2[x + span] - r2[x]
                s3 += r3[x + span] - r3[x]
                s4 += r4[x + span] - r4[x]
                b0[x] = s0
                b1[x] = s1
                b2[x] = s2
                b3[x] = s3
                b4[x] = s4


@njit(cache=True)
def _add_plane(acc, plane, nq, nrows, width, sign):
    """acc += sign · plane over the first nrows rows."""
    for q in range(nq):
        for y in range(nrows):
            for x in range(width):
                acc[q, y, x] += sign * plane[q, y, x]


@njit(cache=True, inline="always")
def _moments(s_f, s_m, s_ff, s_mm, s_fm, n):
    """cross, varF, varM from window sums (all scaled by N, which cancels in the ratios)."""
    return s_fm - s_f * s_m / n, s_ff - s_f * s_f / n, s_mm - s_m * s_m / n


@njit(cache=True, inline="always")
def _finish_row(s_f, s_m, s_ff, s_mm, s_fm, n, inside, width, eps, tau, signed, out):
    """out[x] = the map value from the window sums of one row; branch-free so that it vectorizes."""
    if signed:
        for x in range(width):
            inv = 1.0 / n[x]
            a = s_fm[x] - s_f[x] * s_m[x] * inv
            b = s_ff[x] - s_f[x] * s_f[x] * inv
            c = s_mm[x] - s_m[x] * s_m[x] * inv
            den = b * c + eps
            ok = (b > tau * n[x]) & (c > tau * n[x]) & (den > 0.0) & (inside[x] != 0.0)
            v = a / math.sqrt(den if ok else 1.0)
            out[x] = min(1.0, max(-1.0, v)) if ok else 0.0
    else:
        for x in range(width):
            inv = 1.0 / n[x]
            a = s_fm[x] - s_f[x] * s_m[x] * inv
            b = s_ff[x] - s_f[x] * s_f[x] * inv
            c = s_mm[x] - s_m[x] * s_m[x] * inv
            den = b * c + eps
            ok = (b > tau * n[x]) & (c > tau * n[x]) & (den > 0.0) & (inside[x] != 0.0)
            v = a * a / (den if ok else 1.0)
            out[x] = min(1.0, max(0.0, v)) if ok else 0.0


@njit(cache=True)
def _lncc_forward_item(F, M, mask, has_mask, radii, stats, zeros_mode, n_const, eps, tau, signed, out,
                       write_out, item):
    """One (z-chunk, y-tile) work item of `lncc_forward`; serial, so numba compiles it quickly."""
    depth, height, width = F.shape
    rz, ry, rx = radii[0], radii[1], radii[2]
    weighted = has_mask and not zeros_mode
    nq = 6 if weighted else 5
    wz = 2 * rz + 2
    # "zeros" has no flat test: VoxelMorph's eps alone keeps the ratio finite.
    tau_eff = -1e300 if zeros_mode else tau
    count_x = np.empty(width)
    for x in range(width):
        count_x[x] = _count(x, rx, width)
    z0, z1, y0, y1 = item[0], item[1], item[2], item[3]
    ylo, yhi = max(0, y0 - ry), min(height, y1 + ry)
    nyo = y1 - y0
    row = np.zeros((nq, width + 2 * rx + 1))
    buf = np.empty((nq, yhi - ylo, width))
    tmp = np.empty(width)
    ring = np.empty((wz, nq, nyo, width))
    zero = np.zeros((nq, nyo, width))
    acc = np.zeros((nq, nyo, width))
    n_row = np.empty(width)
    inside = np.ones(width)
    values = np.empty(width)
    start = max(0, z0 - rz)
    for p in range(start, min(depth, z0 + rz)):
        _load_box_x(F, M, mask, weighted, p, ylo, yhi, width, rx, stats, nq, row, buf)
        _box_y(buf, ylo, nq, ring[p % wz], y0, y0, y1, height, ry, width, tmp)
        _add_plane(acc, ring[p % wz], nq, nyo, width, 1.0)
    total = 0.0
    for z in range(z0, z1):
        # Slide the z-window (add plane z+rz, drop z−rz−1) while finishing each row.
        p_in, p_out = z + rz, z - rz - 1
        new = zero
        if p_in < depth:
            new = ring[p_in % wz]
            _load_box_x(F, M, mask, weighted, p_in, ylo, yhi, width, rx, stats, nq, row, buf)
            _box_y(buf, ylo, nq, new, y0, y0, y1, height, ry, width, tmp)
        old = ring[p_out % wz] if p_out >= start else zero
        cz = _count(z, rz, depth)
        for y in range(y0, y1):
            j = y - y0
            for q in range(nq):
                a_q, n_q, o_q = acc[q, j], new[q, j], old[q, j]
                for x in range(width):
                    a_q[x] += n_q[x] - o_q[x]
            if zeros_mode:
                for x in range(width):
                    n_row[x] = n_const
            elif weighted:
                n_row[:] = acc[5, j]
            else:
                cy = _count(y, ry, height) * cz
                for x in range(width):
                    n_row[x] = cy * count_x[x]
            if has_mask:
                for x in range(width):
                    inside[x] = 1.0 if mask[z, y, x] else 0.0
                    # Outside the mask N may be 0; any positive value avoids 0/0 there.
                    if n_row[x] <= 0.0:
                        n_row[x] = 1.0
            _finish_row(acc[0, j], acc[1, j], acc[2, j], acc[3, j], acc[4, j], n_row, inside, width,
                        eps, tau_eff, signed, values)
            for x in range(width):
                total += values[x]
            if write_out:
                for x in range(width):
                    out[z, y, x] = values[x]
    return total


@njit(parallel=True, cache=True)
def lncc_forward(F, M, mask, has_mask, radii, stats, zeros_mode, n_const, eps, tau, signed, out, write_out,
                 items):
    """Sum of the map over voxels inside the mask; the map itself goes to `out` when write_out."""
    partial = np.zeros(items.shape[0])
    for it in prange(items.shape[0]):
        partial[it] = _lncc_forward_item(F, M, mask, has_mask, radii, stats, zeros_mode, n_const, eps, tau,
                                         signed, out, write_out, items[it])
    return partial.sum()


@njit(cache=True)
def _lncc_backward_item(F, M, mask, has_mask, radii, stats, zeros_mode, n_const, eps, tau, signed, g,
                        g_scalar, g_is_map, need_f, need_m, dF, dM, item):
    """One (z-chunk, y-tile) work item of `lncc_backward`; serial, so numba compiles it quickly."""
    depth, height, width = F.shape
    rz, ry, rx = radii[0], radii[1], radii[2]
    weighted = has_mask and not zeros_mode
    nq = 6 if weighted else 5
    # Coefficient slots: 0 a; M uses (1, 2) = (bM, γM); F uses the next two.
    nq2 = 1 + (2 if need_m else 0) + (2 if need_f else 0)
    mb = 1
    fb = 3 if need_m else 1
    wz = 2 * rz + 2
    f_mean, f_inv, m_mean, m_inv = stats[0], stats[1], stats[2], stats[3]
    z0, z1, y0, y1 = item[0], item[1], item[2], item[3]
    total = 0.0
    yc0, yc1 = max(0, y0 - ry), min(height, y1 + ry)
    yi0, yi1 = max(0, yc0 - ry), min(height, yc1 + ry)
    nyo, nyc = y1 - y0, yc1 - yc0
    tmp = np.empty(width)
    buf = np.empty((nq, yi1 - yi0, width))
    ring_a = np.empty((wz, nq, nyc, width))
    acc_a = np.zeros((nq, nyc, width))
    cbuf = np.empty((nq2, nyc, width))
    ring_b = np.empty((wz, nq2, nyo, width))
    acc_b = np.zeros((nq2, nyo, width))
    p_next = max(0, z0 - 2 * rz)
    p_rm = p_next
    c_next = max(0, z0 - rz)
    c_rm = c_next
    for k in range(z0, z1):
        while c_next <= min(depth - 1, k + rz):
            c = c_next
            while p_rm < c - rz:
                _add_plane(acc_a, ring_a[p_rm % wz], nq, nyc, width, -1.0)
                p_rm += 1
            while p_next <= min(depth - 1, c + rz):
                slot = ring_a[p_next % wz]
                _load_plane(F, M, mask, weighted, p_next, yi0, yi1, width, stats, buf)
                _box_x_inplace(buf, nq, yi1 - yi0, width, rx, tmp)
                _box_y(buf, yi0, nq, slot, yc0, yc0, yc1, height, ry, width, tmp)
                _add_plane(acc_a, slot, nq, nyc, width, 1.0)
                p_next += 1
            # Coefficients of every window centred on plane c, rows [yc0, yc1).
            cz = _count(c, rz, depth)
            own_plane = z0 <= c < z1
            for y in range(yc0, yc1):
                cy = _count(y, ry, height) * cz
                j = y - yc0
                own = own_plane and y0 <= y < y1
                for x in range(width):
                    for q in range(nq2):
                        cbuf[q, j, x] = 0.0
                    inside = True
                    if has_mask:
                        inside = mask[c, y, x] != 0
                    if not inside:
                        continue
                    gc = g[c, y, x] if g_is_map else g_scalar
                    if zeros_mode:
                        n = n_const
                    elif weighted:
                        n = acc_a[5, j, x]
                    else:
                        n = cy * _count(x, rx, width)
                    s_f, s_m = acc_a[0, j, x], acc_a[1, j, x]
                    a, b, cv = _moments(s_f, s_m, acc_a[2, j, x], acc_a[3, j, x], acc_a[4, j, x], n)
                    if zeros_mode:
                        den = b * cv + eps
                        if not den > 0:
                            continue
                    else:
                        if not (b > tau * n and cv > tau * n):
                            continue
                        den = b * cv
                    if signed:
                        s = 1.0 / math.sqrt(den)
                        if own:
                            total += min(1.0, max(-1.0, a * s))
                        da = s
                        db = -0.5 * a * cv * s * s * s
                        dc = -0.5 * a * b * s * s * s
                    else:
                        inv = 1.0 / den
                        if own:
                            total += min(1.0, max(0.0, a * a * inv))
                        da = 2.0 * a * inv
                        db = -a * a * cv * inv * inv
                        dc = -a * a * b * inv * inv
                    cbuf[0, j, x] = gc * da
                    if need_m:
                        cbuf[mb, j, x] = gc * dc
                        cbuf[mb + 1, j, x] = -gc * (da * s_f + 2.0 * dc * s_m) / n
                    if need_f:
                        cbuf[fb, j, x] = gc * db
                        cbuf[fb + 1, j, x] = -gc * (da * s_m + 2.0 * db * s_f) / n
            _box_x_inplace(cbuf, nq2, nyc, width, rx, tmp)
            slot_b = ring_b[c % wz]
            _box_y(cbuf, yc0, nq2, slot_b, y0, y0, y1, height, ry, width, tmp)
            _add_plane(acc_b, slot_b, nq2, nyo, width, 1.0)
            c_next += 1
        while c_rm < k - rz:
            _add_plane(acc_b, ring_b[c_rm % wz], nq2, nyo, width, -1.0)
            c_rm += 1
        for y in range(y0, y1):
            j = y - y0
            for x in range(width):
                w = 1.0
                if weighted:
                    w = 1.0 if mask[k, y, x] else 0.0
                f = (F[k, y, x] - f_mean) * f_inv
                m = (M[k, y, x] - m_mean) * m_inv
                if need_m:
                    dM[k, y, x] = w * m_inv * (f * acc_b[0, j, x] + 2.0 * m * acc_b[mb, j, x] + acc_b[mb + 1, j, x])
                if need_f:
                    dF[k, y, x] = w * f_inv * (m * acc_b[0, j, x] + 2.0 * f * acc_b[fb, j, x] + acc_b[fb + 1, j, x])
    return total


@njit(parallel=True, cache=True)
def lncc_backward(F, M, mask, has_mask, radii, stats, zeros_mode, n_const, eps, tau, signed, g, g_scalar,
                  g_is_map, need_f, need_m, dF, dM, items):
    """Gradients of Σ g·v with respect to F and M (raw units), written into dF and dM; returns Σ v.

    The sum of the map comes for free from the window sums the backward needs anyway, so a loss can
    get its value and its gradient from this one pass.
    """
    partial = np.zeros(items.shape[0])
    for it in prange(items.shape[0]):
        partial[it] = _lncc_backward_item(F, M, mask, has_mask, radii, stats, zeros_mode, n_const, eps, tau,
                                          signed, g, g_scalar, g_is_map, need_f, need_m, dF, dM, items[it])
    return partial.sum()


@njit(cache=True, fastmath={"reassoc"})
def pair_stats(F, M, mask, has_mask):
    """Mean and standard deviation of F and of M over the mask, in one pass over both.

    Sums are taken of x − x[first] in float64: shifting by a data value keeps E[d²] − E[d]² from
    cancelling whatever the offset of the image. Reassociation only lets the sums vectorize.
    """
    depth, height, width = F.shape
    f0 = np.float64(F[0, 0, 0])
    m0 = np.float64(M[0, 0, 0])
    sums = np.zeros((depth, 5))
    for z in range(depth):
        sf = 0.0
        sff = 0.0
        sm = 0.0
        smm = 0.0
        count = 0.0
        for y in range(height):
            if has_mask:
                for x in range(width):
                    w = 1.0 if mask[z, y, x] else 0.0
                    df = (F[z, y, x] - f0) * w
                    dm = (M[z, y, x] - m0) * w
                    sf += df
                    sff += df * df
                    sm += dm
                    smm += dm * dm
                    count += w
            else:
                for x in range(width):
                    df = F[z, y, x] - f0
                    dm = M[z, y, x] - m0
                    sf += df
                    sff += df * df
                    sm += dm
                    smm += dm * dm
                count += width
        sums[z, 0] = sf
        sums[z, 1] = sff
        sums[z, 2] = sm
        sums[z, 3] = smm
        sums[z, 4] = count
    total = sums.sum(axis=0)
    out = np.array([0.0, 1.0, 0.0, 1.0])
    if total[4] == 0:
        return out
    mf = total[0] / total[4]
    mm = total[2] / total[4]
    out[0] = f0 + mf
    out[1] = math.sqrt(max(0.0, total[1] / total[4] - mf * mf))
    out[2] = m0 + mm
    out[3] = math.sqrt(max(0.0, total[3] / total[4] - mm * mm))
    return out
