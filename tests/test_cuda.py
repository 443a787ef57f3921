"""CUDA-only tests (every test here is skipped, with the reason "no CUDA device", when torch sees no GPU):

* our CPU backend vs our CUDA backend on random configurations (float64, forward and the three gradients, 1e-12),
* bitwise run-to-run determinism of the three CUDA ops,
* tensors past 2^31 elements (64-bit indexing; ``@pytest.mark.slow``, and skipped without enough free memory),
* a second GPU (cuda:1) and a non-default stream.

The device-generic parity / gradcheck / opcheck / compile / module tests of the other files run on CUDA through the
``device`` fixture of conftest.py; this file holds what only makes sense on a GPU.
"""
import pytest
import torch

import torch_convt.functional as TF
from helpers import (CUDA_AVAILABLE, NO_CUDA_REASON, TOLERANCES, assert_close, conv_valid, ct_valid, fn_pair,
                     make_tensor)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA_AVAILABLE, reason=NO_CUDA_REASON)]

GiB = 1 << 30


# ----------------------------------------------------------------------------------------------------------
# CPU vs CUDA cross-check (float64)
# ----------------------------------------------------------------------------------------------------------
N_CROSS = 48  # half conv_transpose, half conv


def _random_config(seed):
    """A random valid configuration: dims 1-3, stride / padding / output_padding / dilation / groups, bias."""
    gen = torch.Generator().manual_seed(1000 + seed)

    def r(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    kind = "ct" if seed % 2 == 0 else "conv"
    while True:
        nd = r(1, 3)
        groups = r(1, 3)
        cin, cout = groups * r(1, 3), groups * r(1, 3)
        n = r(0, 3)
        size = tuple(r(1, {1: 12, 2: 7, 3: 5}[nd]) for _ in range(nd))
        kernel = tuple(r(1, 4) for _ in range(nd))
        stride = tuple(r(1, 3) for _ in range(nd))
        dilation = tuple(r(1, 3) for _ in range(nd))
        padding = tuple(r(0, 3) for _ in range(nd))
        bias = bool(r(0, 1))
        if kind == "ct":
            output_padding = tuple(r(0, max(s, d) - 1) for s, d in zip(stride, dilation))
            ok = ct_valid(size, kernel, stride, padding, output_padding, dilation)
        else:
            output_padding = (0,) * nd
            ok = conv_valid(size, kernel, stride, padding, dilation)
        if ok:
            return dict(kind=kind, nd=nd, groups=groups, cin=cin, cout=cout, n=n, size=size, kernel=kernel,
                        stride=stride, dilation=dilation, padding=padding, output_padding=output_padding,
                        bias=bias)


def _forward_and_grads(fn, tensors, kwargs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    y = fn(*leaves, **kwargs)
    used = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, used, grad_out.to(y.device), allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, used)]
    return [y.detach()] + grads


@pytest.mark.parametrize("seed", range(N_CROSS))
def test_cpu_vs_cuda_random_configs(seed):
    c = _random_config(seed)
    kind, nd, g = c["kind"], c["nd"], c["groups"]
    x = make_tensor((c["n"], c["cin"]) + c["size"])
    if kind == "ct":
        w = make_tensor((c["cin"], c["cout"] // g) + c["kernel"])
        kwargs = dict(stride=c["stride"], padding=c["padding"], output_padding=c["output_padding"], groups=g,
                      dilation=c["dilation"])
    else:
        w = make_tensor((c["cout"], c["cin"] // g) + c["kernel"])
        kwargs = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=g)
    b = make_tensor((c["cout"],)) if c["bias"] else None
    ours, _ = fn_pair(kind, nd)
    y_shape = ours(x, w, b, **kwargs).shape
    grad_out = make_tensor(y_shape)

    on_cpu = _forward_and_grads(ours, (x, w, b), kwargs, grad_out)
    on_cuda = _forward_and_grads(ours, tuple(t.cuda() if t is not None else None for t in (x, w, b)), kwargs,
                                 grad_out)
    names = ["forward", "grad_input", "grad_weight", "grad_bias"]
    for name, a, e in zip(names, on_cuda, on_cpu):
        assert a.device.type == "cuda", name
        assert_close(a.cpu(), e, rtol=1e-12, atol=1e-12, what=f"{name} ({c})")


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=["float64", "complex128"])
def test_cpu_vs_cuda_conv_weight_grad_op(dtype):
    """The raw conv_weight_grad op (not only as the weight gradient), grouped and strided, all three dims."""
    for nd, groups, s, p, d in ((1, 2, 2, 1, 2), (2, 1, 3, 2, 1), (3, 3, 1, 0, 2)):
        x = make_tensor((3, 2 * groups) + (9, 8, 7)[:nd], dtype)
        wsize = [3 * groups, 2] + [3] * nd
        w = make_tensor(wsize, dtype)
        y = TF.__dict__[f"conv{nd}d"](x, w, None, s, p, d, groups)
        gy = make_tensor(y.shape, dtype)
        args = ([s] * nd, [p] * nd, [d] * nd, groups)
        want = torch.ops.torch_convt.conv_weight_grad(x, gy, wsize, *args)
        got = torch.ops.torch_convt.conv_weight_grad(x.cuda(), gy.cuda(), wsize, *args)
        assert got.device.type == "cuda"
        assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12, what=f"conv_weight_grad {nd}d")


# ----------------------------------------------------------------------------------------------------------
# determinism: bitwise identical results run to run
# ----------------------------------------------------------------------------------------------------------
def _det_run(op):
    torch.manual_seed(7)
    x = make_tensor((2, 16, 12, 12, 12), torch.float32, device="cuda")
    if op == "conv_transpose":
        w = make_tensor((16, 8, 3, 3, 3), torch.float32, device="cuda")
        b = make_tensor((8,), torch.float32, device="cuda")
        x, w, b = (t.requires_grad_(True) for t in (x, w, b))
        y = TF.conv_transpose3d(x, w, b, stride=2, padding=1, output_padding=1)
        g = make_tensor(y.shape, torch.float32, device="cuda")
        return (y.detach(),) + torch.autograd.grad(y, (x, w, b), g)
    if op == "conv":
        w = make_tensor((8, 16, 3, 3, 3), torch.float32, device="cuda")
        b = make_tensor((8,), torch.float32, device="cuda")
        x, w, b = (t.requires_grad_(True) for t in (x, w, b))
        y = TF.conv3d(x, w, b, stride=2, padding=1)
        g = make_tensor(y.shape, torch.float32, device="cuda")
        return (y.detach(),) + torch.autograd.grad(y, (x, w, b), g)
    gy = make_tensor((2, 8, 6, 6, 6), torch.float32, device="cuda")
    return (torch.ops.torch_convt.conv_weight_grad(x, gy, [8, 16, 3, 3, 3], [2] * 3, [1] * 3, [1] * 3, 1),)


def _det_reference(op):
    """torch's result for the forward (float32, TF32 off), as a sanity check of what is being compared."""
    torch.manual_seed(7)
    x = make_tensor((2, 16, 12, 12, 12), torch.float32, device="cuda")
    if op == "conv_transpose":
        w = make_tensor((16, 8, 3, 3, 3), torch.float32, device="cuda")
        b = make_tensor((8,), torch.float32, device="cuda")
        return torch.nn.functional.conv_transpose3d(x, w, b, stride=2, padding=1, output_padding=1)
    if op == "conv":
        w = make_tensor((8, 16, 3, 3, 3), torch.float32, device="cuda")
        b = make_tensor((8,), torch.float32, device="cuda")
        return torch.nn.functional.conv3d(x, w, b, stride=2, padding=1)
    gy = make_tensor((2, 8, 6, 6, 6), torch.float32, device="cuda")
    return torch.nn.grad.conv3d_weight(x, [8, 16, 3, 3, 3], gy, 2, 1, 1, 1)


@pytest.mark.parametrize("op", ["conv_transpose", "conv", "conv_weight_grad"])
def test_deterministic_run_to_run(op):
    first = _det_run(op)
    for _ in range(2):
        again = _det_run(op)
        assert len(again) == len(first)
        for i, (a, b) in enumerate(zip(first, again)):
            assert torch.equal(a, b), f"{op}: result {i} differs between two identical calls"
    assert_close(first[0], _det_reference(op), torch.float32, what=op)


def test_deterministic_under_use_deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) must not make the CUDA ops raise (they have no
    non-deterministic path), and the results are the same as without it."""
    plain = _det_run("conv_transpose")
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = _det_run("conv_transpose")
    finally:
        torch.use_deterministic_algorithms(old)
    for a, b in zip(plain, det):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------
# tensors past 2^31 elements (64-bit index arithmetic)
# ----------------------------------------------------------------------------------------------------------
def _require_free_memory(nbytes):
    free, _ = torch.cuda.mem_get_info()
    need = int(nbytes * 1.15) + GiB  # + slack for the caching allocator and the CUDA context
    if free < need:
        pytest.skip(f"needs ~{need / GiB:.1f} GiB of free GPU memory, {free / GiB:.1f} GiB free")


def _slabs(batch):
    return sorted({0, batch // 2, batch - 1})


LARGE_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LARGE_IDS = ["float16", "bfloat16", "float32"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LARGE_DTYPES, ids=LARGE_IDS)
def test_large_conv_transpose3d_output_past_2e31(dtype):
    """ConvTranspose3d whose output has 2^31 + 2^21 elements: the last batch item lies entirely past 2^31. Items
    0, N/2 and N-1 are compared with a float64 computation of that single item by our CPU op."""
    batch, cin, cout, size = 1025, 4, 8, 32  # output (1025, 8, 64, 64, 64)
    item = cout * (2 * size) ** 3
    esize = torch.empty((), dtype=dtype).element_size()
    _require_free_memory((batch * item + batch * cin * size ** 3) * esize)
    kw = dict(stride=2, padding=1, output_padding=1)
    x = torch.randn((batch, cin, size, size, size), device="cuda", dtype=dtype)
    w = make_tensor((cin, cout, 3, 3, 3), dtype, device="cuda")
    b = make_tensor((cout,), dtype, device="cuda")
    out = TF.conv_transpose3d(x, w, b, **kw)
    torch.cuda.synchronize()
    assert out.shape == (batch, cout, 2 * size, 2 * size, 2 * size) and out.dtype == dtype
    assert out.numel() > 2 ** 31 and (batch - 1) * item >= 2 ** 31
    w64, b64 = w.cpu().double(), b.cpu().double()
    for i in _slabs(batch):
        want = TF.conv_transpose3d(x[i:i + 1].cpu().double(), w64, b64, **kw)
        assert_close(out[i:i + 1].cpu(), want, dtype, what=f"batch item {i}")
    del out, x


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_large_conv3d_input_past_2e31(dtype):
    """conv3d whose input has 2^31 + 2^21 elements (the last batch item lies entirely past 2^31)."""
    batch, cin, cout, size = 1025, 8, 4, 64  # input (1025, 8, 64, 64, 64) -> output (1025, 4, 32, 32, 32)
    item = cin * size ** 3
    esize = torch.empty((), dtype=dtype).element_size()
    _require_free_memory((batch * item + batch * cout * (size // 2) ** 3) * esize)
    kw = dict(stride=2, padding=1)
    x = torch.randn((batch, cin, size, size, size), device="cuda", dtype=dtype)
    assert x.numel() > 2 ** 31 and (batch - 1) * item >= 2 ** 31
    w = make_tensor((cout, cin, 3, 3, 3), dtype, device="cuda")
    b = make_tensor((cout,), dtype, device="cuda")
    out = TF.conv3d(x, w, b, **kw)
    torch.cuda.synchronize()
    assert out.shape == (batch, cout, size // 2, size // 2, size // 2)
    w64, b64 = w.cpu().double(), b.cpu().double()
    for i in _slabs(batch):
        want = TF.conv3d(x[i:i + 1].cpu().double(), w64, b64, **kw)
        assert_close(out[i:i + 1].cpu(), want, dtype, what=f"batch item {i}")
    del out, x


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_large_conv_weight_grad_input_past_2e31(dtype):
    """conv_weight_grad (the weight gradient of both ops) reading an input of 2^31 + 2^21 elements: grad_output is
    zero except in batch items 0, N/2 and N-1, so the float64 reference needs only those items."""
    batch, cin, cout, size = 1025, 8, 4, 64
    esize = torch.empty((), dtype=dtype).element_size()
    _require_free_memory((batch * cin * size ** 3 + batch * cout * (size // 2) ** 3) * esize)
    s, p, d = [2] * 3, [1] * 3, [1] * 3
    x = torch.randn((batch, cin, size, size, size), device="cuda", dtype=dtype)
    assert x.numel() > 2 ** 31
    gy = torch.zeros((batch, cout, size // 2, size // 2, size // 2), device="cuda", dtype=dtype)
    items = _slabs(batch)
    for i in items:
        gy[i] = make_tensor(gy.shape[1:], dtype, device="cuda")
    wsize = [cout, cin, 3, 3, 3]
    got = torch.ops.torch_convt.conv_weight_grad(x, gy, wsize, s, p, d, 1)
    torch.cuda.synchronize()
    want = torch.ops.torch_convt.conv_weight_grad(x[items].cpu().double(), gy[items].cpu().double(), wsize, s, p,
                                                  d, 1)
    # a sum of ~10^5 products per element, accumulated in float32: allow a little more than the parity tolerance
    rtol = max(TOLERANCES[dtype][0], 1e-4)
    assert_close(got.cpu(), want, dtype, rtol=rtol, atol=rtol, what="conv_weight_grad")
    del x, gy


# ----------------------------------------------------------------------------------------------------------
# a second GPU, streams
# ----------------------------------------------------------------------------------------------------------
def test_second_gpu():
    """Tensors on cuda:1 while cuda:0 is the current device: the result is on cuda:1 and correct, gradients too,
    the current device is left alone, and a cuda:0 / cuda:1 mix is a RuntimeError."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    dev = torch.device("cuda:1")
    torch.cuda.set_device(0)
    x = make_tensor((2, 4, 6, 5))
    w = make_tensor((4, 3, 3, 2))
    b = make_tensor((6,))
    kw = dict(stride=2, padding=1, output_padding=1, groups=2, dilation=(1, 2))
    grad_out = make_tensor(TF.conv_transpose2d(x, w, b, **kw).shape)
    want = _forward_and_grads(TF.conv_transpose2d, (x, w, b), kw, grad_out)
    got = _forward_and_grads(TF.conv_transpose2d, (x.to(dev), w.to(dev), b.to(dev)), kw, grad_out)
    assert torch.cuda.current_device() == 0
    for name, a, e in zip(["forward", "grad_input", "grad_weight", "grad_bias"], got, want):
        assert a.device == dev, (name, a.device)
        assert_close(a.cpu(), e, rtol=1e-12, atol=1e-12, what=name)
    with pytest.raises(RuntimeError):
        TF.conv_transpose2d(x.to("cuda:0"), w.to(dev), b.to(dev), **kw)
    with pytest.raises(RuntimeError):
        TF.conv2d(x.to(dev), w.transpose(0, 1).contiguous().to("cuda:0"))
    torch.cuda.synchronize(dev)


@pytest.mark.parametrize("kind", ["ct", "conv"])
def test_non_default_stream(kind):
    """The ops launch on the current stream: on a side stream kept busy (torch.cuda._sleep) before its input is
    written, a launch on any other stream would read the input too early. Forward and backward both."""
    nd = 3
    ours, ref = fn_pair(kind, nd)
    x = make_tensor((2, 8, 10, 9, 8), torch.float32, device="cuda")
    w = make_tensor((8, 6, 3, 3, 3) if kind == "ct" else (6, 8, 3, 3, 3), torch.float32, device="cuda")
    b = make_tensor((6,), torch.float32, device="cuda")
    kw = dict(stride=2, padding=1)
    grad_out = make_tensor(ours(x, w, b, **kw).shape, torch.float32, device="cuda")
    want = _forward_and_grads(ours, (x, w, b), kw, grad_out)
    torch.cuda.synchronize()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        xs = torch.full_like(x, float("nan"))
        torch.cuda._sleep(50_000_000)  # tens of milliseconds of GPU time on `side` before x is written
        xs.copy_(x)
        got = _forward_and_grads(ours, (xs, w, b), kw, grad_out)
    torch.cuda.synchronize()
    for name, a, e in zip(["forward", "grad_input", "grad_weight", "grad_bias"], got, want):
        assert torch.equal(a, e), f"{name} computed on a side stream differs"
    assert_close(want[0], ref(x, w, b, **kw), torch.float32)
