"""Beyond torch.nn: padding_mode 'reflect' / 'replicate' / 'circular' and padding='same' / 'valid' for the
transposed convolutions (functional API and modules).

A transposed convolution with a padding mode is defined as the exact adjoint of torch's Conv with the same padding
mode and parameters, so every reference here is computed from torch's own padded convolution
(torch.nn.ConvNd(padding_mode=...) or F.pad + F.convNd): the adjoint identity, the input-gradient of that conv, and
the weight / bias gradients of that construction. padding='same' (output = input * stride, TensorFlow's
conv_transpose 'SAME') is checked against torch's conv_transpose with padding 0 and explicit cropping."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import torch_convt
from helpers import (DIMS, check_parity, exc_of, ours_ct, ours_ct_module, per_dim, randn, strided_view,
                     torch_conv, torch_conv_module, torch_ct, torch_ct_module)

MODES = ("zeros", "reflect", "replicate", "circular")
GG = dict(fast_mode=True)  # gradgradcheck with random projections of the Jacobian (as in test_grad.py)


# ----------------------------------------------------------------------------------------------------------
# references, built from torch's own padded convolution
# ----------------------------------------------------------------------------------------------------------
def _extent(k, d):
    return d * (k - 1) + 1


def _tf_same_pads(size, kernel, stride, dilation):
    """TensorFlow's 'SAME' padding of a stride-s conv of an input `size` long (tf.nn.conv2d docs):
    out = ceil(size / s), total = max((out - 1) * s + extent - size, 0), total // 2 before, the rest after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + _extent(kernel, dilation) - size, 0)
    return total // 2, total - total // 2


def _conv_pads(nd, in_size, kernel, stride, padding, dilation):
    """Per-dim (before, after) pads of the conv whose adjoint our conv_transpose is; `in_size` is the size of the
    transposed convolution's input (the conv's output)."""
    if padding == "same":
        return [_tf_same_pads(i * s, k, s, d) for i, k, s, d in zip(in_size, kernel, stride, dilation)]
    if padding == "valid":
        return [(0, 0)] * nd
    return [(p, p) for p in per_dim(padding, nd)]


def _f_pad_list(pads):
    """Per-dim (before, after) -> F.pad's argument (last dim first)."""
    return [p for before_after in reversed(pads) for p in before_after]


def _out_size(nd, in_size, kernel, stride, padding, output_padding, dilation):
    if padding == "same":
        return [i * s for i, s in zip(in_size, stride)]
    pads = _conv_pads(nd, in_size, kernel, stride, padding, dilation)
    return [(i - 1) * s - 2 * p[0] + _extent(k, d) + op
            for i, k, s, p, op, d in zip(in_size, kernel, stride, pads, output_padding, dilation)]


def torch_padded_conv(x, w, nd, mode, pads, stride, dilation, groups):
    """torch's Conv with padding mode `mode` and per-dim (before, after) `pads`, with weight `w`. Symmetric pads
    go through torch.nn.ConvNd(padding_mode=mode)'s own forward; asymmetric ones (padding='same' with stride,
    which torch's Conv refuses) through F.pad + F.convNd, as that forward does."""
    if all(a == b for a, b in pads):
        conv = torch_conv_module(nd)(w.shape[1] * groups, w.shape[0], w.shape[2:], stride=stride,
                                     padding=[a for a, _ in pads], dilation=dilation, groups=groups, bias=False,
                                     padding_mode=mode, device="meta")
        return conv._conv_forward(x, w, None)
    padded = F.pad(x, _f_pad_list(pads), mode="constant" if mode == "zeros" else mode)
    return torch_conv(nd)(padded, w, None, stride, 0, dilation, groups)


def reference_conv_transpose(nd, y, w, b, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                             padding_mode="zeros"):
    """The input-gradient of torch's padded conv, applied to y (plus the bias): the definition of our
    conv_transpose with a padding mode. create_graph=True makes it differentiable in y and w."""
    batched = y.dim() == nd + 2
    if not batched:
        y = y.unsqueeze(0)
    kernel, stride, dilation = list(w.shape[2:]), per_dim(stride, nd), per_dim(dilation, nd)
    pads = _conv_pads(nd, y.shape[2:], kernel, stride, padding, dilation)
    size = _out_size(nd, y.shape[2:], kernel, stride, padding, per_dim(output_padding, nd), dilation)
    x = torch.zeros([y.shape[0], w.shape[1] * groups] + size, dtype=y.dtype, device=y.device, requires_grad=True)
    # (torch's conv_transpose is the transpose, not the conjugate transpose: for complex weights it is the
    # input-gradient of the conv with the conjugated weight)
    conv_y = torch_padded_conv(x, w.conj(), nd, padding_mode, pads, stride, dilation, groups)
    assert conv_y.shape == y.shape, (conv_y.shape, y.shape)
    out = torch.autograd.grad(conv_y, x, y, create_graph=True)[0]
    if b is not None:
        out = out + b.view([-1] + [1] * nd)
    return out if batched else out.squeeze(0)


# ----------------------------------------------------------------------------------------------------------
# configurations: (name, kwargs) with per-dim values given for 3 dims (truncated)
# ----------------------------------------------------------------------------------------------------------
MODE_CASES = [
    ("k3_p1", dict(kernel=3, padding=1)),
    ("s2_p1_op1", dict(kernel=3, stride=2, padding=1, output_padding=1)),
    ("d2_p2", dict(kernel=3, padding=2, dilation=2)),
    ("g2_s3_p1_op2", dict(kernel=2, stride=3, padding=1, output_padding=2, groups=2)),
    ("asym", dict(kernel=(2, 3, 4), stride=(1, 2, 3), padding=(0, 1, 2), output_padding=(0, 1, 2),
                  dilation=(2, 1, 1))),
    # the pads are most of the output (circular: left + right > output size, the wrapped regions overlap)
    ("k7_p3_wide_pads", dict(kernel=7, padding=3, size=4)),
    ("same_k4_s2", dict(kernel=4, stride=2, padding="same")),
    ("same_odd_crops", dict(kernel=(4, 3, 2), stride=(1, 2, 1), dilation=(1, 2, 3), padding="same")),
    ("same_extent_lt_stride", dict(kernel=(2, 1, 2), stride=(3, 2, 4), padding="same", groups=2)),
    ("valid_s2", dict(kernel=3, stride=2, padding="valid", output_padding=1)),
]


def _case(nd, kw, device="cpu", n=2, cin=4, cout=6):
    """(y, w, b, functional kwargs) for one case."""
    kw = dict(kw)
    size = kw.pop("size", 5)
    groups = kw.get("groups", 1)
    kernel = per_dim(kw.pop("kernel"), nd)
    y = randn((n, cin) + per_dim(size, nd), torch.float64, device)
    w = randn((cin, cout // groups) + kernel, torch.float64, device)
    b = randn((cout,), torch.float64, device)
    fkw = {k: (v if isinstance(v, (int, str)) else tuple(v[:nd])) for k, v in kw.items()}
    return y, w, b, fkw


def _mode_params():
    return [pytest.param(nd, mode, kw, id=f"{nd}d-{mode}-{name}")
            for nd in DIMS for mode in MODES for name, kw in MODE_CASES]


# ----------------------------------------------------------------------------------------------------------
# (a) adjoint identity, (b) input-gradient of torch's padded conv, (e) weight and bias gradients
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nd,mode,kw", _mode_params())
def test_adjoint_identity(nd, mode, kw, device):
    """<conv_m(x), y> == <x, conv_transpose_m(y)> with torch's padded conv as conv_m (float64)."""
    y, w, _, fkw = _case(nd, kw, device)
    out = ours_ct(nd)(y, w, None, **fkw, padding_mode=mode)
    assert list(out.shape[2:]) == _out_size(nd, y.shape[2:], w.shape[2:], per_dim(fkw.get("stride", 1), nd),
                                            fkw.get("padding", 0), per_dim(fkw.get("output_padding", 0), nd),
                                            per_dim(fkw.get("dilation", 1), nd))
    x = randn(out.shape, torch.float64, device)
    pads = _conv_pads(nd, y.shape[2:], w.shape[2:], per_dim(fkw.get("stride", 1), nd), fkw.get("padding", 0),
                      per_dim(fkw.get("dilation", 1), nd))
    conv_x = torch_padded_conv(x, w, nd, mode, pads, fkw.get("stride", 1), fkw.get("dilation", 1),
                               fkw.get("groups", 1))
    lhs, rhs = (conv_x * y).sum().item(), (x * out).sum().item()
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs), (conv_x.abs() * y.abs()).sum().item()), (lhs, rhs)


@pytest.mark.parametrize("nd,mode,kw", _mode_params())
def test_equals_torch_conv_input_gradient_and_its_gradients(nd, mode, kw, device):
    """Forward == torch.autograd.grad of torch's padded conv w.r.t. its input; gradients w.r.t. input, weight and
    bias == those of that construction (double backward through torch's conv)."""
    y, w, b, fkw = _case(nd, kw, device, n=1, cin=2, cout=4)
    check_parity(lambda *a, **k: ours_ct(nd)(*a, **k, padding_mode=mode),
                 lambda *a, **k: reference_conv_transpose(nd, *a, **k, padding_mode=mode), (y, w, b), fkw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_unbatched_and_non_contiguous(nd, mode, device):
    y, w, b, fkw = _case(nd, dict(kernel=3, stride=2, padding=2, output_padding=1), device)
    expected = ours_ct(nd)(y, w, b, **fkw, padding_mode=mode)
    assert expected.is_contiguous()
    got = ours_ct(nd)(strided_view(y), strided_view(w), strided_view(b), **fkw, padding_mode=mode)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_ct(nd)(y[1], w, b, **fkw, padding_mode=mode), expected[1],
                               rtol=1e-12, atol=1e-12)
    check_parity(lambda *a, **k: ours_ct(nd)(*a, **k, padding_mode=mode),
                 lambda *a, **k: reference_conv_transpose(nd, *a, **k, padding_mode=mode), (y[0], w, b), fkw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex128], ids=["float32", "complex128"])
def test_other_dtypes(dtype, device):
    nd = 2
    y, w, b, fkw = _case(nd, dict(kernel=3, stride=2, padding=1, output_padding=1), device)
    y, w, b = (t.to(dtype) for t in (y, w, b))
    if dtype.is_complex:
        y, w, b = (t + 1j * torch.randn_like(t.real) for t in (y, w, b))
    for mode in MODES[1:]:
        check_parity(lambda *a, **k: ours_ct(nd)(*a, **k, padding_mode=mode),
                     lambda *a, **k: reference_conv_transpose(nd, *a, **k, padding_mode=mode), (y, w, b), fkw)


@pytest.mark.parametrize("mode", MODES[1:])
def test_deterministic_algorithms(mode, device):
    """The pad adjoint adds strips in a fixed order and its gradient is F.pad's gather (not torch's pad backward,
    which torch.use_deterministic_algorithms refuses on CUDA): allowed in deterministic mode, bitwise
    repeatable."""
    y, w, b, fkw = _case(3, dict(kernel=3, stride=2, padding=2, output_padding=1, size=3), device, n=1, cin=2,
                         cout=4)
    y.requires_grad_(True)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            out = ours_ct(3)(y, w, b, **fkw, padding_mode=mode)
            runs.append((out, torch.autograd.grad(out, y, torch.ones_like(out))[0]))
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


# ----------------------------------------------------------------------------------------------------------
# (c) gradcheck / gradgradcheck of the modules
# ----------------------------------------------------------------------------------------------------------
# (zeros-mode numeric padding is the plain op, gradchecked in test_grad.py)
GRAD_MODULE_CASES = [
    ("1d_s2_p2_op1", 1, dict(kernel_size=3, stride=2, padding=2, output_padding=1), 3, MODES[1:]),
    ("1d_same_k4_s1", 1, dict(kernel_size=4, padding="same"), 3, MODES),
    ("2d_asym_g2", 2, dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1), dilation=(2, 1), groups=2), 2,
     MODES[1:]),
    ("2d_same_s2", 2, dict(kernel_size=3, stride=2, padding="same"), 2, MODES),
    ("3d_p1", 3, dict(kernel_size=(3, 3, 2), padding=(1, 1, 0), bias=False), 2, MODES[1:]),
]


@pytest.mark.parametrize("name,nd,kwargs,size,mode", [
    pytest.param(*case[:4], mode, id=f"{case[0]}-{mode}") for case in GRAD_MODULE_CASES for mode in case[4]])
def test_module_gradcheck_gradgradcheck(name, nd, kwargs, size, mode, device):
    m = ours_ct_module(nd)(2, 2, **kwargs, padding_mode=mode, dtype=torch.float64, device=device)
    params = [p for p in m.parameters()]
    x = randn((1, 2) + (size,) * nd, torch.float64, device, requires_grad=True)

    def fn(x, *p):
        return torch.func.functional_call(m, dict(zip([n for n, _ in m.named_parameters()], p)), (x,))

    assert gradcheck(fn, (x, *params))
    assert gradgradcheck(fn, (x, *params), **GG)


# ----------------------------------------------------------------------------------------------------------
# (d) torch.compile(fullgraph=True)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile is not available")
def test_torch_compile_fullgraph(device):
    """Every padding mode and odd 'same' crops in one model: traced in one graph, same values and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(
        torch_convt.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, padding_mode="reflect"),
        torch_convt.ConvTranspose2d(4, 3, (3, 4), stride=(2, 1), padding="same", padding_mode="circular"),
        torch_convt.ConvTranspose2d(3, 2, (3, 2), stride=(1, 2), padding="same"),
        torch_convt.ConvTranspose2d(2, 2, 2, padding=1, padding_mode="replicate"),
    ).double().to(device)
    x = randn((2, 2, 3, 4), torch.float64, device, requires_grad=True)
    expected = model(x)
    assert expected.shape == (2, 2, 11, 15)
    grads_eager = torch.autograd.grad(expected.square().sum(), [x, *model.parameters()])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    grads_compiled = torch.autograd.grad(got.square().sum(), [x, *model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for a, e in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile is not available")
def test_torch_compile_fullgraph_dynamic_shapes(device):
    """With symbolic sizes (dynamic=True) the pad folding must not branch on them in ways Dynamo refuses."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(
        torch_convt.ConvTranspose1d(2, 3, 3, stride=2, padding=2, output_padding=1, padding_mode="circular"),
        torch_convt.ConvTranspose1d(3, 2, 4, stride=2, padding="same", padding_mode="reflect"),
        torch_convt.ConvTranspose1d(2, 2, 2, padding="same", padding_mode="replicate"),
    ).double().to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for size in (5, 8):
        x = randn((2, 2, size), torch.float64, device, requires_grad=True)
        expected, got = model(x), compiled(x)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0],
                                   rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------
# padding='same' / 'valid' against torch's conv_transpose with explicit cropping
# ----------------------------------------------------------------------------------------------------------
def _torch_same(nd, y, w, b, stride, dilation, groups):
    """torch's full conv_transpose (padding 0; output_padding extends it to input * stride when the dilated kernel
    is shorter than the stride), cropped to input * stride positions starting after the `before` pad of
    TensorFlow's 'SAME' conv."""
    stride, dilation = per_dim(stride, nd), per_dim(dilation, nd)
    extend = [max(s - _extent(k, d), 0) for k, s, d in zip(w.shape[2:], stride, dilation)]
    full = torch_ct(nd)(y, w, b, stride, 0, extend, groups, dilation)
    for j in range(nd):
        before, _ = _tf_same_pads(y.shape[2 + j] * stride[j], w.shape[2 + j], stride[j], dilation[j])
        full = full.narrow(2 + j, before, y.shape[2 + j] * stride[j])
    return full


def test_same_output_size_and_values_grid():
    """Every (size, kernel, stride, dilation) on a 1-d grid: output size input * stride, values and gradients
    equal to torch's cropped conv_transpose."""
    for size in (1, 2, 5):
        for kernel in (1, 2, 3, 4, 5):
            for stride in (1, 2, 3):
                for dilation in (1, 2):
                    y = randn((2, 2, size))
                    w = randn((2, 3, kernel))
                    b = randn((3,))
                    out = check_parity(lambda *a, **k: ours_ct(1)(*a, **k, padding="same"),
                                       lambda *a, **k: _torch_same(1, *a, **k), (y, w, b),
                                       dict(stride=stride, dilation=dilation, groups=1), grad=size == 2)
                    assert out.shape == (2, 3, size * stride), (size, kernel, stride, dilation)


@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_same_asymmetric_grouped(nd, device):
    y = randn((2, 4) + (3, 4, 2)[:nd], torch.float64, device)
    w = randn((4, 3) + (4, 3, 2)[:nd], torch.float64, device)  # even, odd and extent < stride crops
    b = randn((6,), torch.float64, device)
    kw = dict(stride=(2, 2, 3)[:nd], dilation=(1, 2, 1)[:nd], groups=2)
    out = check_parity(lambda *a, **k: ours_ct(nd)(*a, **k, padding="same"), lambda *a, **k: _torch_same(nd, *a, **k),
                       (y, w, b), kw)
    assert out.shape[2:] == tuple(i * s for i, s in zip(y.shape[2:], kw["stride"]))
    # unbatched
    torch.testing.assert_close(ours_ct(nd)(y[1], w, b, padding="same", **kw), out[1], rtol=0, atol=0)


@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_same_stride1_is_adjoint_of_torch_conv_same(nd, device):
    """At stride 1 our 'same' split is torch's own Conv padding='same' split (extra position at the end): the
    transposed convolution is the input-gradient of torch.nn.ConvNd(padding='same', padding_mode=m)."""
    for mode in MODES:
        for kernel, dilation in ((2, 1), (4, 1), (3, 2), (2, 3)):
            conv = torch_conv_module(nd)(2, 3, kernel, padding="same", dilation=dilation, padding_mode=mode,
                                         dtype=torch.float64, device=device)
            x = randn((1, 2) + (6, 5, 4)[:nd], torch.float64, device, requires_grad=True)
            y = randn(conv(x).shape, torch.float64, device)
            expected = torch.autograd.grad(conv(x), x, y)[0]
            got = ours_ct(nd)(y, conv.weight, None, padding="same", dilation=dilation, padding_mode=mode)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_valid_is_padding_zero(device):
    y, w, b, _ = _case(2, dict(kernel=3), device)
    for mode in MODES:
        torch.testing.assert_close(ours_ct(2)(y, w, b, 2, "valid", 1, padding_mode=mode),
                                   torch_ct(2)(y, w, b, 2, 0, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_same_gradcheck(nd, device):
    y = randn((1, 2) + (2, 2, 1)[:nd], torch.float64, device, requires_grad=True)
    # odd crop (extent 3, stride 2: 1 at the end), odd crop at stride 1, extent 2 < stride 3
    w = randn((2, 1) + (3, 2, 2)[:nd], torch.float64, device, requires_grad=True)
    b = randn((2,), torch.float64, device, requires_grad=True)

    def fn(y, w, b):
        return ours_ct(nd)(y, w, b, stride=(2, 1, 3)[:nd], padding="same", groups=2)

    assert gradcheck(fn, (y, w, b))
    assert gradgradcheck(fn, (y, w, b), **GG)


# ----------------------------------------------------------------------------------------------------------
# modules: construction, repr, state_dict, output_size, convert
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
@pytest.mark.parametrize("padding", [1, "same", "valid"])
@pytest.mark.parametrize("mode", MODES)
def test_module_repr_state_dict_and_forward(nd, padding, mode):
    kwargs = dict(in_channels=2, out_channels=4, kernel_size=3, groups=2, dilation=2)
    torch.manual_seed(7)
    ours = ours_ct_module(nd)(**kwargs, padding=padding, padding_mode=mode, dtype=torch.float64)
    torch.manual_seed(7)
    ref = torch_ct_module(nd)(**kwargs, dtype=torch.float64)  # (padding / padding_mode do not change the init)
    conv = torch_conv_module(nd)(**kwargs, padding=padding, padding_mode=mode)
    # repr as torch's Conv shows the same arguments
    assert repr(ours) == repr(conv).replace(f"Conv{nd}d(", f"ConvTranspose{nd}d("), repr(ours)
    assert ours.padding_mode == mode and ours.padding == conv.padding
    assert ours._reversed_padding_repeated_twice == conv._reversed_padding_repeated_twice
    sd_o, sd_r = ours.state_dict(), ref.state_dict()
    assert list(sd_o) == list(sd_r) and all(torch.equal(sd_o[k], sd_r[k]) for k in sd_r)
    ref.load_state_dict(ours.state_dict())
    y = randn((2, 2) + (4,) * nd)
    expected = reference_conv_transpose(nd, y, ours.weight, ours.bias, padding=padding, groups=2, dilation=2,
                                        padding_mode=mode)
    torch.testing.assert_close(ours(y), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours(y[0]), expected[0], rtol=1e-12, atol=1e-12)
    c = copy.deepcopy(ours)
    assert repr(c) == repr(ours) and torch.equal(c(y), ours(y))


def test_module_stride_same_repr():
    m = torch_convt.ConvTranspose2d(2, 3, 4, stride=2, padding="same", padding_mode="reflect", bias=False)
    assert repr(m) == ("ConvTranspose2d(2, 3, kernel_size=(4, 4), stride=(2, 2), padding=same, bias=False, "
                       "padding_mode=reflect)")


@pytest.mark.parametrize("mode", MODES)
def test_module_output_size(mode):
    nd = 2
    m = torch_convt.ConvTranspose2d(2, 3, 3, stride=3, padding=1, padding_mode=mode, dtype=torch.float64)
    y = randn((1, 2, 4, 3))
    for extra in [(0, 0), (1, 2), (2, 1)]:
        size = [(i - 1) * 3 - 2 + 3 + e for i, e in zip(y.shape[2:], extra)]
        out = m(y, output_size=size)
        assert list(out.shape[2:]) == size
        torch.testing.assert_close(out, reference_conv_transpose(nd, y, m.weight, m.bias, stride=3, padding=1,
                                                                 output_padding=extra, padding_mode=mode),
                                   rtol=1e-12, atol=1e-12)
    # out of range: torch's ValueError
    bad = [(4 - 1) * 3 - 2 + 3 + 3, 7]
    assert isinstance(exc_of(lambda: m(y, output_size=bad)), ValueError)


@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_module_same_output_size(nd):
    m = ours_ct_module(nd)(2, 3, 4, stride=2, padding="same")
    y = torch.randn((1, 2) + (3,) * nd)
    expected = m(y)
    assert expected.shape[2:] == (6,) * nd
    for size in [(6,) * nd, (1, 3) + (6,) * nd]:
        assert torch.equal(m(y, output_size=size), expected)
    assert torch.equal(m(y[0], output_size=(3,) + (6,) * nd), expected[0])
    for bad in [(7,) * nd, (5,) * nd, (6,) * (nd + 3)]:
        with pytest.raises(ValueError, match="same"):
            m(y, output_size=bad)


BAD_CTOR = [
    ("unknown_mode", dict(padding_mode="foo")),
    ("unknown_padding_string", dict(padding="full")),
    ("same_with_output_padding", dict(padding="same", stride=2, output_padding=1)),
    ("groups_not_dividing", dict(groups=4, padding_mode="reflect")),  # torch's own check still runs first
]


@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
@pytest.mark.parametrize("name,kwargs", BAD_CTOR, ids=[c[0] for c in BAD_CTOR])
def test_module_constructor_errors(name, kwargs, nd):
    with pytest.raises(ValueError) as info:
        ours_ct_module(nd)(2, 2, 3, **kwargs)
    assert str(info.value)


def test_convert_then_set_padding_mode():
    """A converted torch.nn module (ours without our __init__) takes a padding_mode set afterwards."""
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 3, padding=1, dtype=torch.float64))
    torch_convt.convert(model)
    model[0].padding_mode = "circular"
    y = randn((1, 2, 5, 4))
    torch.testing.assert_close(model(y), reference_conv_transpose(2, y, model[0].weight, model[0].bias, padding=1,
                                                                  padding_mode="circular"), rtol=1e-12, atol=1e-12)
    model[0].padding_mode = "foo"
    assert isinstance(exc_of(lambda: model(y)), ValueError)


# ----------------------------------------------------------------------------------------------------------
# functional errors: the same exception type as torch's equivalent padded conv
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
@pytest.mark.parametrize("mode,padding", [("reflect", 2), ("reflect", 3), ("reflect", 4), ("circular", 3),
                                          ("circular", 4), ("replicate", 5)])
def test_padding_too_large_for_mode_errors_like_torch_conv(nd, mode, padding):
    """Kernel 2p+1 makes the output (the conv's input) 3 long in every dim; torch's F.pad needs pad < 3 for
    reflect and pad <= 3 for circular. Where torch's conv fails, ours fails with the same exception type;
    where it works, ours gives its input-gradient."""
    y = torch.randn((1, 2) + (3,) * nd, dtype=torch.float64)
    w = torch.randn((2, 2) + (2 * padding + 1,) * nd, dtype=torch.float64)
    conv = torch_conv_module(nd)(2, 2, 2 * padding + 1, padding=padding, padding_mode=mode, bias=False,
                                 dtype=torch.float64)
    expected = exc_of(lambda: conv(torch.randn((1, 2) + (3,) * nd, dtype=torch.float64)))
    got = exc_of(lambda: ours_ct(nd)(y, w, None, padding=padding, padding_mode=mode))
    assert type(got) is type(expected), (got, expected)
    if expected is None:
        torch.testing.assert_close(ours_ct(nd)(y, w, None, padding=padding, padding_mode=mode),
                                   reference_conv_transpose(nd, y, w, None, padding=padding, padding_mode=mode),
                                   rtol=1e-12, atol=1e-12)
    else:
        assert mode in str(got)


@pytest.mark.parametrize("mode", MODES)
def test_output_of_one_position(mode):
    """Padding 1 around an output (conv input) of length 1: replicate folds both pads onto the same position,
    circular wraps both around it, reflect is refused as torch's F.pad refuses it."""
    y = torch.randn(2, 2, 1, dtype=torch.float64)
    w = torch.randn(2, 3, 3, dtype=torch.float64)
    conv = torch_conv_module(1)(3, 2, 3, padding=1, padding_mode=mode, bias=False, dtype=torch.float64)
    expected = exc_of(lambda: conv(torch.randn(2, 3, 1, dtype=torch.float64)))
    got = exc_of(lambda: ours_ct(1)(y, w, None, padding=1, padding_mode=mode))
    assert type(got) is type(expected), (got, expected)
    if expected is None:
        torch.testing.assert_close(ours_ct(1)(y, w, None, padding=1, padding_mode=mode),
                                   reference_conv_transpose(1, y, w, None, padding=1, padding_mode=mode),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES[1:])
def test_functional_errors(mode):
    y, w, b = torch.randn(1, 2, 5), torch.randn(2, 3, 3), torch.randn(3)
    fn = ours_ct(1)
    for kwargs, exc in [
        (dict(padding=-1), RuntimeError),                       # as torch's conv_transpose
        (dict(padding=4), RuntimeError),                        # output size 5 - 1 + 3 - 8 < 1
        (dict(stride=2, output_padding=2, padding=1), RuntimeError),
        (dict(padding="same", stride=2, output_padding=1), ValueError),
        (dict(padding="full"), TypeError),                      # torch: padding must be ints
    ]:
        with pytest.raises(exc):
            fn(y, w, b, **kwargs, padding_mode=mode)
        with pytest.raises(exc):  # the zeros mode too
            fn(y, w, b, **kwargs)
    with pytest.raises(ValueError, match="padding_mode"):
        fn(y, w, b, padding=1, padding_mode="foo")
    for bad_bias in (torch.randn(4), torch.randn(3, 1), torch.randn(3, dtype=torch.float64)):
        assert type(exc_of(lambda: fn(y, w, bad_bias, padding=1, padding_mode=mode))) is \
            type(exc_of(lambda: fn(y, w, bad_bias, padding=1)))
    # positional calls are torch's signature; padding_mode is keyword-only
    with pytest.raises(TypeError):
        fn(y, w, b, 1, 1, 0, 1, 1, mode)
