"""gradcheck / gradgradcheck (float64, tiny sizes) through the three raw ops, the functional API and the
modules; one complex128 gradcheck per op family. Every test runs on each device of the ``device`` fixture."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from helpers import (DIMS, Cfg, ours_conv, ours_conv_module, ours_ct, ours_ct_module, per_dim, randn)

# (name, nd, cfg) -- tiny sizes: gradgradcheck perturbs every element
CT_GRAD_CASES = [
    ("1d_g2_s2_p1_op1", 1, Cfg(n=2, cin=2, cout=4, groups=2, size=3, kernel=3, stride=2, padding=1,
                               output_padding=1)),
    ("1d_d2_op1_nobias", 1, Cfg(n=1, cin=2, cout=2, size=3, kernel=2, dilation=2, output_padding=1,
                                bias=False)),
    ("2d_asym", 2, Cfg(n=1, cin=1, cout=2, size=(2, 3), kernel=(2, 3), stride=(1, 2), padding=(0, 1),
                       output_padding=(1, 1), dilation=(2, 1))),
    ("2d_depthwise_s3", 2, Cfg(n=1, cin=2, cout=2, groups=2, size=2, kernel=2, stride=3, padding=1,
                               output_padding=2)),
    ("3d_g2_asym", 3, Cfg(n=1, cin=2, cout=2, groups=2, size=(2, 2, 2), kernel=(2, 1, 2), stride=(2, 1, 1),
                          padding=(1, 0, 0), output_padding=(1, 0, 1), dilation=(1, 1, 2))),
    ("3d_basic_nobias", 3, Cfg(n=1, cin=1, cout=2, size=2, kernel=2, bias=False)),
]

CONV_GRAD_CASES = [
    ("1d_g2_s2_p1", 1, Cfg(n=2, cin=2, cout=4, groups=2, size=5, kernel=3, stride=2, padding=1)),
    ("1d_d2_nobias", 1, Cfg(n=1, cin=2, cout=2, size=5, kernel=2, dilation=2, bias=False)),
    ("2d_asym", 2, Cfg(n=1, cin=1, cout=2, size=(4, 4), kernel=(2, 3), stride=(1, 2), padding=(0, 1),
                       dilation=(2, 1))),
    ("2d_depthwise_s3", 2, Cfg(n=1, cin=2, cout=2, groups=2, size=4, kernel=2, stride=3, padding=1)),
    ("3d_g2_asym", 3, Cfg(n=1, cin=2, cout=2, groups=2, size=(3, 2, 4), kernel=(2, 1, 2), stride=(2, 1, 1),
                          padding=(1, 0, 0), dilation=(1, 1, 2))),
    ("3d_basic_nobias", 3, Cfg(n=1, cin=1, cout=2, size=3, kernel=2, bias=False)),
]

# gradcheck uses the exact (slow-mode) Jacobian comparison; gradgradcheck uses fast mode (random
# projections of the Jacobian) to keep the suite fast.
GG = dict(fast_mode=True)


def _lists(cfg, nd, with_op):
    s = list(per_dim(cfg.stride, nd))
    p = list(per_dim(cfg.padding, nd))
    d = list(per_dim(cfg.dilation, nd))
    if with_op:
        return s, p, list(per_dim(cfg.output_padding, nd)), d
    return s, p, d


def _req(*ts):
    return tuple(t.requires_grad_(True) if t is not None else None for t in ts)


# ----------------------------------------------------------------------------------------------------------
# raw ops
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,nd,cfg", CT_GRAD_CASES, ids=[c[0] for c in CT_GRAD_CASES])
def test_gradcheck_op_conv_transpose(name, nd, cfg, device):
    x, w, b = _req(*cfg.ct_tensors(nd, device=device))
    s, p, op, d = _lists(cfg, nd, True)
    f = torch.ops.torch_convt.conv_transpose

    def fn(x, w, *b):
        return f(x, w, b[0] if b else None, s, p, op, d, cfg.groups)

    inputs = (x, w) + ((b,) if b is not None else ())
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs, **GG)


@pytest.mark.parametrize("name,nd,cfg", CONV_GRAD_CASES, ids=[c[0] for c in CONV_GRAD_CASES])
def test_gradcheck_op_conv(name, nd, cfg, device):
    x, w, b = _req(*cfg.conv_tensors(nd, device=device))
    s, p, d = _lists(cfg, nd, False)
    f = torch.ops.torch_convt.conv

    def fn(x, w, *b):
        return f(x, w, b[0] if b else None, s, p, d, cfg.groups)

    inputs = (x, w) + ((b,) if b is not None else ())
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs, **GG)


@pytest.mark.parametrize("name,nd,cfg", CONV_GRAD_CASES, ids=[c[0] for c in CONV_GRAD_CASES])
def test_gradcheck_op_conv_weight_grad(name, nd, cfg, device):
    x, w, _ = cfg.conv_tensors(nd, device=device)
    s, p, d = _lists(cfg, nd, False)
    out = getattr(torch.nn.functional, f"conv{nd}d")(x, w, None, s, p, d, cfg.groups)
    gy = torch.randn_like(out)
    x.requires_grad_(True)
    gy.requires_grad_(True)
    f = torch.ops.torch_convt.conv_weight_grad

    def fn(x, gy):
        return f(x, gy, list(w.shape), s, p, d, cfg.groups)

    assert gradcheck(fn, (x, gy))
    assert gradgradcheck(fn, (x, gy), **GG)


# ----------------------------------------------------------------------------------------------------------
# functional API (padding='same' goes through an extra asymmetric-pad path)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_gradcheck_functional_conv_same_even_kernel(nd, device):
    cfg = Cfg(n=1, cin=2, cout=2, size=(4, 3, 3), kernel=(2, 4, 2), dilation=(3, 1, 1), padding="same")
    x, w, b = _req(*cfg.conv_tensors(nd, device=device))
    kw = cfg.conv_kwargs(nd)
    fn = lambda x, w, b: ours_conv(nd)(x, w, b, **kw)  # noqa: E731
    assert gradcheck(fn, (x, w, b))
    assert gradgradcheck(fn, (x, w, b), **GG)


@pytest.mark.parametrize("kind", ["ct", "conv"])
def test_gradcheck_functional_unbatched(kind, device):
    nd = 2
    if kind == "ct":
        cfg = CT_GRAD_CASES[2][2]
        x, w, b = _req(*cfg.ct_tensors(nd, device=device))
        fn = lambda x, w, b: ours_ct(nd)(x, w, b, **cfg.ct_kwargs(nd))  # noqa: E731
    else:
        cfg = CONV_GRAD_CASES[2][2]
        x, w, b = _req(*cfg.conv_tensors(nd, device=device))
        fn = lambda x, w, b: ours_conv(nd)(x, w, b, **cfg.conv_kwargs(nd))  # noqa: E731
    x0 = x.detach()[0].requires_grad_(True)
    assert gradcheck(fn, (x0, w, b))
    assert gradgradcheck(fn, (x0, w, b), **GG)


# ----------------------------------------------------------------------------------------------------------
# complex128
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ct", "conv"])
def test_gradcheck_complex128(kind, device):
    nd = 2
    if kind == "ct":
        cfg = CT_GRAD_CASES[3][2]
        x, w, b = _req(*cfg.ct_tensors(nd, torch.complex128, device=device))
        fn = lambda x, w, b: ours_ct(nd)(x, w, b, **cfg.ct_kwargs(nd))  # noqa: E731
    else:
        cfg = CONV_GRAD_CASES[3][2]
        x, w, b = _req(*cfg.conv_tensors(nd, torch.complex128, device=device))
        fn = lambda x, w, b: ours_conv(nd)(x, w, b, **cfg.conv_kwargs(nd))  # noqa: E731
    assert gradcheck(fn, (x, w, b))
    assert gradgradcheck(fn, (x, w, b), **GG)


def test_gradcheck_complex128_raw_ops(device):
    cfg = CT_GRAD_CASES[0][2]
    x, w, b = _req(*cfg.ct_tensors(1, torch.complex128, device=device))
    s, p, op, d = _lists(cfg, 1, True)
    fn = lambda x, w, b: torch.ops.torch_convt.conv_transpose(x, w, b, s, p, op, d, cfg.groups)  # noqa
    assert gradcheck(fn, (x, w, b))
    ccfg = CONV_GRAD_CASES[0][2]
    x, w, b = _req(*ccfg.conv_tensors(1, torch.complex128, device=device))
    s, p, d = _lists(ccfg, 1, False)
    fn = lambda x, w, b: torch.ops.torch_convt.conv(x, w, b, s, p, d, ccfg.groups)  # noqa
    assert gradcheck(fn, (x, w, b))
    gy = randn(fn(x, w, b).shape, torch.complex128, device, requires_grad=True)
    fn = lambda x, gy: torch.ops.torch_convt.conv_weight_grad(x, gy, list(w.shape), s, p, d, ccfg.groups)  # noqa
    assert gradcheck(fn, (x, gy))


# ----------------------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------------------
MODULE_CASES = [
    # (id, kind, nd, ctor kwargs, input shape)
    ("ct1d_g2_s2_op1", "ct", 1, dict(in_channels=2, out_channels=2, kernel_size=3, stride=2, padding=1,
                                     output_padding=1, groups=2), (2, 2, 3)),
    ("ct1d_d3_op2", "ct", 1, dict(in_channels=1, out_channels=2, kernel_size=2, dilation=3,
                                  output_padding=2, bias=False), (1, 1, 3)),
    ("ct2d_asym", "ct", 2, dict(in_channels=1, out_channels=2, kernel_size=(2, 3), stride=(2, 1),
                                padding=(1, 0), output_padding=(1, 0), dilation=(1, 2)), (1, 1, 3, 2)),
    ("ct2d_depthwise", "ct", 2, dict(in_channels=2, out_channels=2, kernel_size=2, groups=2, stride=3),
     (1, 2, 2, 2)),
    ("ct3d_g2", "ct", 3, dict(in_channels=2, out_channels=2, kernel_size=2, stride=(1, 2, 1), groups=2,
                              output_padding=(0, 1, 0)), (1, 2, 2, 2, 2)),
    ("ct3d_dil", "ct", 3, dict(in_channels=1, out_channels=1, kernel_size=(1, 2, 2), dilation=(1, 2, 1),
                               padding=(0, 1, 0)), (1, 1, 2, 3, 2)),
    ("conv1d_g2_s2", "conv", 1, dict(in_channels=2, out_channels=2, kernel_size=3, stride=2, padding=1,
                                     groups=2), (2, 2, 5)),
    ("conv1d_same_reflect", "conv", 1, dict(in_channels=2, out_channels=2, kernel_size=4, padding="same",
                                            padding_mode="reflect"), (1, 2, 5)),
    ("conv2d_asym_circular", "conv", 2, dict(in_channels=1, out_channels=2, kernel_size=(2, 3), stride=(2, 1),
                                             padding=(1, 1), dilation=(1, 2), padding_mode="circular"),
     (1, 1, 3, 4)),
    ("conv2d_replicate_dw", "conv", 2, dict(in_channels=2, out_channels=2, kernel_size=2, groups=2,
                                            padding=1, padding_mode="replicate"), (1, 2, 3, 3)),
    ("conv3d_g2_same", "conv", 3, dict(in_channels=2, out_channels=2, kernel_size=2, groups=2,
                                       padding="same"), (1, 2, 2, 3, 2)),
    ("conv3d_s2_valid", "conv", 3, dict(in_channels=1, out_channels=2, kernel_size=2, stride=2,
                                        padding="valid", bias=False), (1, 1, 3, 3, 4)),
]


@pytest.mark.parametrize("case_id,kind,nd,kwargs,shape", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_gradcheck_modules(case_id, kind, nd, kwargs, shape, device):
    cls = ours_ct_module(nd) if kind == "ct" else ours_conv_module(nd)
    m = cls(**kwargs, dtype=torch.float64).to(device)  # (initialized on the CPU generator on every device)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in m.named_parameters()}
    names = list(params)
    x = randn(shape, torch.float64, device, requires_grad=True)

    def fn(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    inputs = (x,) + tuple(params[n] for n in names)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs, **GG)


def test_gradcheck_module_output_size(device):
    m = ours_ct_module(2)(2, 2, 3, stride=3, padding=1, dtype=torch.float64).to(device)
    x = randn((1, 2, 2, 2), torch.float64, device, requires_grad=True)

    def fn(x, w, b):
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,), {"output_size": (6, 5)})

    w = m.weight.detach().clone().requires_grad_(True)
    b = m.bias.detach().clone().requires_grad_(True)
    assert fn(x, w, b).shape == (1, 2, 6, 5)
    assert gradcheck(fn, (x, w, b))
    assert gradgradcheck(fn, (x, w, b), **GG)


@pytest.mark.parametrize("kind", ["ct", "conv"])
def test_double_backward_matches_torch(kind, device):
    """Second-order gradients (grad of a function of the first-order grads) equal torch's."""
    nd = 2
    if kind == "ct":
        cfg = CT_GRAD_CASES[2][2]
        args = cfg.ct_tensors(nd, device=device)
        kw = cfg.ct_kwargs(nd)
        ours, ref = ours_ct(nd), torch.nn.functional.conv_transpose2d
    else:
        cfg = CONV_GRAD_CASES[2][2]
        args = cfg.conv_tensors(nd, device=device)
        kw = cfg.conv_kwargs(nd)
        ours, ref = ours_conv(nd), torch.nn.functional.conv2d

    def second_order(f):
        x, w, b = (a.detach().clone().requires_grad_(True) for a in args)
        y = f(x, w, b, **kw)
        gx, gw = torch.autograd.grad((y ** 2).sum(), (x, w), create_graph=True)
        loss = (gx.sin()).sum() + (gw ** 3).sum()
        return torch.autograd.grad(loss, (x, w, b))

    for got, want in zip(second_order(ours), second_order(ref)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("kind", ["ct", "conv"])
def test_autograd_graph_features(kind, device):
    """What training code relies on around the recorded node (a C++ node for plain calls; ops.py's autograd.Function
    under forward-mode AD): saved-tensor hooks see the saved tensors, non-reentrant checkpointing, anomaly mode,
    tensor hooks and retain_graph give torch's gradients."""
    import torch.utils.checkpoint as cp
    nd = 2
    cfg = (CT_GRAD_CASES if kind == "ct" else CONV_GRAD_CASES)[2][2]
    args = cfg.ct_tensors(nd, device=device) if kind == "ct" else cfg.conv_tensors(nd, device=device)
    kw = cfg.kwargs(kind, nd)
    ours, ref = (ours_ct(nd), torch.nn.functional.conv_transpose2d) if kind == "ct" else \
        (ours_conv(nd), torch.nn.functional.conv2d)

    def grads(f, how):
        x, w, b = (a.detach().clone().requires_grad_(True) for a in args)
        packed = []
        if how == "saved_tensor_hooks":
            def pack(t):
                packed.append(t)
                return t.clone()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = f(x, w, b, **kw)
            assert len(packed) >= 2, "the node's saved tensors did not go through the hooks"
        elif how == "checkpoint":
            y = cp.checkpoint(lambda *t: f(*t, **kw).sin(), x, w, b, use_reentrant=False)
        elif how == "anomaly":
            with torch.autograd.detect_anomaly(check_nan=True):
                y = f(x, w, b, **kw)
                y.sin().sum().backward()
            return x.grad, w.grad, b.grad
        elif how == "forward_ad":
            with torch.autograd.forward_ad.dual_level():
                y = f(x, w, b, **kw)
        else:
            y = f(x, w, b, **kw)
        if f is ours and how in ("plain", "forward_ad"):  # (the node each path records; the C++ one is cheaper)
            assert (type(y.grad_fn).__name__ == "CppFunction") == (how == "plain"), type(y.grad_fn)
        if how == "hook":
            y.register_hook(lambda g: 2 * g)
        loss = y.sin().sum() if how != "checkpoint" else y.sum()
        if how == "retain_graph":
            loss.backward(retain_graph=True)
        loss.backward()
        return x.grad, w.grad, b.grad

    for how in ["plain", "saved_tensor_hooks", "checkpoint", "anomaly", "forward_ad", "hook", "retain_graph"]:
        for got, want in zip(grads(ours, how), grads(ref, how)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"{kind}, {how}")
