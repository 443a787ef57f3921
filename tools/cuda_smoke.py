"""A short CUDA workout of the three torch_convt ops for compute-sanitizer (memcheck, racecheck, initcheck,
synccheck): 1d/2d/3d, strides, padding, output_padding, dilation, groups, odd sizes, non-contiguous inputs,
float64/float32/half/bfloat16, forward and all three gradients (the 32-bit index path; tensors past 2^31 elements
are tests/test_cuda.py's slow tests). Each result is compared with torch, so the script also fails on wrong
numbers. Usage: compute-sanitizer --tool memcheck python tools/cuda_smoke.py
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_convt  # noqa: F401  (registers torch.ops.torch_convt)
from torch_convt import functional as TF

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
CASES = [
    # (dim, batch, cin, cout, spatial, kernel, stride, padding, output_padding, dilation, groups)
    (1, 2, 5, 3, (17,), 4, 3, 1, 2, 1, 1),
    (1, 1, 8, 4, (33,), 16, 8, 4, 0, 1, 2),
    (2, 3, 4, 6, (7, 9), 3, 2, 1, 1, 1, 2),
    (2, 2, 6, 6, (5, 4), (2, 3), (1, 2), (0, 1), (0, 1), (2, 1), 3),
    (3, 2, 4, 5, (3, 4, 5), 3, 2, 1, 1, 1, 1),
    (3, 1, 6, 6, (4, 3, 5), (3, 5, 2), (2, 1, 1), (0, 2, 1), 0, (1, 2, 1), 6),
    (3, 2, 3, 2, (2, 2, 2), 2, 2, 0, 0, 1, 1),
]
DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.half, 3e-3), (torch.bfloat16, 2e-2)]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


failures = 0
for dim, n, cin, cout, sp, k, s, p, op, d, g in CASES:
    for dtype, tol in DTYPES:
        ks = (k,) * dim if isinstance(k, int) else k
        x = torch.randn(n, cin, *sp, device=dev, dtype=torch.float64)
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2) if dim > 1 else x  # non-contiguous strides
        w = torch.randn(cin, cout // g, *ks, device=dev, dtype=torch.float64)
        b = torch.randn(cout, device=dev, dtype=torch.float64)
        ct = getattr(TF, f"conv_transpose{dim}d")
        ref_ct = getattr(F, f"conv_transpose{dim}d")
        xs, ws, bs = (t.to(dtype).requires_grad_() for t in (x, w, b))
        y = ct(xs, ws, bs, s, p, op, g, d)
        gy = torch.randn_like(y)
        gx, gw, gb = torch.autograd.grad(y, (xs, ws, bs), gy)
        xr, wr, br = (t.detach().double().requires_grad_() for t in (xs, ws, bs))
        yr = ref_ct(xr, wr, br, s, p, op, g, d)
        rx, rw, rb = torch.autograd.grad(yr, (xr, wr, br), gy.double())
        for name, a, e in (("y", y, yr), ("gx", gx, rx), ("gw", gw, rw), ("gb", gb, rb)):
            err = rel(a, e)
            if not (err <= tol):
                failures += 1
                print(f"FAIL dim={dim} k={k} s={s} g={g} {dtype} {name}: rel err {err:.3g}")
if dev == "cuda":
    torch.cuda.synchronize()
print("cuda_smoke:", "OK" if failures == 0 else f"{failures} failures")
sys.exit(1 if failures else 0)
