"""The nn.Module API: torch_convt.ConvTranspose{1,2,3}d / Conv{1,2,3}d as drop-in replacements of the torch
classes (construction, init, state_dict, repr, errors, forward with output_size, padding modes), the seed
configurations, and torch_convt.convert(). Tests that compute or place parameters run on each device of the
``device`` fixture (conftest.py); pure constructor/argument checks are device-independent and run once."""
import copy

import pytest
import torch
import torch.nn as nn

import torch_convt
from helpers import (exc_of, DIMS, assert_close, ct_out_size, ours_conv_module, ours_ct_module, randn,
                     torch_conv_module, torch_ct_module)


def _check_backward(ours, ref, xo, xr, yo, yr):
    """Backpropagates the same gradient through both modules and compares input, weight and bias gradients."""
    g = torch.randn_like(yr)
    yo.backward(g)
    yr.backward(g)
    assert_close(xo.grad, xr.grad, what="grad_input")
    assert_close(ours.weight.grad, ref.weight.grad, what="grad_weight")
    assert_close(ours.bias.grad, ref.bias.grad, what="grad_bias")


KINDS = {"ct": (ours_ct_module, torch_ct_module), "conv": (ours_conv_module, torch_conv_module)}

CT_CTOR_CASES = [
    ("basic", dict(in_channels=4, out_channels=6, kernel_size=3)),
    ("s2_p1_op1", dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, output_padding=1)),
    ("g2_nobias_d2", dict(in_channels=4, out_channels=6, kernel_size=2, groups=2, bias=False, dilation=2)),
    ("depthwise", dict(in_channels=3, out_channels=3, kernel_size=3, groups=3)),
    ("asym", dict(in_channels=2, out_channels=3, kernel_size=(2, 3, 4), stride=(1, 2, 3), padding=(0, 1, 2),
                  output_padding=(1, 0, 2), dilation=(2, 1, 3))),
]
CONV_CTOR_CASES = [
    ("basic", dict(in_channels=4, out_channels=6, kernel_size=3)),
    ("s2_p1", dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1)),
    ("g2_nobias_d2", dict(in_channels=4, out_channels=6, kernel_size=2, groups=2, bias=False, dilation=2)),
    ("same_reflect", dict(in_channels=2, out_channels=3, kernel_size=4, padding="same", padding_mode="reflect")),
    ("valid", dict(in_channels=2, out_channels=3, kernel_size=3, padding="valid")),
    ("asym_circular", dict(in_channels=2, out_channels=4, kernel_size=(2, 3, 4), stride=(1, 2, 3),
                           padding=(1, 1, 2), dilation=(2, 1, 1), padding_mode="circular", groups=2)),
    ("replicate", dict(in_channels=3, out_channels=3, kernel_size=3, padding=1, padding_mode="replicate")),
]


def _trunc(kwargs, nd):
    out = {}
    for k, v in kwargs.items():
        out[k] = tuple(v[:nd]) if isinstance(v, tuple) else v
    return out


def _ctor_cases():
    cases = []
    for kind, lst in (("ct", CT_CTOR_CASES), ("conv", CONV_CTOR_CASES)):
        for nd in DIMS:
            for name, kw in lst:
                cases.append(pytest.param(kind, nd, _trunc(kw, nd), id=f"{kind}{nd}d-{name}"))
    return cases


def _pair(kind, nd, kwargs, seed=123, **extra):
    ours_cls, torch_cls = KINDS[kind][0](nd), KINDS[kind][1](nd)
    torch.manual_seed(seed)
    ours = ours_cls(**kwargs, **extra)
    torch.manual_seed(seed)
    ref = torch_cls(**kwargs, **extra)
    return ours, ref


def _input_for(kind, nd, m, n=2, size=7):
    if kind == "conv" and m.padding_mode == "circular":
        size = 9
    return randn((n, m.in_channels) + (size,) * nd, m.weight.dtype, m.weight.device)


# ----------------------------------------------------------------------------------------------------------
# class relationships, init, state_dict, repr
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_subclasses(nd):
    assert issubclass(ours_ct_module(nd), torch_ct_module(nd))
    assert issubclass(ours_conv_module(nd), torch_conv_module(nd))
    assert ours_ct_module(nd).__name__ == f"ConvTranspose{nd}d"
    assert ours_conv_module(nd).__name__ == f"Conv{nd}d"
    assert ours_ct_module(nd) is not torch_ct_module(nd)
    assert ours_conv_module(nd) is not torch_conv_module(nd)
    m = ours_ct_module(nd)(2, 3, 3)
    assert isinstance(m, torch_ct_module(nd)) and isinstance(m, nn.Module)


@pytest.mark.parametrize("kind,nd,kwargs", _ctor_cases())
def test_same_init_state_dict_repr_attributes(kind, nd, kwargs, device):
    ours, ref = _pair(kind, nd, kwargs, device=device)  # (initialized directly on `device`)
    assert repr(ours) == repr(ref)
    assert str(ours) == str(ref)
    assert ours.extra_repr() == ref.extra_repr()
    sd_o, sd_r = ours.state_dict(), ref.state_dict()
    assert list(sd_o) == list(sd_r)
    for k in sd_r:
        assert torch.equal(sd_o[k], sd_r[k]), k
        assert sd_o[k].dtype == sd_r[k].dtype and sd_o[k].device == sd_r[k].device
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "output_padding", "transposed", "padding_mode", "_reversed_padding_repeated_twice"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert all(isinstance(p, nn.Parameter) for p in ours.parameters())
    # cross-loading
    ref.load_state_dict(ours.state_dict())
    ours.load_state_dict(ref.state_dict())


@pytest.mark.parametrize("kind,nd,kwargs", _ctor_cases())
def test_forward_and_grads_match_torch_module(kind, nd, kwargs, device):
    ours, ref = _pair(kind, nd, kwargs, dtype=torch.float64)
    ours.to(device)
    ref.to(device)
    x = _input_for(kind, nd, ref, size=5 if kind == "ct" else 9)
    xo = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    yo, yr = ours(xo), ref(xr)
    assert_close(yo.detach(), yr.detach())
    g = torch.randn_like(yr)
    yo.backward(g)
    yr.backward(g)
    assert_close(xo.grad, xr.grad, what="grad_input")
    for (n, po), (_, pr) in zip(ours.named_parameters(), ref.named_parameters()):
        assert_close(po.grad, pr.grad, what=f"grad_{n}")
    # unbatched
    assert_close(ours(x[0]).detach(), ref(x[0]).detach(), what="unbatched")


@pytest.mark.parametrize("kind", ["ct", "conv"])
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_module_dtype_device_kwargs_and_to(kind, nd, device):
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.complex64):
        ours, ref = _pair(kind, nd, dict(in_channels=2, out_channels=4, kernel_size=3, groups=2),
                          dtype=dtype, device=device)
        assert ours.weight.dtype == dtype and ours.weight.device.type == device
        assert torch.equal(ours.weight, ref.weight)
    ours, ref = _pair(kind, nd, dict(in_channels=2, out_channels=4, kernel_size=3))
    ours = ours.double().to(device)
    ref = ref.double().to(device)
    assert type(ours) is ours_conv_module(nd) if kind == "conv" else type(ours) is ours_ct_module(nd)
    assert ours.weight.device.type == device
    x = randn((1, 2) + (5,) * nd, torch.float64, device)
    assert_close(ours(x).detach(), ref(x).detach())
    ours_h = copy.deepcopy(ours).to(torch.bfloat16)
    assert type(ours_h) is type(ours)
    y = ours_h(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.device == x.device
    if device != "cpu":  # moving back to the CPU keeps the class and still matches
        ours_c = copy.deepcopy(ours).cpu()
        assert type(ours_c) is type(ours) and ours_c.weight.device.type == "cpu"
        assert_close(ours_c(x.cpu()).detach(), ref(x).detach().cpu())


@pytest.mark.parametrize("kind", ["ct", "conv"])
def test_deepcopy_pickle_and_eval(kind, device):
    import io
    nd = 2
    ours, _ = _pair(kind, nd, dict(in_channels=2, out_channels=4, kernel_size=3))
    ours.to(device)
    x = randn((1, 2, 6, 6), torch.float32, device)
    c = copy.deepcopy(ours)
    assert type(c) is type(ours)
    torch.testing.assert_close(c(x), ours(x), rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is type(ours) and loaded.weight.device == ours.weight.device
    torch.testing.assert_close(loaded(x), ours(x), rtol=0, atol=0)
    ours.eval()
    assert not ours.training
    torch.testing.assert_close(ours(x), c(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# constructor / forward errors (same exception types as torch)
# ----------------------------------------------------------------------------------------------------------
BAD_CTOR = [
    ("groups_not_dividing_out", "ct", dict(in_channels=4, out_channels=6, kernel_size=3, groups=4)),
    ("groups_not_dividing_in", "ct", dict(in_channels=3, out_channels=6, kernel_size=3, groups=2)),
    ("groups_zero", "ct", dict(in_channels=4, out_channels=6, kernel_size=3, groups=0)),
    ("groups_negative", "conv", dict(in_channels=4, out_channels=6, kernel_size=3, groups=-2)),
    ("conv_groups_not_dividing", "conv", dict(in_channels=4, out_channels=6, kernel_size=3, groups=4)),
    # (padding_mode 'reflect' / 'circular', which torch.nn's ConvTranspose rejects, are accepted by ours:
    # tests/test_padding_modes.py)
    ("ct_padding_mode_unknown", "ct", dict(in_channels=2, out_channels=2, kernel_size=3, padding_mode="foo")),
    ("conv_padding_mode_unknown", "conv", dict(in_channels=2, out_channels=2, kernel_size=3,
                                               padding_mode="foo")),
    ("conv_padding_string_unknown", "conv", dict(in_channels=2, out_channels=2, kernel_size=3, padding="full")),
    ("conv_same_strided", "conv", dict(in_channels=2, out_channels=2, kernel_size=3, padding="same", stride=2)),
]


@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
@pytest.mark.parametrize("name,kind,kwargs", BAD_CTOR, ids=[c[0] for c in BAD_CTOR])
def test_constructor_errors_same_type(name, kind, kwargs, nd):
    ours_cls, torch_cls = KINDS[kind][0](nd), KINDS[kind][1](nd)
    expected = exc_of(lambda: torch_cls(**kwargs))
    assert expected is not None, "test case should be invalid for torch"
    with pytest.raises(Exception) as info:
        ours_cls(**kwargs)
    assert type(info.value) is type(expected), (type(info.value), type(expected), info.value)
    assert str(info.value)


@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_ct_padding_mode_changed_after_construction(nd):
    """torch checks padding_mode again in forward (ValueError); ours accepts 'reflect' / 'replicate' /
    'circular' (tests/test_padding_modes.py) and rejects an unknown mode there."""
    ours, ref = _pair("ct", nd, dict(in_channels=2, out_channels=2, kernel_size=3))
    ours.padding_mode = "foo"
    ref.padding_mode = "foo"
    x = torch.randn((1, 2) + (4,) * nd)
    expected = exc_of(lambda: ref(x))
    assert isinstance(expected, ValueError)
    with pytest.raises(ValueError) as info:
        ours(x)
    assert str(info.value)


@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_ct_geometry_changed_after_calls(nd):
    """The modules keep the op's geometry lists while their attributes stay the same objects: changing stride,
    padding, output_padding, dilation or groups after calls (new tuples, a list, even a list changed in place) must
    take effect as in torch.nn."""
    # (no bias: a new groups count changes the output channels the weight stands for)
    ours, ref = _pair("ct", nd, dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1, bias=False))
    x = torch.randn((2, 4) + (5,) * nd)
    changes = [("stride", (3,) * nd), ("padding", (2,) * nd), ("output_padding", (1,) * nd), ("dilation", (2,) * nd),
               ("padding", (0,) * nd), ("groups", 2), ("stride", [1] * nd), ("output_padding", (0,) * nd)]
    for name, value in changes:
        assert_close(ours(x), ref(x))
        setattr(ours, name, value)
        setattr(ref, name, value)
        assert_close(ours(x), ref(x))
    ours.stride[0] = 2  # (a list, changed in place)
    ref.stride[0] = 2
    assert_close(ours(x), ref(x))


# ----------------------------------------------------------------------------------------------------------
# output_size
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_output_size_all_valid_sizes(nd, batched, device):
    kwargs = dict(in_channels=2, out_channels=3, kernel_size=(3, 2, 3)[:nd], stride=(3, 2, 1)[:nd],
                  padding=(1, 0, 1)[:nd], dilation=(1, 2, 2)[:nd])
    ours, ref = _pair("ct", nd, kwargs, dtype=torch.float64)
    ours.to(device)
    ref.to(device)
    x = randn((2, 2) + (3,) * nd, torch.float64, device)
    if not batched:
        x = x[0]
    mins = [ct_out_size(3, k, s, p, 0, d) for k, s, p, d in zip(kwargs["kernel_size"], kwargs["stride"],
                                                                  kwargs["padding"], kwargs["dilation"])]
    for extra in range(max(kwargs["stride"])):
        osize = [m + min(extra, s - 1) for m, s in zip(mins, kwargs["stride"])]
        for form in (tuple(osize), list(osize), torch.Size(osize),
                     tuple(x.shape[:-nd]) + tuple(o for o in osize)):
            xo = x.clone().requires_grad_(True)
            xr = x.clone().requires_grad_(True)
            yo = ours(xo, output_size=form)
            yr = ref(xr, output_size=form)
            assert tuple(yo.shape[-nd:]) == tuple(osize)
            assert_close(yo.detach(), yr.detach())
            g = torch.randn_like(yr)
            yo.backward(g)
            yr.backward(g)
            assert_close(xo.grad, xr.grad, what="grad_input")


@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_output_size_errors(nd):
    ours, ref = _pair("ct", nd, dict(in_channels=2, out_channels=3, kernel_size=3, stride=2))
    x = torch.randn((1, 2) + (4,) * nd)
    mn = ct_out_size(4, 3, 2, 0, 0, 1)
    bad = [
        (mn - 1,) * nd,  # too small
        (mn + 2,) * nd,  # too large (>= min + stride)
        (mn,) * (nd + 1),  # wrong number of entries
        (mn,) * (nd + 3),
    ]
    if nd > 1:
        bad.append((mn,) * (nd - 1))
    for osize in bad:
        expected = exc_of(lambda: ref(x, output_size=osize))
        assert isinstance(expected, ValueError), osize
        with pytest.raises(ValueError) as info:
            ours(x, output_size=osize)
        assert str(info.value)


def test_output_size_with_dilation_larger_than_stride():
    """torch accepts output_size only within [min, min + stride - 1] even when dilation > stride."""
    ours, ref = _pair("ct", 1, dict(in_channels=1, out_channels=1, kernel_size=3, stride=1, dilation=3),
                      dtype=torch.float64)
    x = torch.randn(1, 1, 4, dtype=torch.float64)
    mn = ct_out_size(4, 3, 1, 0, 0, 3)
    assert_close(ours(x, output_size=(mn,)).detach(), ref(x, output_size=(mn,)).detach())
    for osize in [(mn + 1,), (mn + 2,)]:
        expected = exc_of(lambda: ref(x, output_size=osize))
        got = exc_of(lambda: ours(x, output_size=osize))
        assert type(got) is type(expected)
    # output_padding up to max(stride, dilation) - 1 is still fine via the constructor
    ours2, ref2 = _pair("ct", 1, dict(in_channels=1, out_channels=1, kernel_size=3, stride=1, dilation=3,
                                      output_padding=2), dtype=torch.float64)
    assert_close(ours2(x).detach(), ref2(x).detach())


# ----------------------------------------------------------------------------------------------------------
# seed configurations
# ----------------------------------------------------------------------------------------------------------
def test_seed_ct2d_small_output_sizes(device):
    ours, ref = _pair("ct", 2, dict(in_channels=1, out_channels=1, kernel_size=3, stride=2, padding=1))
    ours.to(device)
    ref.to(device)
    x = randn((1, 1, 4, 4), torch.float32, device)
    y = ours(x)
    assert y.shape == (1, 1, 7, 7)
    assert_close(y.detach(), ref(x).detach())
    y8 = ours(x, output_size=(8, 8))
    assert y8.shape == (1, 1, 8, 8)
    assert_close(y8.detach(), ref(x, output_size=(8, 8)).detach())
    assert_close(ours(x, (8, 8)).detach(), y8.detach())  # output_size passed positionally
    assert_close(ours(x, [1, 1, 8, 8]).detach(), y8.detach())  # ... and with batch/channel dims
    assert_close(y8[..., :7, :7].detach(), y.detach())  # the extra row/col is bias only past the data
    ours_op, ref_op = _pair("ct", 2, dict(in_channels=1, out_channels=1, kernel_size=3, stride=2, padding=1,
                                          output_padding=1))
    ours_op.to(device)
    ref_op.to(device)
    y8b = ours_op(x)
    assert y8b.shape == (1, 1, 8, 8)
    assert_close(y8b.detach(), ref_op(x).detach())
    assert_close(y8b.detach(), y8.detach())
    # the same through the functional API
    import torch_convt.functional as TF
    assert TF.conv_transpose2d(x, ours.weight, ours.bias, stride=2, padding=1).shape == (1, 1, 7, 7)
    assert TF.conv_transpose2d(x, ours.weight, ours.bias, stride=2, padding=1,
                               output_padding=1).shape == (1, 1, 8, 8)


SEEDS = [
    ("k3_s2", dict(in_channels=16, out_channels=33, kernel_size=3, stride=2)),
    ("k352_s211_p042", dict(in_channels=16, out_channels=33, kernel_size=(3, 5, 2), stride=(2, 1, 1),
                            padding=(0, 4, 2))),
]


@pytest.mark.parametrize("name,kwargs", SEEDS, ids=[s[0] for s in SEEDS])
def test_seed_ct3d_large(name, kwargs, device):
    """The nn.ConvTranspose3d documentation examples on (1, 16, 10, 50, 100), float32, with one backward."""
    ref = nn.ConvTranspose3d(**kwargs)
    ours = torch_convt.ConvTranspose3d(**kwargs)
    ours.load_state_dict(ref.state_dict())
    ours.to(device)
    ref.to(device)
    x = randn((1, 16, 10, 50, 100), torch.float32, device)
    xo = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    yo = ours(xo)
    yr = ref(xr)
    expect_shape = (1, 33) + tuple(
        ct_out_size(i, k, s, p, 0, 1) for i, k, s, p in zip(
            (10, 50, 100), ref.kernel_size, ref.stride, ref.padding))
    assert tuple(yr.shape) == expect_shape
    assert_close(yo.detach(), yr.detach())
    _check_backward(ours, ref, xo, xr, yo, yr)


# ----------------------------------------------------------------------------------------------------------
# Conv modules: padding='same' / 'valid' and padding modes
# ----------------------------------------------------------------------------------------------------------
CONV_PAD_CASES = []
for _nd in DIMS:
    for _k, _d in [(3, 1), (4, 1), (2, 1), (3, 2), (4, 3), (2, 2)]:
        for _mode in ("zeros", "reflect", "replicate", "circular"):
            CONV_PAD_CASES.append(pytest.param(_nd, "same", _k, _d, 1, _mode,
                                               id=f"{_nd}d-same-k{_k}-d{_d}-{_mode}"))
    for _mode in ("zeros", "reflect", "replicate", "circular"):
        CONV_PAD_CASES.append(pytest.param(_nd, "valid", 3, 1, 2, _mode, id=f"{_nd}d-valid-s2-{_mode}"))
        CONV_PAD_CASES.append(pytest.param(_nd, (1, 2, 0)[:_nd], 3, 2, 2, _mode,
                                           id=f"{_nd}d-pad120-d2-s2-{_mode}"))
        CONV_PAD_CASES.append(pytest.param(_nd, 2, 2, 1, 1, _mode, id=f"{_nd}d-pad2-k2-{_mode}"))


@pytest.mark.parametrize("nd,padding,kernel,dilation,stride,mode", CONV_PAD_CASES)
def test_conv_module_padding(nd, padding, kernel, dilation, stride, mode, device):
    kwargs = dict(in_channels=2, out_channels=4, kernel_size=kernel, dilation=dilation, stride=stride,
                  padding=padding, padding_mode=mode, groups=2)
    ours, ref = _pair("conv", nd, kwargs, dtype=torch.float64)
    ours.to(device)
    ref.to(device)
    x = randn((2, 2) + (9, 8, 7)[:nd], torch.float64, device)
    xo = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    yo, yr = ours(xo), ref(xr)
    if padding == "same":
        assert tuple(yr.shape[2:]) == tuple(x.shape[2:])
    assert_close(yo.detach(), yr.detach())
    _check_backward(ours, ref, xo, xr, yo, yr)
    # unbatched
    assert_close(ours(x[1]).detach(), ref(x[1]).detach(), what="unbatched")


@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_conv_module_reflect_padding_too_large_errors_like_torch(nd, device):
    ours, ref = _pair("conv", nd, dict(in_channels=1, out_channels=1, kernel_size=3, padding=3,
                                       padding_mode="reflect"), device=device)
    x = randn((1, 1) + (3,) * nd, torch.float32, device)
    expected = exc_of(lambda: ref(x))
    assert expected is not None
    got = exc_of(lambda: ours(x))
    assert type(got) is type(expected), (got, expected)


# ----------------------------------------------------------------------------------------------------------
# convert()
# ----------------------------------------------------------------------------------------------------------
class UserConvT(nn.ConvTranspose2d):
    """A user subclass: convert() must leave it alone."""

    def forward(self, x, output_size=None):
        return super().forward(x, output_size) * 2


class TinyUNet3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU())
        self.down = nn.Conv3d(4, 8, 3, stride=2, padding=1)
        self.mid = nn.Sequential(nn.ReLU(), nn.Conv3d(8, 8, 3, padding="same", padding_mode="replicate"))
        self.up = nn.ConvTranspose3d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.dec = nn.ModuleList([nn.Conv3d(8, 4, 1), nn.BatchNorm3d(4)])
        self.head = nn.ConvTranspose3d(4, 2, (1, 3, 3), padding=(0, 1, 1), groups=2, bias=False)
        self.user = UserConvT(2, 2, 1)  # applied per depth slice in forward

    def forward(self, x):
        e = self.enc1(x)
        m = self.mid(self.down(e))
        u = self.up(m, output_size=e.shape[2:])
        d = self.dec[1](self.dec[0](torch.cat([u, e], 1)))
        h = self.head(torch.relu(d))
        n, c, dd, hh, ww = h.shape
        flat = h.permute(0, 2, 1, 3, 4).reshape(n * dd, c, hh, ww)
        return self.user(flat).reshape(n, dd, c, hh, ww).permute(0, 2, 1, 3, 4)


def _run_model(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.pow(2).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("include_conv", [False, True], ids=["ct_only", "include_conv"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_convert_unet(include_conv, training, device):
    torch.manual_seed(0)
    model = TinyUNet3d().double().to(device)
    model.train(training)
    reference = copy.deepcopy(model)
    params_before = {n: p for n, p in model.named_parameters()}
    buffers_before = {n: b for n, b in model.named_buffers()}
    modules_before = dict(model.named_modules())

    ret = torch_convt.convert(model, include_conv=include_conv)
    assert ret is model

    for name, mod in model.named_modules():
        before = modules_before[name]
        if type(before) in (nn.ConvTranspose3d,):
            assert type(mod) is torch_convt.ConvTranspose3d, name
        elif type(before) is nn.Conv3d:
            assert type(mod) is (torch_convt.Conv3d if include_conv else nn.Conv3d), name
        else:
            assert type(mod) is type(before), name
        assert mod.training == training, name
    assert type(model.user) is UserConvT and model.user is modules_before["user"]
    # the very same Parameter / buffer objects, same names, in the same order
    assert list(dict(model.named_parameters())) == list(params_before)
    for n, p in model.named_parameters():
        assert p is params_before[n], n
    for n, b in model.named_buffers():
        assert b is buffers_before[n], n
    # attributes preserved
    assert model.up.output_padding == (1, 1, 1) and model.head.groups == 2 and model.head.bias is None
    if include_conv:
        assert model.mid[1].padding == "same" and model.mid[1].padding_mode == "replicate"

    assert all(p.device.type == device for p in model.parameters())
    x = randn((2, 2, 4, 6, 5), torch.float64, device)
    y1, gx1, gp1 = _run_model(model, x)
    y2, gx2, gp2 = _run_model(reference, x)
    assert_close(y1, y2)
    assert_close(gx1, gx2, what="grad_input")
    for n in gp2:
        assert_close(gp1[n], gp2[n], what=f"grad_{n}")
    # optimizer built before convert still steps the live parameters
    assert model.up.weight is params_before["up.weight"]


@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_convert_root_module(nd, device):
    torch.manual_seed(0)
    m = torch_ct_module(nd)(2, 3, 3, stride=2).to(device)
    w, b = m.weight, m.bias
    out = torch_convt.convert(m)
    assert type(out) is ours_ct_module(nd)
    assert out.weight is w and out.bias is b
    assert out.stride == (2,) * nd
    x = randn((1, 2) + (4,) * nd, torch.float32, device)
    torch.testing.assert_close(out(x), torch_ct_module(nd).forward(out, x))
    c = torch_conv_module(nd)(2, 3, 3).to(device)
    assert torch_convt.convert(c) is c and type(c) is torch_conv_module(nd)  # include_conv=False
    c2 = torch_convt.convert(c, include_conv=True)
    assert type(c2) is ours_conv_module(nd) and c2.weight is c.weight
    xc = randn((1, 2) + (5,) * nd, torch.float32, device)
    torch.testing.assert_close(c2(xc), torch_conv_module(nd).forward(c2, xc))


def test_convert_keeps_dtype_device_and_is_idempotent(device):
    model = nn.Sequential(nn.ConvTranspose2d(2, 2, 3).to(torch.float64), nn.ConvTranspose1d(2, 2, 3).half(),
                          nn.Linear(3, 3)).to(device)
    model.eval()
    torch_convt.convert(model)
    assert model[0].weight.dtype == torch.float64 and model[1].weight.dtype == torch.float16
    assert model[0].weight.device.type == device and model[1].weight.device.type == device
    assert not model[0].training and not model[1].training
    y = model[0](randn((1, 2, 4, 4), torch.float64, device))
    assert y.dtype == torch.float64 and y.device.type == device
    again = torch_convt.convert(model, include_conv=True)
    assert again is model and type(model[0]) is torch_convt.ConvTranspose2d
    assert type(model[2]) is nn.Linear
    with pytest.raises(TypeError):
        torch_convt.convert(model, True)  # include_conv is keyword-only


def test_convert_leaves_user_subclasses_and_shared_modules():
    shared = nn.ConvTranspose2d(2, 2, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared, UserConvT(2, 2, 1))
    torch_convt.convert(model)
    assert type(model[0]) is torch_convt.ConvTranspose2d
    assert type(model[2]) is torch_convt.ConvTranspose2d
    assert model[0].weight is model[2].weight is shared.weight  # shared parameters stay shared
    assert type(model[3]) is UserConvT
    x = torch.randn(1, 2, 3, 3)
    assert model(x).shape == (1, 2, 7, 7)
