"""Helpers shared by the torch_convt tests.

The central piece is :func:`check_parity`: it runs "ours" and torch's reference on the same inputs,
compares the forward result and the gradients with respect to every floating/complex tensor argument,
and checks that the inputs were not modified.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F

import torch_convt
import torch_convt.functional as TF

DIMS = (1, 2, 3)

# ----------------------------------------------------------------------------------------------------------
# devices
# ----------------------------------------------------------------------------------------------------------
# The CUDA variants of the device-generic tests always exist (stable test ids) and skip when there is no GPU.
# They also carry the `cuda` marker (registered in pyproject.toml), so `-m "not cuda"` deselects them.
CUDA_AVAILABLE = torch.cuda.is_available()
NO_CUDA_REASON = "no CUDA device"
requires_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason=NO_CUDA_REASON)
CUDA_PARAM = pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda], id="cuda")
DEVICES = [pytest.param("cpu", id="cpu"), CUDA_PARAM]
CUDA_ONLY = [CUDA_PARAM]

def to_device(obj, device):
    """Moves every tensor in (nested tuples/lists of) `obj` to `device`; other values are returned as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def randn(shape, dtype=torch.float64, device="cpu", requires_grad=False) -> torch.Tensor:
    """torch.randn drawn on the CPU generator and then moved, so that every device sees the same values (and the
    CPU values are exactly what torch.randn(shape, dtype=dtype) gave before devices were threaded through)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    t = torch.randn(shape, dtype=dtype).to(device)
    return t.requires_grad_(True) if requires_grad else t


def exc_of(fn):
    """The exception `fn()` raises, or None."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)
LOW_PRECISION = (torch.bfloat16, torch.float16)

# (rtol, atol relative to the magnitude of the reference result)
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.complex128: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.complex64: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float16: (1e-2, 1e-2),
}


# ----------------------------------------------------------------------------------------------------------
# function tables
# ----------------------------------------------------------------------------------------------------------
def torch_ct(nd: int) -> Callable:
    return getattr(F, f"conv_transpose{nd}d")


def ours_ct(nd: int) -> Callable:
    return getattr(TF, f"conv_transpose{nd}d")


def torch_conv(nd: int) -> Callable:
    return getattr(F, f"conv{nd}d")


def ours_conv(nd: int) -> Callable:
    return getattr(TF, f"conv{nd}d")


def torch_ct_module(nd: int):
    return getattr(torch.nn, f"ConvTranspose{nd}d")


def ours_ct_module(nd: int):
    return getattr(torch_convt, f"ConvTranspose{nd}d")


def torch_conv_module(nd: int):
    return getattr(torch.nn, f"Conv{nd}d")


def ours_conv_module(nd: int):
    return getattr(torch_convt, f"Conv{nd}d")


def fn_pair(kind: str, nd: int):
    """(ours, torch's) functional for kind in {'ct', 'conv'}."""
    if kind == "ct":
        return ours_ct(nd), torch_ct(nd)
    if kind == "conv":
        return ours_conv(nd), torch_conv(nd)
    raise ValueError(kind)


def ops():
    """The three raw ops (OpOverloads)."""
    return (torch.ops.torch_convt.conv_transpose.default,
            torch.ops.torch_convt.conv.default,
            torch.ops.torch_convt.conv_weight_grad.default)


# ----------------------------------------------------------------------------------------------------------
# size arithmetic
# ----------------------------------------------------------------------------------------------------------
def per_dim(v, nd: int) -> tuple:
    """int -> (v,)*nd; longer tuple -> truncated to nd entries."""
    if isinstance(v, (tuple, list)):
        assert len(v) >= nd, (v, nd)
        return tuple(v[:nd])
    return (v,) * nd


def arg(v, nd: int):
    """Keep ints as ints (exercises the scalar form); truncate tuples to nd entries."""
    if isinstance(v, (tuple, list)):
        return tuple(v[:nd])
    return v


def ct_out_size(i, k, s, p, op, d):
    return (i - 1) * s - 2 * p + d * (k - 1) + op + 1


def conv_out_size(i, k, s, p, d):
    return (i + 2 * p - d * (k - 1) - 1) // s + 1


# ----------------------------------------------------------------------------------------------------------
# tensor factories
# ----------------------------------------------------------------------------------------------------------
def make_tensor(shape, dtype=torch.float64, *, small_int: bool = False, device="cpu") -> torch.Tensor:
    """Random tensor. Floating values are drawn in float32/float64 and cast so that low precision inputs
    are exactly representable in float32 (the reference precision). Integer values are tiny so that
    integer convolutions never overflow. Values are always drawn on the CPU generator and then moved to
    `device`, so a given seed gives the same values on every device."""
    return _make_cpu_tensor(tuple(shape), dtype, small_int).to(device)


def _make_cpu_tensor(shape, dtype, small_int):
    if dtype.is_complex:
        return torch.randn(shape, dtype=torch.complex128).to(dtype)
    if dtype.is_floating_point:
        if small_int:
            return torch.randint(-3, 4, shape).to(dtype)
        return torch.randn(shape, dtype=torch.float64).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape).bool()
    if dtype == torch.uint8:
        return torch.randint(0, 2, shape, dtype=dtype)
    if dtype == torch.int8:
        return torch.randint(-1, 2, shape, dtype=dtype)
    return torch.randint(-3, 4, shape, dtype=dtype)


def is_differentiable(t) -> bool:
    return isinstance(t, torch.Tensor) and (t.dtype.is_floating_point or t.dtype.is_complex)


# ----------------------------------------------------------------------------------------------------------
# comparison
# ----------------------------------------------------------------------------------------------------------
def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, *, rtol=None, atol=None,
                 what: str = "output"):
    """Compare with a tolerance relative to the magnitude of the expected tensor (atol is scaled by
    max(1, max|expected|)). Integer tensors must be equal."""
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual)}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    dtype = dtype or expected.dtype
    assert actual.device == expected.device, f"{what}: device {actual.device} != {expected.device}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    if not (dtype.is_floating_point or dtype.is_complex):
        assert torch.equal(actual, expected.to(dtype)), f"{what}: integer results differ:\n{actual}\n{expected}"
        return
    r, a = TOLERANCES[dtype]
    rtol = r if rtol is None else rtol
    atol = a if atol is None else atol
    exp = expected.to(torch.complex128 if dtype.is_complex else torch.float64)
    act = actual.to(exp.dtype)
    assert torch.isfinite(act).all(), f"{what}: non-finite values in result"
    scale = max(1.0, exp.abs().max().item()) if exp.numel() else 1.0
    torch.testing.assert_close(act, exp, rtol=rtol, atol=atol * scale, check_dtype=False,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def check_parity(ours: Callable, ref: Callable, args: Sequence[Any], kwargs: Optional[dict] = None, *,
                 grad: bool = True, ref_dtype: Optional[torch.dtype] = None, rtol=None, atol=None,
                 grad_out: Optional[torch.Tensor] = None):
    """Run ``ours(*args, **kwargs)`` and ``ref(*args, **kwargs)``; compare outputs and (when ``grad``)
    the gradients w.r.t. every floating/complex tensor in ``args`` for the same random upstream grad.

    ``ref_dtype``: compute the reference with all tensors converted to this dtype (float32 for
    bfloat16/float16, int64 for the small integer types), then cast the result back.
    Returns ours' output (detached)."""
    kwargs = dict(kwargs or {})
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    snapshots = [(a, a.clone()) for a in tensors]

    def leaf(a, upcast):
        if not isinstance(a, torch.Tensor):
            return a
        t = a.detach()
        if upcast is not None:
            t = t.to(upcast)
        if grad and is_differentiable(t):
            t.requires_grad_(True)
        return t

    ref_args = [leaf(a, ref_dtype) for a in args]
    our_args = [leaf(a, None) for a in args]

    expected = ref(*ref_args, **kwargs)
    out = ours(*our_args, **kwargs)

    out_dtype = tensors[0].dtype
    assert isinstance(out, torch.Tensor)
    assert_close(out.detach(), expected.detach().to(out_dtype) if ref_dtype else expected.detach(),
                 out_dtype, rtol=rtol, atol=atol, what="forward")

    for a, snap in snapshots:
        assert torch.equal(a, snap), "an input tensor was modified in place"

    if grad:
        our_leaves = [t for t in our_args if isinstance(t, torch.Tensor) and t.requires_grad]
        ref_leaves = [t for t in ref_args if isinstance(t, torch.Tensor) and t.requires_grad]
        if our_leaves:
            assert out.requires_grad, "output does not require grad although inputs do"
            g = grad_out if grad_out is not None else make_tensor(out.shape, out.dtype, device=out.device)
            g_ref = g.to(ref_dtype) if ref_dtype else g
            got = torch.autograd.grad(out, our_leaves, g, allow_unused=True)
            want = torch.autograd.grad(expected, ref_leaves, g_ref, allow_unused=True)
            names = ["input", "weight", "bias"] + [f"arg{i}" for i in range(3, len(our_leaves))]
            for name, lo, gv, wv in zip(names, our_leaves, got, want):
                if wv is None:
                    wv = torch.zeros_like(lo if ref_dtype is None else lo.to(ref_dtype))
                assert gv is not None or lo.numel() == 0 or not wv.any(), f"missing gradient for {name}"
                if gv is None:
                    gv = torch.zeros_like(lo)
                assert_close(gv, wv.to(lo.dtype) if ref_dtype else wv, lo.dtype, rtol=rtol, atol=atol,
                             what=f"grad_{name}")
            for a, snap in snapshots:
                assert torch.equal(a, snap), "an input tensor was modified in place by backward"
    return out.detach()


# ----------------------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cfg:
    """One convolution configuration. Tuple-valued fields are per-dim (given for 3 dims, truncated)."""
    n: int = 2
    cin: int = 4
    cout: int = 6
    groups: int = 1
    size: Any = 5
    kernel: Any = 3
    stride: Any = 1
    padding: Any = 0
    output_padding: Any = 0  # conv_transpose only
    dilation: Any = 1
    bias: bool = True

    def replace(self, **kw) -> "Cfg":
        return dataclasses.replace(self, **kw)

    # --- conv_transpose -------------------------------------------------------------------------------
    def ct_tensors(self, nd, dtype=torch.float64, small_int=False, device="cpu"):
        x = make_tensor((self.n, self.cin) + per_dim(self.size, nd), dtype, small_int=small_int, device=device)
        w = make_tensor((self.cin, self.cout // self.groups) + per_dim(self.kernel, nd), dtype,
                        small_int=small_int, device=device)
        b = make_tensor((self.cout,), dtype, small_int=small_int, device=device) if self.bias else None
        return x, w, b

    def ct_kwargs(self, nd):
        return dict(stride=arg(self.stride, nd), padding=arg(self.padding, nd),
                    output_padding=arg(self.output_padding, nd), groups=self.groups,
                    dilation=arg(self.dilation, nd))

    def ct_out_shape(self, nd):
        sp = tuple(ct_out_size(i, k, s, p, op, d) for i, k, s, p, op, d in zip(
            per_dim(self.size, nd), per_dim(self.kernel, nd), per_dim(self.stride, nd),
            per_dim(self.padding, nd), per_dim(self.output_padding, nd), per_dim(self.dilation, nd)))
        return (self.n, self.cout) + sp

    # --- conv -----------------------------------------------------------------------------------------
    def conv_tensors(self, nd, dtype=torch.float64, small_int=False, device="cpu"):
        x = make_tensor((self.n, self.cin) + per_dim(self.size, nd), dtype, small_int=small_int, device=device)
        w = make_tensor((self.cout, self.cin // self.groups) + per_dim(self.kernel, nd), dtype,
                        small_int=small_int, device=device)
        b = make_tensor((self.cout,), dtype, small_int=small_int, device=device) if self.bias else None
        return x, w, b

    def conv_kwargs(self, nd):
        pad = self.padding if isinstance(self.padding, str) else arg(self.padding, nd)
        return dict(stride=arg(self.stride, nd), padding=pad, dilation=arg(self.dilation, nd),
                    groups=self.groups)

    def tensors(self, kind, nd, dtype=torch.float64, small_int=False, device="cpu"):
        return (self.ct_tensors if kind == "ct" else self.conv_tensors)(nd, dtype, small_int, device)

    def kwargs(self, kind, nd):
        return self.ct_kwargs(nd) if kind == "ct" else self.conv_kwargs(nd)


def ct_valid(size, kernel, stride, padding, output_padding, dilation) -> bool:
    """Whether torch accepts these conv_transpose hyper-parameters (per-dim tuples)."""
    for i, k, s, p, op, d in zip(size, kernel, stride, padding, output_padding, dilation):
        if s < 1 or d < 1 or p < 0 or op < 0 or k < 1 or i < 1:
            return False
        if op >= max(s, d):
            return False
        if ct_out_size(i, k, s, p, op, d) < 1:
            return False
    return True


def conv_valid(size, kernel, stride, padding, dilation) -> bool:
    for i, k, s, p, d in zip(size, kernel, stride, padding, dilation):
        if s < 1 or d < 1 or p < 0 or k < 1 or i < 1:
            return False
        if i + 2 * p < d * (k - 1) + 1:
            return False
    return True


def channels_last(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    # no channels_last format for 3-d tensors: emulate with a (N, L, C) buffer viewed as (N, C, L)
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def reversed_layout(t: torch.Tensor) -> torch.Tensor:
    """Same values and shape, memory laid out with dims reversed (a transposed-then-permuted view)."""
    perm = tuple(reversed(range(t.dim())))
    return t.permute(perm).contiguous().permute(perm)


def strided_view(t: torch.Tensor) -> torch.Tensor:
    """Same values and shape, but a non-contiguous slice (step 2 in every dim) of a larger buffer."""
    big = torch.zeros(tuple(2 * s for s in t.shape), dtype=t.dtype, device=t.device)
    view = big[tuple(slice(None, None, 2) for _ in t.shape)]
    view.copy_(t)
    return view
