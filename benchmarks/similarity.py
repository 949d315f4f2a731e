"""Time our LNCC against the common implementations, re-implemented here, in one run.

    python benchmarks/similarity.py            # the acceptance shapes (forward 160×192×224, fwd+bwd 96×112×96)
    python benchmarks/similarity.py --small    # a quick run on small shapes
    python benchmarks/similarity.py --device cuda   # on a GPU, also against the fused-lncc package

Baselines (float32, as their authors ship them): VoxelMorph's five conv3d, FastLNCC's one grouped
conv3d over the five stacked channels, and MONAI's separable (three 1D) box filtering. Each one's
error is measured against its own formula evaluated in float64 (scipy's uniform filters, an
independent code path); ours against the same for ANTs-style valid windows. Inputs are raw CT-like
values (−1024..3071 HU), the case where float32 box sums fall apart.

Timings are medians over rounds; every round times every method in turn, so a busy machine slows
them all alike (methods faster than a second are called a few times per round, as timeit does). Peak memory of our forward+backward is measured in a fresh process as the growth of peak
RSS (VmHWM, reset through /proc/self/clear_refs) over the RSS with the inputs already allocated,
in units of one float32 volume.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from AutoRegisterLib.similarity import FLAT_VARIANCE, lncc  # noqa: E402

FORWARD_SHAPE = (160, 192, 224)
BACKWARD_SHAPE = (96, 112, 96)
SMALL_FORWARD_SHAPE = (64, 72, 80)
SMALL_BACKWARD_SHAPE = (48, 56, 48)


# ----------------------------------------------------------------------------------------------------
# Baselines, as published (all compute VoxelMorph's zero-padded cc with N = w³ and 1e-5)
# ----------------------------------------------------------------------------------------------------
def _cc_from_sums(i_sum, j_sum, i2_sum, j2_sum, ij_sum, win_size):
    u_i = i_sum / win_size
    u_j = j_sum / win_size
    cross = ij_sum - u_j * i_sum - u_i * j_sum + u_i * u_j * win_size
    i_var = i2_sum - 2 * u_i * i_sum + u_i * u_i * win_size
    j_var = j2_sum - 2 * u_j * j_sum + u_j * u_j * win_size
    return cross * cross / (i_var * j_var + 1e-5)


def voxelmorph_cc(i, j, win=9):
    """VoxelMorph: five conv3d calls with a ones kernel."""
    filt = torch.ones((1, 1, win, win, win), dtype=i.dtype, device=i.device)
    pad = win // 2
    sums = [nnf.conv3d(x, filt, padding=pad) for x in (i, j, i * i, j * j, i * j)]
    return _cc_from_sums(*sums, win**3)


def fastlncc_cc(i, j, win=9):
    """FastLNCC: one grouped conv3d over the five quantities stacked as channels."""
    stack = torch.cat([i, j, i * i, j * j, i * j], dim=1)
    filt = torch.ones((5, 1, win, win, win), dtype=i.dtype, device=i.device)
    sums = nnf.conv3d(stack, filt, padding=win // 2, groups=5)
    return _cc_from_sums(*sums.unbind(1), win**3).unsqueeze(1)


def monai_cc(i, j, win=9):
    """MONAI LocalNormalizedCrossCorrelationLoss (rectangular kernel): separable 1D filtering."""

    def separable(x):
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = win
            pad = [0, 0, 0]
            pad[axis] = win // 2
            x = nnf.conv3d(x, torch.ones(shape, dtype=x.dtype, device=x.device), padding=tuple(pad))
        return x

    t2, p2, tp = i * i, j * j, i * j
    t_sum, p_sum, t2_sum, p2_sum, tp_sum = (separable(x) for x in (i, j, t2, p2, tp))
    vol = float(win**3)
    t_avg, p_avg = t_sum / vol, p_sum / vol
    cross = tp_sum - p_avg * t_sum
    t_var = torch.clamp(t2_sum - t_avg * t_sum, min=1e-5)
    p_var = torch.clamp(p2_sum - p_avg * p_sum, min=1e-5)
    return cross * cross / (t_var * p_var + 1e-5)


BASELINES = {"voxelmorph 5×conv3d": voxelmorph_cc, "FastLNCC grouped conv3d": fastlncc_cc, "MONAI separable": monai_cc}


# ----------------------------------------------------------------------------------------------------
# Independent float64 references (scipy's running-sum uniform filter in double precision)
# ----------------------------------------------------------------------------------------------------
def _box64(x, win):
    return ndimage.uniform_filter(x, size=win, mode="constant", cval=0.0) * float(win**3)


def reference_zeros(i, j, win=9, monai=False):
    """VoxelMorph's (or MONAI's) cc in float64 from raw values."""
    sums = [_box64(x, win) for x in (i, j, i * i, j * j, i * j)]
    if not monai:
        return _cc_from_sums(*sums, win**3)
    t_sum, p_sum, t2_sum, p2_sum, tp_sum = sums
    vol = float(win**3)
    cross = tp_sum - p_sum / vol * t_sum
    t_var = np.maximum(t2_sum - t_sum / vol * t_sum, 1e-5)
    p_var = np.maximum(p2_sum - p_sum / vol * p_sum, 1e-5)
    return cross * cross / (t_var * p_var + 1e-5)


def reference_valid(i, j, win=9):
    """Our documented cc (clipped windows, flat windows 0) in float64 from raw values."""
    ones = np.ones_like(i)
    n = _box64(ones, win)
    si, sj = _box64(i, win), _box64(j, win)
    cross = _box64(i * j, win) - si * sj / n
    vi = _box64(i * i, win) - si * si / n
    vj = _box64(j * j, win) - sj * sj / n
    ok = (vi > FLAT_VARIANCE * i.var() * n) & (vj > FLAT_VARIANCE * j.var() * n)
    return np.clip(np.where(ok, cross**2 / np.where(ok, vi * vj, 1), 0), 0, 1)


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def ct_pair(shape, seed=0):
    """A synthetic head CT (air, tissue with noise, a bone shell) and a slightly warped copy, as float32."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")

    def head(offset):
        zz, yy, xx = grids[0], grids[1] + offset, grids[2]
        r = np.sqrt(zz**2 / 0.8 + yy**2 + xx**2 / 0.9)
        img = np.where(r < 0.85, 40.0, -1024.0).astype(np.float32)
        img += np.where(r < 0.85, 30 * np.sin(9 * xx) * np.cos(7 * yy), 0).astype(np.float32)
        img = np.where((r > 0.72) & (r < 0.8), 1200 + 800 * np.cos(13 * zz), img)
        return img

    fixed = head(0.0) + rng.normal(0, 12, shape).astype(np.float32)
    moving = head(0.03) + rng.normal(0, 12, shape).astype(np.float32)
    return np.clip(fixed, -1024, 3071).astype(np.float32), np.clip(moving, -1024, 3071).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device):
    """Seconds for one call of fn()."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def run_rounds(methods: dict, rounds: int, device: str) -> dict:
    """Median seconds per call, every round timing each method in turn (after one warm-up call).

    A method faster than a second is called several times per round (up to 10, about a second's
    worth), as timeit does, so that one hiccup of a shared machine does not decide its median.
    """
    repeats = {name: max(1, min(10, int(1.0 / max(time_call(fn, device), 1e-3)))) for name, fn in methods.items()}
    times = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            times[name].extend(time_call(fn, device) for _ in range(repeats[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def _forward_methods(fixed, moving, win, device):
    f = torch.from_numpy(fixed)[None, None].to(device)
    m = torch.from_numpy(moving)[None, None].to(device)
    methods = {"ours lncc": lambda: lncc(f, m, window=win)}
    for name, fn in BASELINES.items():
        methods[name] = (lambda fn=fn: fn(f, m, win).mean())
    fused = _fused_lncc_package(device)
    if fused is not None:
        methods["fused-lncc package"] = lambda: fused(m, f, kernel_size=win)
    return methods


def _backward_methods(fixed, moving, win, device):
    f = torch.from_numpy(fixed)[None, None].to(device)
    m0 = torch.from_numpy(moving)[None, None].to(device)

    def step(loss_fn):
        m = m0.clone().requires_grad_(True)
        loss_fn(m).backward()
        return m.grad

    methods = {"ours lncc": lambda: step(lambda m: -lncc(f, m, window=win))}
    for name, fn in BASELINES.items():
        methods[name] = (lambda fn=fn: step(lambda m: -fn(f, m, win).mean()))
    fused = _fused_lncc_package(device)
    if fused is not None:
        methods["fused-lncc package"] = lambda: step(lambda m: fused(m, f, kernel_size=win))
    return methods


def _fused_lncc_package(device):
    if device != "cuda":
        return None
    try:
        from fused_lncc import fused_lncc_loss
    except ImportError:
        print("(fused-lncc is not installed; pip install fused-lncc on a CUDA machine to compare)")
        return None
    return fused_lncc_loss


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------
def forward_errors(fixed, moving, win, device):
    """Max abs error of each method's cc map against the float64 evaluation of its own formula."""
    f64, m64 = fixed.astype(np.float64), moving.astype(np.float64)
    f = torch.from_numpy(fixed)[None, None].to(device)
    m = torch.from_numpy(moving)[None, None].to(device)
    ours = lncc(f, m, window=win, reduction="none")[0, 0].cpu().numpy().astype(np.float64)
    errors = {"ours lncc": float(np.abs(ours - reference_valid(f64, m64, win)).max())}
    ref_zeros = reference_zeros(f64, m64, win)
    for name, fn in BASELINES.items():
        ref = reference_zeros(f64, m64, win, monai=True) if "MONAI" in name else ref_zeros
        with torch.no_grad():
            got = fn(f, m, win)[0, 0].cpu().numpy().astype(np.float64)
        errors[name] = float(np.nanmax(np.abs(got - ref))) if np.isfinite(got).all() else float("nan")
        errors[name + " range"] = (float(np.nanmin(got)), float(np.nanmax(got)))
    return errors


def gradient_errors(fixed, moving, win, device):
    """Relative L2 error of each method's float32 gradient against the float64 gradient of its formula.

    The float64 references come from our running-sum engine on raw float64 values: boundary="zeros"
    is VoxelMorph's formula exactly (FastLNCC's too; MONAI differs only where a variance is below
    1e-5, which raw CT values never reach), and "valid" is ours. float64 conv3d on CPU would need an
    im2col buffer of several GB.
    """

    def grad(fn, dtype):
        f = torch.from_numpy(fixed)[None, None].to(device, dtype)
        m = torch.from_numpy(moving)[None, None].to(device, dtype).requires_grad_(True)
        fn(f, m).backward()
        return m.grad.double().cpu()

    def relative(got, ref):
        return float((got - ref).norm() / ref.norm())

    ref_valid = grad(lambda f, m: -lncc(f, m, window=win, engine="running_sum"), torch.float64)
    ref_zeros = grad(lambda f, m: -lncc(f, m, window=win, boundary="zeros", engine="running_sum"), torch.float64)
    out = {"ours lncc": relative(grad(lambda f, m: -lncc(f, m, window=win), torch.float32), ref_valid)}
    for name, fn in BASELINES.items():
        out[name] = relative(grad(lambda f, m, fn=fn: -fn(f, m, win).mean(), torch.float32), ref_zeros)
    return out


def peak_memory_volumes(shape, win) -> float:
    """Peak RSS growth of our forward+backward, in float32 volumes, measured in a fresh process."""
    code = f"""
import numpy as np, torch, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
torch.set_num_threads(2)
from AutoRegisterLib.similarity import lncc
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
small = torch.rand(1, 1, 12, 12, 12)
lncc(small, small.clone().requires_grad_(True)).backward()   # compile or load the kernels first
rng = np.random.default_rng(0)
f = torch.from_numpy(rng.normal(size={tuple(shape)!r}).astype(np.float32))[None, None]
m = torch.from_numpy(rng.normal(size={tuple(shape)!r}).astype(np.float32))[None, None].requires_grad_(True)
open('/proc/self/clear_refs', 'w').write('5')
before = rss('VmRSS')
(-lncc(f, m, window={win})).backward()
peak = rss('VmHWM')
print((peak - before) / (4 * f.numel()))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return float(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--small", action="store_true", help="small shapes for a quick run")
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    try:
        import numba

        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        print("(numba is not installed: the fused CPU engine is unavailable)")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2
    fwd_shape = SMALL_FORWARD_SHAPE if args.small else FORWARD_SHAPE
    bwd_shape = SMALL_BACKWARD_SHAPE if args.small else BACKWARD_SHAPE
    win = args.window

    # Warm the JIT (and its on-disk cache) before anything is timed.
    tiny = torch.rand(1, 1, 16, 16, 16)
    lncc(tiny, tiny.clone().requires_grad_(True), window=win).backward()
    lncc(tiny, tiny, window=win, reduction="none")

    print(f"device {args.device}, {args.threads} threads, window {win}, rounds {args.rounds}")
    fixed, moving = ct_pair(fwd_shape)
    fwd = run_rounds(_forward_methods(fixed, moving, win, args.device), args.rounds, args.device)
    print("forward s:", {k: round(v, 4) for k, v in fwd.items()}, flush=True)
    bf, bm = ct_pair(bwd_shape, seed=1)
    bwd = run_rounds(_backward_methods(bf, bm, win, args.device), args.rounds, args.device)
    print("forward+backward s:", {k: round(v, 4) for k, v in bwd.items()}, flush=True)
    fwd_err = forward_errors(fixed, moving, win, args.device)
    grad_err = gradient_errors(bf, bm, win, args.device)
    memory = peak_memory_volumes(bwd_shape, win) if args.device == "cpu" else float("nan")

    base = "FastLNCC grouped conv3d"
    print(f"\nforward on 1×1×{'×'.join(map(str, fwd_shape))}, forward+backward on 1×1×{'×'.join(map(str, bwd_shape))}")
    header = f"{'method':26s} {'fwd s':>8s} {'fwd ×':>7s} {'f+b s':>8s} {'f+b ×':>7s} {'cc max err':>11s} {'grad rel err':>12s}  cc range"
    print(header)
    print("-" * len(header))
    for name in fwd:
        rng = fwd_err.get(name + " range")
        rng_s = f"[{rng[0]:.3g}, {rng[1]:.3g}]" if rng else ""
        print(
            f"{name:26s} {fwd[name]:8.3f} {fwd[base] / fwd[name]:7.1f} {bwd.get(name, float('nan')):8.3f} "
            f"{bwd[base] / bwd.get(name, float('nan')):7.1f} {fwd_err.get(name, float('nan')):11.2e} "
            f"{grad_err.get(name, float('nan')):12.2e}  {rng_s}"
        )
    print(f"\n× = speed-up over {base} (higher is better)")
    print(f"peak memory of our forward+backward: {memory:.2f} float32 volumes (peak RSS growth)")
    ok = {
        "forward ≥10× grouped conv": fwd[base] / fwd["ours lncc"] >= 10,
        "fwd+bwd ≥40× grouped conv": bwd[base] / bwd["ours lncc"] >= 40,
        "cc max err ≤1e-4": fwd_err["ours lncc"] <= 1e-4,
        "grad rel err ≤1e-3": grad_err["ours lncc"] <= 1e-3,
        "memory ≤12 volumes": memory <= 12 if args.device == "cpu" else True,
    }
    for check, passed in ok.items():
        print(f"  {'PASS' if passed else 'FAIL'}  {check}")
    if args.json:
        args.json.write_text(json.dumps({"forward_s": fwd, "fwd_bwd_s": bwd, "cc_err": {k: v for k, v in fwd_err.items() if "range" not in k},
                                         "grad_rel_err": grad_err, "memory_volumes": memory, "checks": ok}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
