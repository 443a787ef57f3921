"""Benchmark torch_convt against torch.nn on real transposed-convolution layers.

Usage: ``python -m torch_convt.bench [--quick] [--case NAME] [--mode fwd|train|both] ...``

How the measurement works
-------------------------
* Every case builds a ``torch.nn.ConvTransposeNd`` and a ``torch_convt.ConvTransposeNd``
  with the same arguments and weights (``load_state_dict``), and first checks that our
  forward (module and functional) matches torch: max |ours - torch| relative to max |torch|.
  The training step also compares grad_input, grad_weight and grad_bias.
* Modes: ``fwd`` is one forward under ``torch.no_grad()``; ``train`` is one training step
  (forward + backward w.r.t. input, weight and bias with a fixed output gradient, grads reset
  to None before each step; the weights are negated in place before each step, so that, as after
  an optimizer step, no step runs on the weights of the one before: torch_convt keeps weights
  prepared for a call (Winograd-transformed) for later calls with the same weights, which
  inference gets and training does not).
* Both implementations are warmed up, then the number of iterations per sample is calibrated
  (separately for each) so that one sample lasts at least ``--sample-ms`` (100 ms; 30 ms with
  ``--quick``).
* Samples are taken interleaved in ABBA order (torch, ours, ours, torch, ...) in the same
  process, so slow drifts (turbo, thermal, other load) hit both sides equally; the reported
  time is the median of the per-sample means (7 samples, 3 with ``--quick``; cases slower than
  ``--budget-s`` take fewer, at least 3). The ``spread`` column is the larger of the two sides'
  (max - min) / median over the samples: a quick noise indicator.
* GFLOP/s uses the direct-convolution count 2*N*Cin*(Cout/groups)*prod(kernel)*prod(in spatial)
  (x3 for a training step), also where a layer computes fewer multiply-adds than that (float32 layers by
  Winograd on AVX-512 CPUs: stride-1 3x3x3 kernels 0.30 of them, stride-2 transposed kernel 4 in 3d 0.42,
  DCGAN's 2d one 0.56, kernel 3 in 3d 0.58; in a training step also the input gradients of the kernel-4 ones,
  convolutions at stride 2, 0.42 and 0.56), so GFLOP/s
  is the rate of the direct convolution that gives the same result in the same time. % of peak is relative
  to the machine's fp32 FMA peak, measured at start on all threads by our own register-only FMA loop
  (``torch.ops.torch_convt.cpu_fma_peak_gflops``; on CUDA, a large ``torch.mm``); a large ``torch.mm``
  (sgemm) is printed beside it for reference. Where bfloat16 layers run on AMX tiles or on AVX512-BF16 dot
  products, bfloat16 cases are relative to that unit's bfloat16 peak instead, measured the same way
  (``cpu_amx_peak_gflops``).
* GB/s counts the bytes a call must move at least: input + output + weight for a forward, three times
  input + output plus the weight and its gradient for a training step. %bw is relative to the copy
  bandwidth (``Tensor.copy_`` of 256 MiB on all threads: read + write bytes) measured at start: the
  figure of merit of memory-bound cases (kernel == stride).
* workspace: peak memory of one forward call beyond its output (Linux: VmHWM after resetting it,
  minus VmRSS before), for ours and for torch.nn; buffers served from memory the process already
  holds are not seen.
* 16-bit cases (bfloat16, float16) also time our forward in float32 on the same shape and values, ABBA
  against our 16-bit forward, and print the time ratio under the table (< 1: the 16-bit forward is faster).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch

IntOrTuple = Union[int, Tuple[int, ...]]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "float64": torch.float64}
# (forward rtol, gradient rtol), relative to the max |reference|.
TOLERANCES = {torch.float32: (1e-4, 1e-3), torch.float64: (1e-10, 1e-9),
              torch.bfloat16: (2e-2, 5e-2), torch.float16: (5e-3, 2e-2)}


@dataclass(frozen=True)
class Case:
    name: str
    dims: int
    in_ch: int
    out_ch: int
    kernel: IntOrTuple
    input_shape: Tuple[int, ...]
    stride: IntOrTuple = 1
    padding: IntOrTuple = 0
    output_padding: IntOrTuple = 0
    dilation: IntOrTuple = 1
    groups: int = 1
    dtype: str = "float32"
    quick_shape: Optional[Tuple[int, ...]] = None  # smaller input used with --quick

    def module_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, output_padding=self.output_padding,
                    groups=self.groups, dilation=self.dilation)

    def flops(self, shape: Tuple[int, ...]) -> float:
        k = self.kernel if isinstance(self.kernel, tuple) else (self.kernel,) * self.dims
        return (2.0 * shape[0] * self.in_ch * (self.out_ch // self.groups)
                * math.prod(k) * math.prod(shape[2:]))


CASES = [
    # 3D U-Net decoder up-sampling (k=2, s=2): small and large volume.
    Case("unet_up_small", 3, 64, 32, 2, (2, 64, 16, 16, 16), stride=2),
    Case("unet_up_large", 3, 32, 16, 2, (1, 32, 64, 64, 64), stride=2,
         quick_shape=(1, 32, 32, 32, 32)),
    # MONAI UpSample / UnetrUpBlock style: k=3, s=2, p=1, op=1.
    Case("monai_k3s2p1op1", 3, 64, 32, 3, (1, 64, 16, 16, 16), stride=2, padding=1,
         output_padding=1),
    Case("k4s2p1_3d", 3, 32, 16, 4, (1, 32, 24, 24, 24), stride=2, padding=1,
         quick_shape=(1, 32, 16, 16, 16)),
    Case("s1_k3p1_3d", 3, 32, 32, 3, (1, 32, 24, 24, 24), padding=1,
         quick_shape=(1, 32, 16, 16, 16)),
    # Shapes from the original reports that motivated the package.
    Case("seed_aniso", 3, 16, 33, (3, 5, 2), (2, 16, 10, 50, 100), stride=(2, 1, 1),
         padding=(0, 4, 2), quick_shape=(1, 16, 10, 25, 50)),
    Case("seed_k3s2", 3, 16, 33, 3, (2, 16, 10, 50, 100), stride=2,
         quick_shape=(1, 16, 10, 25, 50)),
    Case("depthwise_3d", 3, 64, 64, 3, (2, 64, 16, 16, 16), stride=2, padding=1,
         output_padding=1, groups=64, quick_shape=(1, 64, 16, 16, 16)),
    Case("dilated_3d", 3, 32, 32, 3, (1, 32, 20, 20, 20), padding=2, dilation=2,
         quick_shape=(1, 32, 14, 14, 14)),
    Case("pointwise_3d", 3, 64, 32, 1, (2, 64, 32, 32, 32), quick_shape=(1, 64, 24, 24, 24)),
    # 2D: DCGAN generator block, grouped, tiny latency-bound layer.
    Case("dcgan_2d", 2, 256, 128, 4, (32, 256, 16, 16), stride=2, padding=1,
         quick_shape=(8, 256, 16, 16)),
    Case("grouped_2d", 2, 128, 128, 3, (8, 128, 32, 32), stride=2, padding=1,
         output_padding=1, groups=4),
    Case("tiny_2d", 2, 8, 8, 3, (1, 8, 8, 8), stride=2, padding=1, output_padding=1),
    # 1D: HiFi-GAN generator up-sampler (k=16, s=8, p=4).
    Case("hifigan_1d", 1, 512, 256, 16, (4, 512, 200), stride=8, padding=4,
         quick_shape=(1, 512, 200)),
    # bfloat16 variants.
    Case("dcgan_2d_bf16", 2, 256, 128, 4, (8, 256, 16, 16), stride=2, padding=1,
         dtype="bfloat16", quick_shape=(4, 256, 16, 16)),
    Case("unet_up_small_bf16", 3, 64, 32, 2, (2, 64, 16, 16, 16), stride=2, dtype="bfloat16",
         quick_shape=(1, 64, 16, 16, 16)),
]


# --------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_loop(fn: Callable[[], None], iters: int, device: torch.device) -> float:
    """Mean seconds per call of ``fn`` over ``iters`` back-to-back calls."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def _calibrate(fn: Callable[[], None], device: torch.device, target_s: float) -> Tuple[int, float]:
    """(iterations for one sample to last >= ``target_s``, estimated seconds per call)."""
    t = _time_loop(fn, 1, device)
    iters = max(1, math.ceil(target_s / max(t, 1e-7)))
    if iters > 1:  # refine with a full-length run, which averages out first-call noise
        t = _time_loop(fn, iters, device)
        iters = max(1, math.ceil(target_s / max(t, 1e-7)))
    return iters, t


def compare_abba(fa: Callable[[], None], fb: Callable[[], None], device: torch.device,
                 samples: int, target_s: float, budget_s: float,
                 warmup: bool = True) -> Tuple[list, list]:
    """Per-sample mean seconds per call of ``fa`` and ``fb``, sampled interleaved in ABBA order.

    Slow cases take fewer samples (at least 3) so that sampling stays within about ``budget_s``."""
    if warmup:  # allocator, caches, lazy init, kernel selection
        fa(); fb(); _sync(device)
    (na, sa), (nb, sb) = _calibrate(fa, device, target_s), _calibrate(fb, device, target_s)
    samples = max(min(samples, 3), min(samples, int(budget_s / (na * sa + nb * sb))))
    ta, tb = [], []
    for i in range(samples):
        order = ((fa, na, ta), (fb, nb, tb))
        for fn, n, out in (order if i % 2 == 0 else order[::-1]):
            out.append(_time_loop(fn, n, device))
    return ta, tb


def measure_cpu_peak(unit: str = "fma", seconds: float = 0.5) -> Optional[float]:
    """The CPU's peak (GFLOP/s, all torch threads) by our register-only loop: fp32 on the FMA units ("fma"), or
    bfloat16 on AMX tiles or AVX512-BF16 dot products ("amx") where bfloat16 layers use them; None where the op is
    missing or reports 0."""
    op = getattr(torch.ops.torch_convt, f"cpu_{unit}_peak_gflops", None)
    return (float(op(seconds)) or None) if op is not None else None


def measure_copy_bandwidth(device: torch.device, mib: int = 256, reps: int = 5) -> float:
    """GB/s of a large ``copy_`` (bytes read + written), median of a few."""
    src = torch.ones(mib << 18, device=device)  # mib MiB of fp32
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [_time_loop(lambda: dst.copy_(src), 1, device) for _ in range(reps)]
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def measure_peak(device: torch.device, dtype: torch.dtype = torch.float32,
                 n: int = 2048, reps: int = 5) -> float:
    """Reference peak GFLOP/s: median of a few large ``torch.mm`` calls (sgemm for fp32)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    times = [_time_loop(lambda: torch.mm(a, b), 1, device) for _ in range(reps)]
    return 2.0 * n ** 3 / statistics.median(times) / 1e9


# --------------------------------------------------------------------------- helpers
def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    if ours.shape != ref.shape:
        raise RuntimeError(f"shape mismatch: ours {tuple(ours.shape)} vs torch {tuple(ref.shape)}")
    wide = torch.float64 if ref.dtype == torch.float64 else torch.float32
    ref_w = ref.detach().to(wide)
    diff = (ours.detach().to(wide) - ref_w).abs().max().item()
    return diff / max(ref_w.abs().max().item(), 1e-30)


def _proc_status_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _workspace_bytes(fwd: Callable[[], torch.Tensor], device: torch.device) -> Optional[int]:
    """Peak memory of one forward call beyond its output (see the module docstring), if measurable."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            y = fwd()
        _sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base - y.numel() * y.element_size())
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current VmRSS
            f.write("5")
    except OSError:
        return None
    before = _proc_status_bytes("VmRSS")
    with torch.no_grad():
        y = fwd()
    peak = _proc_status_bytes("VmHWM")
    if before is None or peak is None:
        return None
    out = y.numel() * y.element_size()
    del y
    return max(0, peak - before - out)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _lscpu_model() -> Optional[str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


class CpuLoad:
    """Share of all CPUs' time used by *other* processes since construction (Linux only)."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        t = os.times()  # this process's (and its threads') CPU seconds
        return sum(v), v[3] + v[4], t.user + t.system  # total ticks, idle+iowait ticks, self s

    def others(self) -> Optional[float]:
        end = self._read()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        total, idle, mine = (e - s for e, s in zip(end, self.start))
        busy = total - idle - mine * os.sysconf("SC_CLK_TCK")
        return min(1.0, max(0.0, busy / total))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- one case
class TorchUnsupported(Exception):
    """torch.nn itself cannot run the case (e.g. a dtype without a CPU kernel): skipped."""


def run_case(tc, case: Case, device: torch.device, modes, samples: int, target_s: float,
             budget_s: float, quick: bool, peak: float, bandwidth: float) -> list:
    dtype = DTYPES[case.dtype]
    shape = case.quick_shape if (quick and case.quick_shape) else case.input_shape
    fwd_tol, grad_tol = TOLERANCES[dtype]
    nn_cls = getattr(torch.nn, f"ConvTranspose{case.dims}d")
    tc_cls = getattr(tc, f"ConvTranspose{case.dims}d")
    tc_fn = getattr(tc.functional, f"conv_transpose{case.dims}d")
    base = dict(case=case.name, dtype=case.dtype, input_shape=list(shape), flops=case.flops(shape))

    torch.manual_seed(0)
    args = (case.in_ch, case.out_ch, case.kernel)
    ref = nn_cls(*args, **case.module_kwargs()).to(device, dtype)
    ours = tc_cls(*args, **case.module_kwargs()).to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(shape, device=device, dtype=dtype)

    # ---- correctness (forward: module + functional), workspace
    problems, errs = [], {}
    with torch.no_grad():
        try:
            y_ref = ref(x)
        except Exception as e:
            raise TorchUnsupported(f"{type(e).__name__}: {e}") from e
        errs["fwd"] = _rel_err(ours(x), y_ref)
        errs["functional"] = _rel_err(
            tc_fn(x, ref.weight, ref.bias, case.stride, case.padding, case.output_padding,
                  case.groups, case.dilation), y_ref)
    problems += [f"{k} err {v:.2e} > {fwd_tol:g}" for k, v in errs.items() if not v <= fwd_tol]
    workspace = _workspace_bytes(lambda: ours(x), device)
    workspace_torch = _workspace_bytes(lambda: ref(x), device)
    elem = x.element_size()
    io_bytes = (x.numel() + y_ref.numel()) * elem
    w_bytes = sum(t.numel() for t in ref.parameters()) * elem
    grad_out = torch.randn_like(y_ref)
    del y_ref

    results = []
    for mode in modes:
        if mode == "fwd":
            def make(mod):
                def step():
                    mod(x)
                return step
            ctx = torch.no_grad()
        else:
            def make(mod):
                xi = x.detach().clone().requires_grad_(True)
                def step():
                    mod.zero_grad(set_to_none=True)
                    xi.grad = None
                    with torch.no_grad():  # (new weights each step, as after an optimizer step)
                        mod.weight.neg_()
                    mod(xi).backward(grad_out)
                step.x = xi
                return step
            ctx = torch.enable_grad()
        with ctx:
            f_ref, f_ours = make(ref), make(ours)
            if mode == "train":  # one step each (warm-up), then compare all three gradients
                f_ref(); f_ours()
                for gname, a, b in (("grad_input", f_ours.x.grad, f_ref.x.grad),
                                    ("grad_weight", ours.weight.grad, ref.weight.grad),
                                    ("grad_bias", ours.bias.grad, ref.bias.grad)):
                    errs[gname] = e = _rel_err(a, b)
                    if not e <= grad_tol:
                        problems.append(f"{gname} err {e:.2e} > {grad_tol:g}")
            # both were warmed up by the correctness checks above
            s_ref, s_ours = compare_abba(f_ref, f_ours, device, samples, target_s, budget_s,
                                         warmup=False)
        t_ref, t_ours, n = statistics.median(s_ref), statistics.median(s_ours), len(s_ref)
        # noise indicator: the larger relative range (max - min) / median of the two sides
        spread = max((max(v) - min(v)) / statistics.median(v) for v in (s_ref, s_ours))
        flops = base["flops"] * (3 if mode == "train" else 1)
        gflops = flops / t_ours / 1e9
        moved = 3 * io_bytes + 2 * w_bytes if mode == "train" else io_bytes + w_bytes
        gbs = moved / t_ours / 1e9
        res = dict(base, mode=mode, samples=n, torch_ms=t_ref * 1e3, ours_ms=t_ours * 1e3,
                   ratio=t_ref / t_ours, spread_pct=100.0 * spread, gflops=gflops,
                   pct_peak=100.0 * gflops / peak, gbs=gbs, pct_bw=100.0 * gbs / bandwidth,
                   workspace_torch_bytes=workspace_torch, torch_samples_ms=[t * 1e3 for t in s_ref],
                   ours_samples_ms=[t * 1e3 for t in s_ours],
                   workspace_bytes=workspace, errors=dict(errs), ok=not problems,
                   problems=list(problems))
        if mode == "fwd" and dtype != torch.float32:
            # the target "a 16-bit forward is no slower than float32": ours in float32 on the same shape and
            # values, timed ABBA against ours in this dtype
            ours32, x32 = copy.deepcopy(ours).float(), x.float()
            with torch.no_grad():
                s32, s16 = compare_abba(lambda: ours32(x32), lambda: ours(x), device, samples, target_s, budget_s)
            res["fp32_ms"], res["fp16bit_ms"] = statistics.median(s32) * 1e3, statistics.median(s16) * 1e3
            res["vs_fp32"] = statistics.median(s16) / statistics.median(s32)  # time ratio: < 1 = 16-bit faster
            del ours32, x32
        results.append(res)
        _log(f"  {case.name:<20s} {mode:<5s} torch {res['torch_ms']:9.3f} ms  ours "
             f"{res['ours_ms']:9.3f} ms  x{res['ratio']:.2f}  ({n} samples, spread "
             f"{res['spread_pct']:.0f}%)  "
             + (f"ours {case.dtype}/float32 time x{res['vs_fp32']:.2f}  " if "vs_fp32" in res else "")
             + f"{'ok' if res['ok'] else 'FAIL: ' + '; '.join(problems)}")
    return results


# --------------------------------------------------------------------------- driver
def _select(cases, patterns, dtype_override):
    if patterns:
        pats = [p.strip() for arg in patterns for p in arg.split(",") if p.strip()]
        cases = [c for c in cases if any(p in c.name for p in pats)]
    if dtype_override:  # override all dtypes; the suite's own dtype variants become redundant
        if any(c.dtype == "float32" for c in cases):
            cases = [c for c in cases if c.dtype == "float32"]
        cases = [dataclasses.replace(c, dtype=dtype_override) for c in cases]
    return cases


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def print_table(results, out=sys.stdout) -> None:
    hdr = (f"{'case':<20s} {'mode':<5s} {'dtype':<8s} {'torch ms':>10s} {'ours ms':>10s} "
           f"{'ratio':>6s} {'spread':>6s} {'GFLOP/s':>8s} {'%peak':>6s} {'GB/s':>6s} {'%bw':>5s} "
           f"{'workspace':>10s} {'torch ws':>10s}  check")
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for r in results:
        if "error" in r:
            print(f"{r['case']:<20s} {r['mode']:<5s} {r['dtype']:<8s}  {r['error']}", file=out)
            continue
        print(f"{r['case']:<20s} {r['mode']:<5s} {r['dtype']:<8s} {r['torch_ms']:10.3f} "
              f"{r['ours_ms']:10.3f} {r['ratio']:6.2f} {r['spread_pct']:5.0f}% {r['gflops']:8.1f} {r['pct_peak']:6.1f} "
              f"{r['gbs']:6.1f} {r['pct_bw']:5.1f} {_fmt_bytes(r['workspace_bytes']):>10s} "
              f"{_fmt_bytes(r['workspace_torch_bytes']):>10s}  {'ok' if r['ok'] else 'FAIL'}", file=out)
    for r in results:
        if "vs_fp32" in r:
            print(f"{r['case']}: ours {r['dtype']} forward {r['fp16bit_ms']:.3f} ms, ours float32 on the same shape "
                  f"{r['fp32_ms']:.3f} ms (ABBA): time x{r['vs_fp32']:.3f} "
                  f"({'no slower' if r['vs_fp32'] <= 1.0 else 'slower'})", file=out)
    for mode in ("fwd", "train"):
        ratios = [r["ratio"] for r in results if r["mode"] == mode and "ratio" in r]
        if ratios:
            gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
            print(f"geomean ratio (torch/ours, >1 = torch_convt faster) {mode:<5s}: "
                  f"{gm:.3f} over {len(ratios)} cases", file=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m torch_convt.bench",
                                description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), help="override every case's dtype")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave as is)")
    p.add_argument("--quick", action="store_true", help="3 samples, smaller inputs (~1 min)")
    p.add_argument("--json", metavar="FILE", help="write all results and machine info here")
    p.add_argument("--case", action="append", metavar="NAME",
                   help="substring of case names (repeatable or comma-separated)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--mode", choices=["fwd", "train", "both"], default="both")
    p.add_argument("--samples", type=int, help="samples per side (default 7, --quick 3)")
    p.add_argument("--sample-ms", type=float,
                   help="min duration of one sample (default 100, --quick 30)")
    p.add_argument("--budget-s", type=float,
                   help="per case and mode sampling budget; slow cases take fewer samples, "
                        "at least 3 (default 20, --quick 4)")
    args = p.parse_args(argv)

    cases = _select(CASES, args.case, args.dtype)
    if args.list:
        for c in cases:
            shape = c.quick_shape if (args.quick and c.quick_shape) else c.input_shape
            print(f"{c.name:<20s} {c.dims}d {c.in_ch}->{c.out_ch} k={c.kernel} s={c.stride} "
                  f"p={c.padding} op={c.output_padding} d={c.dilation} g={c.groups} "
                  f"in={tuple(shape)} {c.dtype}  {c.flops(shape) / 1e9:.3f} GFLOP")
        return 0
    if not cases:
        _log(f"no case matches {args.case}; see --list")
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        _log("error: --device cuda requested but torch.cuda.is_available() is False")
        return 2
    try:
        import torch_convt as tc
        import torch_convt.functional  # noqa: F401
    except ImportError as e:
        _log(f"error: cannot import torch_convt: {e}")
        return 2

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    samples = args.samples or (3 if args.quick else 7)
    target_s = (args.sample_ms or (30.0 if args.quick else 100.0)) / 1e3
    budget_s = args.budget_s or (4.0 if args.quick else 20.0)
    modes = ["fwd", "train"] if args.mode == "both" else [args.mode]

    if device.type == "cuda":
        # torch_convt computes float32 in float32; torch.nn's cuDNN and matmul default to TF32 (10-bit mantissa),
        # which would fail the correctness check (~3e-4 relative) and time a less precise computation.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    print(f"machine: {dev_name} | {platform.system()} {platform.machine()} | "
          f"torch threads {torch.get_num_threads()} (os cpus {os.cpu_count()})")
    print(f"torch {torch.__version__} | torch_convt {getattr(tc, '__version__', '?')} | "
          f"device {device} | {samples} samples x >= {target_s * 1e3:.0f} ms, ABBA interleaved"
          + (" | TF32 off (float32 is float32 on both sides)" if device.type == "cuda" else ""))
    load = CpuLoad()
    time.sleep(1.0)
    busy = load.others()
    if busy is not None and busy > 0.2:
        print(f"warning: other processes kept the CPUs {100 * busy:.0f}% busy just before "
              f"starting; timings will be noisy")
    sgemm = measure_peak(device, torch.float32)
    fma = measure_cpu_peak("fma") if device.type == "cpu" else None
    peak = fma or sgemm
    amx = measure_cpu_peak("amx") if device.type == "cpu" else None
    bandwidth = measure_copy_bandwidth(device)
    others = "other dtypes" if not amx else "other dtypes but bfloat16"
    if fma:
        print(f"fp32 peak (our FMA loop, {torch.get_num_threads()} threads): {fma:.1f} GFLOP/s = 100% "
              f"(also for {others}); sgemm (torch.mm 2048^2): {sgemm:.1f} GFLOP/s", flush=True)
    else:
        print(f"peak (torch.mm fp32): {sgemm:.1f} GFLOP/s = 100% (also for {others})", flush=True)
    if amx:
        print(f"bfloat16 peak (our loop on the unit bfloat16 GEMMs use, AMX tiles or AVX512-BF16 dot products, "
              f"{torch.get_num_threads()} threads): {amx:.1f} GFLOP/s = 100% for bfloat16", flush=True)
    print(f"copy bandwidth (copy_ of 256 MiB, read + write): {bandwidth:.1f} GB/s = 100% bw", flush=True)

    results, t_start, load = [], time.perf_counter(), CpuLoad()
    for i, case in enumerate(cases, 1):
        _log(f"[{i}/{len(cases)}] {case.name}")
        try:
            case_peak = amx if amx and case.dtype == "bfloat16" else peak
            results += run_case(tc, case, device, modes, samples, target_s, budget_s,
                                args.quick, case_peak, bandwidth)
        except TorchUnsupported as e:
            msg = f"SKIP (torch.nn cannot run it: {str(e).splitlines()[0]})"[:160]
            _log(f"  {case.name}: {msg}")
            results += [dict(case=case.name, mode=m, dtype=case.dtype, ok=True, error=msg)
                        for m in modes]
        except Exception as e:  # report and keep going; an unsupported case is a failure
            msg = f"ERROR {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
            _log(f"  {case.name}: {msg}")
            results += [dict(case=case.name, mode=m, dtype=case.dtype, ok=False, error=msg)
                        for m in modes]
        gc.collect()
    elapsed, busy_run = time.perf_counter() - t_start, load.others()

    print()
    print_table(results)
    failed = sorted({r["case"] for r in results if not r["ok"]})
    if busy_run is not None:
        print(f"other processes used {100 * busy_run:.0f}% of the CPUs during the run"
              + (" (timings are noisy)" if busy_run > 0.1 else ""))
    print(f"total time {elapsed:.1f} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else "all correctness checks passed"))

    if args.json:
        info = dict(processor=platform.processor(), lscpu_model=_lscpu_model(),
                    cpu_model=dev_name, platform=platform.platform(),
                    python=platform.python_version(),
                    torch=torch.__version__, torch_convt=getattr(tc, "__version__", "?"),
                    device=str(device), threads=torch.get_num_threads(), peak_gflops=peak,
                    fma_peak_gflops=fma, amx_peak_gflops=amx, sgemm_gflops=sgemm, copy_bandwidth_gbs=bandwidth,
                    samples=samples, sample_ms=target_s * 1e3, budget_s=budget_s,
                    quick=args.quick, others_busy_at_start=busy, others_busy_during=busy_run)
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, results=results, elapsed_s=elapsed), f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
