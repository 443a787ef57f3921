"""The raw ops torch.ops.torch_convt.{conv_transpose, conv, conv_weight_grad}: schema, values, opcheck
(schema / autograd registration / fake tensor / AOT dispatch) and torch.compile of the modules. Everything that
computes runs on each device of the ``device`` fixture (conftest.py)."""
import copy
import functools
import re

import pytest
import torch
import torch.nn.functional as F

import torch_convt
from helpers import DIMS, Cfg, assert_close, make_tensor, per_dim, randn

CT_SCHEMA = ("conv_transpose", ["input", "weight", "bias", "stride", "padding", "output_padding", "dilation",
                                "groups"],
             ["Tensor", "Tensor", "Tensor?", "int[]", "int[]", "int[]", "int[]", "int"])
CONV_SCHEMA = ("conv", ["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
               ["Tensor", "Tensor", "Tensor?", "int[]", "int[]", "int[]", "int"])
WG_SCHEMA = ("conv_weight_grad", ["input", "grad_output", "weight_size", "stride", "padding", "dilation",
                                  "groups"],
             ["Tensor", "Tensor", "int[]", "int[]", "int[]", "int[]", "int"])


@pytest.mark.parametrize("name,arg_names,arg_types", [CT_SCHEMA, CONV_SCHEMA, WG_SCHEMA],
                         ids=["conv_transpose", "conv", "conv_weight_grad"])
def test_schema(name, arg_names, arg_types):
    op = getattr(torch.ops.torch_convt, name).default
    schema = op._schema
    assert schema.name == f"torch_convt::{name}"
    assert [a.name for a in schema.arguments] == arg_names

    def norm(t):
        return re.sub(r"SymInt", "int", str(t)).replace("List[int]", "int[]").replace("Optional[Tensor]",
                                                                                        "Tensor?")
    assert [norm(a.type) for a in schema.arguments] == arg_types
    assert len(schema.returns) == 1 and str(schema.returns[0].type) == "Tensor"
    assert not any(a.is_write for a in schema.arguments if a.alias_info is not None)


# ----------------------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------------------
OP_CASES = [
    ("1d_g2_s2_p1_op1", 1, Cfg(n=2, cin=4, cout=6, groups=2, size=5, kernel=3, stride=2, padding=1,
                               output_padding=1)),
    ("2d_asym_nobias", 2, Cfg(n=1, cin=3, cout=2, size=(4, 5, 5), kernel=(2, 3), stride=(1, 2), padding=(0, 1),
                              output_padding=(1, 1), dilation=(2, 1), bias=False)),
    ("2d_depthwise", 2, Cfg(n=2, cin=3, cout=3, groups=3, size=4, kernel=3, stride=2, padding=1)),
    ("3d_g2_asym", 3, Cfg(n=1, cin=4, cout=2, groups=2, size=(3, 4, 3), kernel=(2, 1, 3), stride=(2, 1, 1),
                          padding=(1, 0, 2), output_padding=(1, 0, 1), dilation=(1, 1, 2))),
    ("3d_basic", 3, Cfg(n=2, cin=2, cout=3, size=3, kernel=2)),
]
OP_IDS = [c[0] for c in OP_CASES]


def _ct_args(nd, cfg, dtype=torch.float64, requires_grad=False, device="cpu"):
    x, w, b = cfg.ct_tensors(nd, dtype, device=device)
    if requires_grad:
        x.requires_grad_(True)
        w.requires_grad_(True)
        if b is not None:
            b.requires_grad_(True)
    return (x, w, b, list(per_dim(cfg.stride, nd)), list(per_dim(cfg.padding, nd)),
            list(per_dim(cfg.output_padding, nd)), list(per_dim(cfg.dilation, nd)), cfg.groups)


def _conv_cfg(cfg):
    # reuse the case with conv-compatible sizes: make the input large enough
    return cfg.replace(size=tuple(s + 3 for s in per_dim(cfg.size, 3)), output_padding=0)


def _conv_args(nd, cfg, dtype=torch.float64, requires_grad=False, device="cpu"):
    cfg = _conv_cfg(cfg)
    x, w, b = cfg.conv_tensors(nd, dtype, device=device)
    if requires_grad:
        x.requires_grad_(True)
        w.requires_grad_(True)
        if b is not None:
            b.requires_grad_(True)
    return (x, w, b, list(per_dim(cfg.stride, nd)), list(per_dim(cfg.padding, nd)),
            list(per_dim(cfg.dilation, nd)), cfg.groups)


def _wg_args(nd, cfg, dtype=torch.float64, requires_grad=False, device="cpu"):
    x, w, _, s, p, d, g = _conv_args(nd, cfg, dtype, device=device)
    y = getattr(F, f"conv{nd}d")(x, w, None, s, p, d, g)
    gy = make_tensor(y.shape, dtype, device=device)
    if requires_grad:
        x.requires_grad_(True)
        gy.requires_grad_(True)
    return (x, gy, list(w.shape), s, p, d, g)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128],
                         ids=["float64", "float32", "complex128"])
@pytest.mark.parametrize("name,nd,cfg", OP_CASES, ids=OP_IDS)
def test_op_values(name, nd, cfg, dtype, device):
    args = _ct_args(nd, cfg, dtype, device=device)
    x, w, b, s, p, op, d, g = args
    got = torch.ops.torch_convt.conv_transpose(*args)
    want = getattr(F, f"conv_transpose{nd}d")(x, w, b, s, p, op, g, d)
    assert_close(got, want, dtype)

    args = _conv_args(nd, cfg, dtype, device=device)
    x, w, b, s, p, d, g = args
    got = torch.ops.torch_convt.conv(*args)
    want = getattr(F, f"conv{nd}d")(x, w, b, s, p, d, g)
    assert_close(got, want, dtype)

    if dtype.is_complex:
        return  # see test_conv_weight_grad_complex_is_the_autograd_weight_gradient
    # conv_weight_grad == d/dw <grad_output, conv(input, w)> as computed by torch's autograd
    x, gy, wsize, s, p, d, g = _wg_args(nd, cfg, dtype, device=device)
    got = torch.ops.torch_convt.conv_weight_grad(x, gy, wsize, s, p, d, g)
    w = torch.zeros(wsize, dtype=dtype, device=device, requires_grad=True)
    y = getattr(F, f"conv{nd}d")(x, w, None, s, p, d, g)
    (want,) = torch.autograd.grad(y, w, gy)
    assert_close(got, want, dtype, what="conv_weight_grad")


@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_conv_weight_grad_complex_is_bilinear(nd, device):
    """Contract: conv_weight_grad(input, grad_output, ...) is the bilinear form
    dW[cy, cx, k] = sum input[cx, i*s - p + k*d] * grad_output[cy, i], with no conjugation, so that the three ops
    stay closed under differentiation. torch's autograd weight gradient (conjugate-Wirtinger convention) is
    therefore conv_weight_grad(input.conj(), grad_output), which is what our autograd uses."""
    cfg = OP_CASES[{1: 0, 2: 1, 3: 3}[nd]][2]
    x, gy, wsize, s, p, d, g = _wg_args(nd, cfg, torch.complex128, device=device)
    w = torch.zeros(wsize, dtype=torch.complex128, device=device, requires_grad=True)
    y = getattr(F, f"conv{nd}d")(x, w, None, s, p, d, g)
    (want,) = torch.autograd.grad(y, w, gy)
    got = torch.ops.torch_convt.conv_weight_grad(x.conj(), gy, wsize, s, p, d, g)
    assert_close(got, want, torch.complex128, what="conv_weight_grad")
    # bilinear, no conjugation: Re(sum x*gy) = sum(Re x * Re gy) - sum(Im x * Im gy)
    def cwg(a, b):
        return torch.ops.torch_convt.conv_weight_grad(a.contiguous(), b.contiguous(), wsize, s, p, d, g)

    plain = cwg(x, gy)
    assert_close(plain.real, cwg(x.real, gy.real) - cwg(x.imag, gy.imag), torch.float64, what="conv_weight_grad")


@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_conv_weight_grad_truncated_input(nd, device):
    """Input positions past the last window (stride does not divide evenly) must not contribute."""
    cfg = Cfg(n=2, cin=2, cout=3, size=6, kernel=2, stride=3, padding=0)
    x, w, b = cfg.conv_tensors(nd, device=device)
    s, p, d = [3] * nd, [0] * nd, [1] * nd
    y = getattr(F, f"conv{nd}d")(x, w, None, s, p, d, 1)
    gy = torch.randn_like(y)
    got = torch.ops.torch_convt.conv_weight_grad(x, gy, list(w.shape), s, p, d, 1)
    want = getattr(torch.nn.grad, f"conv{nd}d_weight")(x, w.shape, gy, s, p, d, 1)
    assert_close(got, want)


def test_ops_reject_unbatched_and_bad_lists(device):
    x = randn((2, 5, 5), device=device)
    w = randn((2, 3, 3, 3), device=device)
    with pytest.raises(RuntimeError):
        torch.ops.torch_convt.conv_transpose(x, w, None, [1, 1], [0, 0], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError):
        torch.ops.torch_convt.conv(x, w.transpose(0, 1), None, [1, 1], [0, 0], [1, 1], 1)
    xb = x[None]
    with pytest.raises(RuntimeError):  # int lists of the wrong length
        torch.ops.torch_convt.conv_transpose(xb, w, None, [1], [0, 0], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError):
        torch.ops.torch_convt.conv(xb, w.transpose(0, 1), None, [1, 1], [0, 0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError):
        torch.ops.torch_convt.conv_weight_grad(xb, randn((1, 3, 3, 3), device=device),
                                               [3, 2, 3, 3], [1, 1], [0, 0], [1], 1)
    with pytest.raises(RuntimeError):  # weight_size inconsistent with grad_output channels
        torch.ops.torch_convt.conv_weight_grad(xb, randn((1, 3, 3, 3), device=device),
                                               [4, 2, 3, 3], [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError):  # grad_output spatial size inconsistent with the conv output
        torch.ops.torch_convt.conv_weight_grad(xb, randn((1, 3, 4, 3), device=device),
                                               [3, 2, 3, 3], [1, 1], [0, 0], [1, 1], 1)


def test_ops_accept_batch_zero(device):
    x = randn((0, 2, 4, 4), device=device)
    w = randn((2, 3, 3, 3), device=device)
    out = torch.ops.torch_convt.conv_transpose(x, w, None, [2, 2], [1, 1], [1, 1], [1, 1], 1)
    assert out.shape == (0, 3, 8, 8) and out.device == x.device
    out = torch.ops.torch_convt.conv(x, w.transpose(0, 1), None, [1, 1], [0, 0], [1, 1], 1)
    assert out.shape == (0, 3, 2, 2) and out.device == x.device
    gw = torch.ops.torch_convt.conv_weight_grad(x, randn((0, 3, 2, 2), device=device),
                                                [3, 2, 3, 3], [1, 1], [0, 0], [1, 1], 1)
    assert gw.shape == (3, 2, 3, 3) and gw.device == x.device
    assert not gw.any()


# ----------------------------------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------------------------------
OPCHECK_CASES = [OP_CASES[0], OP_CASES[1], OP_CASES[3]]


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("name,nd,cfg", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_conv_transpose(name, nd, cfg, requires_grad, device):
    torch.library.opcheck(torch.ops.torch_convt.conv_transpose.default,
                          _ct_args(nd, cfg, requires_grad=requires_grad, device=device))


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("name,nd,cfg", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_conv(name, nd, cfg, requires_grad, device):
    torch.library.opcheck(torch.ops.torch_convt.conv.default,
                          _conv_args(nd, cfg, requires_grad=requires_grad, device=device))


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("name,nd,cfg", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_conv_weight_grad(name, nd, cfg, requires_grad, device):
    torch.library.opcheck(torch.ops.torch_convt.conv_weight_grad.default,
                          _wg_args(nd, cfg, requires_grad=requires_grad, device=device))


def test_opcheck_float32_and_channels_last(device):
    x, w, b, *rest = _ct_args(2, OP_CASES[2][2], torch.float32, requires_grad=False, device=device)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = w.requires_grad_(True)
    b = b.requires_grad_(True)
    torch.library.opcheck(torch.ops.torch_convt.conv_transpose.default, (x, w, b, *rest))
    args = _conv_args(2, OP_CASES[2][2], torch.float32, requires_grad=True, device=device)
    torch.library.opcheck(torch.ops.torch_convt.conv.default, args)


def test_fake_tensor_shapes(device):
    """register_fake computes the right output shape/dtype/device without touching data."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    dev = torch.device(device)
    with FakeTensorMode():
        x = torch.empty(2, 4, 5, 6, 7, device=device)
        w = torch.empty(4, 3, 3, 2, 1, device=device)
        out = torch.ops.torch_convt.conv_transpose(x, w, torch.empty(6, device=device), [2, 1, 3], [1, 0, 0],
                                                   [1, 0, 2], [1, 2, 1], 2)
        assert out.shape == (2, 6, 10, 8, 21) and out.dtype == torch.float32
        assert out.device.type == dev.type
        out = torch.ops.torch_convt.conv(x, w.transpose(0, 1), None, [2, 1, 3], [1, 0, 0], [1, 2, 1], 1)
        assert out.shape == (2, 3, 3, 4, 3) and out.device.type == dev.type
        gw = torch.ops.torch_convt.conv_weight_grad(x, torch.empty(2, 3, 3, 4, 3, device=device),
                                                    [3, 4, 3, 2, 1], [2, 1, 3], [1, 0, 0], [1, 2, 1], 1)
        assert gw.shape == (3, 4, 3, 2, 1) and gw.device.type == dev.type


def test_module_uses_the_custom_ops(device):
    """The modules must dispatch to torch.ops.torch_convt (not to aten convolution)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    m = torch_convt.ConvTranspose2d(2, 3, 3, stride=2).to(device)
    c = torch_convt.Conv2d(3, 2, 3).to(device)
    x = randn((1, 2, 4, 4), torch.float32, device, requires_grad=True)
    with Record() as rec:
        y = c(m(x))
        y.sum().backward()
    names = " ".join(rec.ops)
    assert "torch_convt.conv_transpose" in names or "torch_convt::conv_transpose" in names, names
    assert "torch_convt.conv." in names or "torch_convt::conv" in names, names
    assert "aten.convolution" not in names and "mkldnn" not in names and "cudnn" not in names, names


def test_calls_without_a_graph_are_seen(device):
    """A call that records no graph takes the entry points' direct way into the dispatcher (torch_convt._C), from
    below autograd: dispatch modes and the profiler must still see the op, for all three ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    y = randn((1, 2, 4, 4), torch.float32, device)
    x = randn((1, 3, 9, 9), torch.float32, device)
    w = randn((2, 3, 3, 3), torch.float32, device)
    calls = [lambda: torch_convt.ops.conv_transpose(y, w, None, [2, 2], [0, 0], [0, 0], [1, 1], 1),
             lambda: torch_convt.ops.conv(x, w, None, [2, 2], [0, 0], [1, 1], 1),
             lambda: torch_convt.ops.conv_weight_grad(x, y, [2, 3, 3, 3], [2, 2], [0, 0], [1, 1], 1)]
    for name, call in zip(("conv_transpose", "conv", "conv_weight_grad"), calls):
        with torch.no_grad():
            with Record() as rec:
                call()
            assert any(f"torch_convt.{name}." in op for op in rec.ops), rec.ops
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                call()
            assert f"torch_convt::{name}" in {e.name for e in prof.events()}, name


def test_torch_function_modes_see_the_ops(device):
    """The entry points skip the dispatcher's autograd round trip only where nothing else must see the call: a
    __torch_function__ mode still sees the op, with or without a graph to record."""
    from torch.overrides import TorchFunctionMode

    class Record(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.funcs = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.funcs.append(str(func))
            return func(*args, **(kwargs or {}))

    m = torch_convt.ConvTranspose2d(2, 3, 3, stride=2).to(device)
    for requires_grad in (True, False):
        x = randn((1, 2, 4, 4), torch.float32, device, requires_grad=requires_grad)
        with Record() as rec:
            m(x)
        assert "torch_convt.conv_transpose.default" in rec.funcs, rec.funcs


# ----------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _compile_status(device="cpu"):
    """(ok, reason): whether torch.compile's default (inductor) backend works at all here for `device` -- it needs
    a C compiler (CPU) or Triton (CUDA). Probed once per device on a pure-torch function so that a broken
    toolchain skips instead of failing."""
    import shutil
    if not hasattr(torch, "compile"):
        return False, "torch.compile is not available"
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang", "g++", "c++")):
        return False, "torch.compile needs a C compiler"
    try:
        torch._dynamo.reset()
        f = torch.compile(lambda t: torch.relu(t) * 2 + 1, fullgraph=True)
        f(torch.randn(4, device=device))
        torch._dynamo.reset()
    except Exception as e:  # noqa: BLE001
        return False, f"torch.compile does not work here: {type(e).__name__}: {e}"
    return True, ""


def _require_compile(device="cpu"):
    ok, reason = _compile_status(device)
    if not ok:
        pytest.skip(reason)


class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch_convt.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1)
        self.act = torch.nn.ReLU()
        self.conv = torch_convt.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(self.act(self.up(x)))


def test_torch_compile_fullgraph(device):
    _require_compile(device)
    torch._dynamo.reset()
    model = _Small().to(device)
    x = randn((2, 3, 5, 6), torch.float32, device)
    compiled = torch.compile(model, fullgraph=True)

    xe = x.clone().requires_grad_(True)
    ye = model(xe)
    ye.square().sum().backward()
    grads_e = [xe.grad] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    xc = x.clone().requires_grad_(True)
    yc = compiled(xc)
    yc.square().sum().backward()
    grads_c = [xc.grad] + [p.grad.clone() for p in model.parameters()]

    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-4)

    # a second call with another input shape (dynamic / recompile) still matches eager
    x2 = randn((1, 3, 4, 7), torch.float32, device)
    torch.testing.assert_close(compiled(x2), model(x2), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_torch_compile_functional_3d_aot_eager(device):
    """Functional API under torch.compile (aot_eager backend: exercises the fake/autograd registrations)."""
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available")
    torch._dynamo.reset()
    import torch_convt.functional as TF

    def f(x, w, b, w2):
        y = TF.conv_transpose3d(x, w, b, stride=(2, 1, 1), padding=(1, 0, 0), output_padding=(1, 0, 0),
                                groups=2, dilation=(1, 2, 1))
        return TF.conv3d(y, w2, None, padding="same")  # odd kernel: symmetric padding

    x = randn((1, 4, 3, 3, 3), torch.float64, device, requires_grad=True)
    w = randn((4, 1, 2, 2, 2), torch.float64, device, requires_grad=True)
    b = randn((2,), torch.float64, device, requires_grad=True)
    w2 = randn((3, 2, 3, 1, 3), torch.float64, device, requires_grad=True)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    ye = f(x, w, b, w2)
    ge = torch.autograd.grad(ye.sum(), (x, w, b, w2))
    yc = cf(x, w, b, w2)
    gc = torch.autograd.grad(yc.sum(), (x, w, b, w2))
    torch.testing.assert_close(yc, ye, rtol=1e-12, atol=1e-12)
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile is not available")
@pytest.mark.parametrize("kernel", [2, 4], ids=["k2", "k4"])
def test_torch_compile_fullgraph_conv_same_even_kernel(kernel, device):
    """padding='same' with an even kernel pads asymmetrically; it must still trace with fullgraph=True
    (torch.nn.Conv2d does)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(2, 3, kernel, padding="same"), torch.nn.ReLU()).to(device)
    model = copy.deepcopy(ref)
    torch_convt.convert(model, include_conv=True)
    assert type(model[0]) is torch_convt.Conv2d
    x = randn((1, 2, 6, 5), torch.float32, device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
