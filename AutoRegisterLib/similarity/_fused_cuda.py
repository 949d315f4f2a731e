"""The CUDA engine: fused CuPy kernels for LNCC (forward and backward) and LocalStd's pointwise steps.

Written to mirror the CPU kernels line by line (same quantities, same coefficients, float64 sums),
but NOT run on this project's machines, which have no GPU: the CUDA tests skip there. Memory is not
tuned (it keeps the six window sums as float64 volumes); speed comes from doing each step in one
kernel launch rather than from streaming.

Box sums are clipped running sums along one axis per launch, one thread per line, accumulated in
double: exact to rounding, like the CPU engine.
"""

from __future__ import annotations

import math

import torch

from ._inputs import FLAT_VARIANCE, ZEROS_EPS, batch_grad, fused_backward, remember_inputs

_BOX_AXIS = r"""
extern "C" __global__
void box_axis(const double* src, double* dst, long long n_lines, long long len, long long inner, int r) {
    long long line = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (line >= n_lines) return;
    long long o = line / inner, i = line % inner;
    const double* s = src + o * len * inner + i;
    double* d = dst + o * len * inner + i;
    double acc = 0.0;
    for (long long k = 0; k < r && k < len; ++k) acc += s[k * inner];
    for (long long k = 0; k < len; ++k) {
        if (k + r < len) acc += s[(k + r) * inner];
        d[k * inner] = acc;
        if (k - r >= 0) acc -= s[(k - r) * inner];
    }
}
"""

# Per-voxel quantities of the forward sums, on centred and scaled values (weighted by the mask).
_QUANTITIES = (
    "float64 F, float64 M, float64 w, float64 f_mean, float64 f_inv, float64 m_mean, float64 m_inv",
    "float64 q0, float64 q1, float64 q2, float64 q3, float64 q4",
    """
    double f = (F - f_mean) * f_inv * w;
    double m = (M - m_mean) * m_inv * w;
    q0 = f; q1 = m; q2 = f * f; q3 = m * m; q4 = f * m;
    """,
    "lncc_quantities",
)

# The map value and the backward coefficients from the window sums (one launch for both).
_FINISH = (
    "float64 s_f, float64 s_m, float64 s_ff, float64 s_mm, float64 s_fm, float64 n, float64 inside, "
    "float64 g, bool zeros_mode, bool is_signed, float64 eps, float64 tau",
    "float64 v, float64 c_a, float64 c_bm, float64 c_gm, float64 c_bf, float64 c_gf",
    """
    v = 0.0; c_a = 0.0; c_bm = 0.0; c_gm = 0.0; c_bf = 0.0; c_gf = 0.0;
    if (inside != 0.0 && n > 0.0) {
        double a = s_fm - s_f * s_m / n;
        double b = s_ff - s_f * s_f / n;
        double c = s_mm - s_m * s_m / n;
        double den;
        bool ok;
        if (zeros_mode) { den = b * c + eps; ok = den > 0.0; }
        else { den = b * c; ok = (b > tau * n) && (c > tau * n); }
        if (ok) {
            double da, db, dc;
            if (is_signed) {
                double s = rsqrt(den);
                v = fmin(1.0, fmax(-1.0, a * s));
                da = s; db = -0.5 * a * c * s * s * s; dc = -0.5 * a * b * s * s * s;
            } else {
                double inv = 1.0 / den;
                v = fmin(1.0, fmax(0.0, a * a * inv));
                da = 2.0 * a * inv; db = -a * a * c * inv * inv; dc = -a * a * b * inv * inv;
            }
            c_a = g * da;
            c_bm = g * dc;
            c_gm = -g * (da * s_f + 2.0 * dc * s_m) / n;
            c_bf = g * db;
            c_gf = -g * (da * s_m + 2.0 * db * s_f) / n;
        }
    }
    """,
    "lncc_finish",
)

# dL/dM_k = w·inv·(F·box(a) + 2·M·box(bM) + box(γM)), on the centred values.
_COMBINE = (
    "float64 X, float64 Y, float64 w, float64 x_mean, float64 x_inv, float64 y_mean, float64 y_inv, "
    "float64 box_a, float64 box_b, float64 box_g",
    "float64 d",
    """
    double x = (X - x_mean) * x_inv;
    double y = (Y - y_mean) * y_inv;
    d = w * y_inv * (x * box_a + 2.0 * y * box_b + box_g);
    """,
    "lncc_combine",
)

_STD_FORWARD = (
    "float64 s1, float64 s2, float64 n, float64 eps",
    "float64 std",
    "double v = (s2 - s1 * s1 / n) / n; std = sqrt(fmax(v, 0.0) + eps);",
    "local_std_forward",
)
_STD_PREP = (
    "float64 g, float64 s1, float64 s2, float64 n, float64 eps",
    "float64 d_s1, float64 d_s2",
    """
    double v = (s2 - s1 * s1 / n) / n;
    double dv = v > 0.0 ? g / (2.0 * sqrt(v + eps)) : 0.0;
    d_s1 = -2.0 * s1 * dv / (n * n);
    d_s2 = dv / n;
    """,
    "local_std_backward_prep",
)
_STD_COMBINE = ("float64 b1, float64 b2, float64 x", "float64 d", "d = b1 + 2.0 * x * b2;", "local_std_combine")

_compiled: dict = {}


def available():
    """Whether the CuPy kernels can run here, and why not."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False, "CuPy is not installed (pip install 'AutoRegisterLib[cuda]')"
    return True, ""


def _kernel(spec):
    """Compile an ElementwiseKernel once per process."""
    import cupy

    if spec[3] not in _compiled:
        _compiled[spec[3]] = cupy.ElementwiseKernel(*spec)
    return _compiled[spec[3]]


def _cp(t: torch.Tensor):
    """Zero-copy view of a CUDA tensor as a CuPy array."""
    import cupy

    return cupy.from_dlpack(t.detach().contiguous())


def _th(a) -> torch.Tensor:
    """Zero-copy view of a CuPy array as a torch tensor."""
    return torch.from_dlpack(a)


def _stream():
    """Run CuPy work on torch's current stream, so the two never race."""
    import cupy

    return cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)


def _box(q, rad):
    """Clipped box sum over the last three axes of a (Q, D, H, W) float64 CuPy array."""
    import cupy

    if "box_axis" not in _compiled:
        _compiled["box_axis"] = cupy.RawKernel(_BOX_AXIS, "box_axis")
    kernel = _compiled["box_axis"]
    src = q
    dst = cupy.empty_like(q)
    lead, (depth, height, width) = q.shape[0], q.shape[1:]
    # (outer, len, inner) views of a C-ordered (Q, D, H, W) array, one per axis.
    for outer, length, inner, r in (
        (lead, depth, height * width, rad[0]),
        (lead * depth, height, width, rad[1]),
        (lead * depth * height, width, 1, rad[2]),
    ):
        if r == 0:
            continue
        n_lines = outer * inner
        threads = 128
        kernel(((n_lines + threads - 1) // threads,), (threads,),
               (src, dst, cupy.int64(n_lines), cupy.int64(length), cupy.int64(inner), cupy.int32(r)))
        src, dst = dst, src
    return src


def _stats(x, w):
    """Mean and std of a float64 tensor over a weight mask (torch, float64)."""
    count = w.sum().clamp(min=1)
    mean = (x * w).sum() / count
    std = float((((x - mean) * w).square().sum() / count).sqrt())
    return float(mean), (1.0 / std if std > 0 else 1.0)


class _CudaProblem:
    """One (fixed, moving) batch as float64 CUDA tensors with the settings of the kernels."""

    def __init__(self, f, m, mask, rad, boundary):
        spatial = tuple(f.shape[1:])
        if len(spatial) == 2:
            spatial, rad = (1,) + spatial, (0,) + tuple(rad)
        self.shape, self.rad = spatial, tuple(rad)
        self.f = f.detach().to(torch.float64).reshape(-1, *spatial).contiguous()
        self.m = m.detach().to(torch.float64).reshape(-1, *spatial).contiguous()
        self.inside = (torch.ones_like(self.f) if mask is None else mask.to(torch.float64).reshape(-1, *spatial))
        self.zeros_mode = boundary == "zeros"
        # In "valid" mode the mask weights the sums; in "zeros" mode it only restricts the output.
        self.weight = torch.ones_like(self.f) if self.zeros_mode else self.inside
        self.n_const = float(math.prod(2 * r + 1 for r in self.rad))
        self.stats = []
        for i in range(self.f.shape[0]):
            if self.zeros_mode:
                self.stats.append((0.0, 1.0, 0.0, 1.0))
            else:
                self.stats.append(_stats(self.f[i], self.weight[i]) + _stats(self.m[i], self.weight[i]))

    def sums(self, i):
        """The six window sums (F, M, F², M², F·M, N) of batch item i, float64 CuPy arrays."""
        import cupy

        fm, fi, mm, mi = self.stats[i]
        w = _cp(self.weight[i])
        q = cupy.empty((6,) + self.shape, dtype=cupy.float64)
        _kernel(_QUANTITIES)(_cp(self.f[i]), _cp(self.m[i]), w, fm, fi, mm, mi, q[0], q[1], q[2], q[3], q[4])
        q[5] = w
        s = _box(q, self.rad)
        if self.zeros_mode:
            s[5] = self.n_const
        return s

    def run(self, signed, grad, need_f, need_m):
        """The map (B, *spatial) and, if grad is given, the gradients with respect to F and M."""
        import cupy

        v_all = torch.empty_like(self.f)
        d_f = torch.empty_like(self.f) if need_f else None
        d_m = torch.empty_like(self.f) if need_m else None
        eps = ZEROS_EPS if self.zeros_mode else 0.0
        with _stream():
            for i in range(self.f.shape[0]):
                s = self.sums(i)
                g = 1.0 if grad is None else (grad if isinstance(grad, float) else _cp(grad[i]))
                coef = cupy.empty((6,) + self.shape, dtype=cupy.float64)
                _kernel(_FINISH)(s[0], s[1], s[2], s[3], s[4], s[5], _cp(self.inside[i]), g,
                                 self.zeros_mode, signed, eps, FLAT_VARIANCE, *coef)
                v_all[i] = _th(coef[0])
                if grad is None:
                    continue
                boxed = _box(coef[1:], self.rad)
                fm, fi, mm, mi = self.stats[i]
                w = _cp(self.weight[i])
                if need_m:
                    out = cupy.empty(self.shape, dtype=cupy.float64)
                    _kernel(_COMBINE)(_cp(self.f[i]), _cp(self.m[i]), w, fm, fi, mm, mi, boxed[0], boxed[1], boxed[2], out)
                    d_m[i] = _th(out)
                if need_f:
                    out = cupy.empty(self.shape, dtype=cupy.float64)
                    _kernel(_COMBINE)(_cp(self.m[i]), _cp(self.f[i]), w, mm, mi, fm, fi, boxed[0], boxed[3], boxed[4], out)
                    d_f[i] = _th(out)
        return v_all, d_f, d_m


class FusedLNCCCuda(torch.autograd.Function):
    """LNCC (or signed ZNCC) map through the CuPy kernels, with the analytic backward."""

    @staticmethod
    def forward(ctx, f, m, mask, rad, boundary, signed):
        """The per-voxel map, shaped like f."""
        problem = _CudaProblem(f, m, mask, rad, boundary)
        ctx.problem, ctx.signed = problem, signed
        remember_inputs(ctx, f, m)
        v, _, _ = problem.run(signed, None, False, False)
        return v.reshape(f.shape).to(torch.float64 if torch.float64 in (f.dtype, m.dtype) else torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        """Recompute the sums, box the coefficients, combine."""
        return fused_backward(ctx, grad_out, _gradients)


def _gradients(ctx, grad_out, need_f: bool, need_m: bool):
    """The gradients of FusedLNCCCuda's f and m (None when not needed) for the incoming map gradient."""
    _, d_f, d_m = ctx.problem.run(ctx.signed, batch_grad(grad_out, ctx.problem.shape), need_f, need_m)
    return d_f, d_m


def fused_map(f, m, mask, rad, boundary: str, signed: bool) -> torch.Tensor:
    """The per-voxel cc (or signed zncc) map on CUDA, differentiable."""
    return FusedLNCCCuda.apply(f, m, mask, tuple(rad), boundary, signed)


class LocalStdKernels:
    """LocalStd's pointwise steps as fused CuPy elementwise kernels (same contract as the torch ones)."""

    @staticmethod
    def forward_std(s1, s2, n, eps):
        """std = sqrt(max(0, v) + eps) in one kernel."""
        with _stream():
            out = _kernel(_STD_FORWARD)(_cp(s1), _cp(s2), _cp(n.expand_as(s1)), float(eps))
        return _th(out)

    @staticmethod
    def backward_prep(g, s1, s2, n, eps):
        """dS1, dS2 in one kernel."""
        with _stream():
            d1, d2 = _kernel(_STD_PREP)(_cp(g), _cp(s1), _cp(s2), _cp(n.expand_as(s1)), float(eps))
        return _th(d1), _th(d2)

    @staticmethod
    def combine(b1, b2, x):
        """dI = box(dS1) + 2·I·box(dS2) in one kernel."""
        with _stream():
            out = _kernel(_STD_COMBINE)(_cp(b1), _cp(b2), _cp(x))
        return _th(out)
