"""Property-based parity (hypothesis, derandomized): random valid configurations, float64 forward and all
gradients equal torch's (on each device of helpers.DEVICES: an explicit parametrization, since hypothesis does not
mix with function-scoped fixtures); plus algebraic identities that must hold for ours alone (CPU)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import (DEVICES, check_parity, conv_out_size, ct_out_size, ct_valid, conv_valid, make_tensor,
                     ours_conv, ours_ct, torch_conv, torch_ct)

MAX_EXAMPLES = 200


@st.composite
def conv_configs(draw, transpose: bool):
    nd = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    n = draw(st.integers(0, 2))
    # keep the total volume small in 3d
    max_size = {1: 8, 2: 6, 3: 4}[nd]
    size = tuple(draw(st.integers(1, max_size)) for _ in range(nd))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    padding = tuple(draw(st.integers(0, 3)) for _ in range(nd))
    if transpose:
        output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
        ok = ct_valid(size, kernel, stride, padding, output_padding, dilation)
    else:
        output_padding = (0,) * nd
        ok = conv_valid(size, kernel, stride, padding, dilation)
    if not ok:
        # repair instead of filtering: enlarge the input until the output is non-empty
        size = tuple(max(i, d * (k - 1) + 1) for i, k, d in zip(size, kernel, dilation))
        padding = tuple(min(p, (d * (k - 1) + (i - 1) * s + op) // 2)
                        for p, k, d, i, s, op in zip(padding, kernel, dilation, size, stride, output_padding))
    if transpose:
        assert ct_valid(size, kernel, stride, padding, output_padding, dilation)
    else:
        assert conv_valid(size, kernel, stride, padding, dilation)
    bias = draw(st.booleans())
    scalar_args = draw(st.booleans())  # pass ints instead of tuples when all dims agree
    return dict(nd=nd, n=n, cin=cin, cout=cout, groups=groups, size=size, kernel=kernel, stride=stride,
                dilation=dilation, padding=padding, output_padding=output_padding, bias=bias,
                scalar_args=scalar_args)


def _maybe_scalar(t, scalar):
    return t[0] if scalar and len(set(t)) == 1 else t


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=MAX_EXAMPLES)
@given(cfg=conv_configs(transpose=True))
def test_conv_transpose_matches_torch(device, cfg):
    nd = cfg["nd"]
    x = make_tensor((cfg["n"], cfg["cin"]) + cfg["size"], device=device)
    w = make_tensor((cfg["cin"], cfg["cout"] // cfg["groups"]) + cfg["kernel"], device=device)
    b = make_tensor((cfg["cout"],), device=device) if cfg["bias"] else None
    sc = cfg["scalar_args"]
    kwargs = dict(stride=_maybe_scalar(cfg["stride"], sc), padding=_maybe_scalar(cfg["padding"], sc),
                  output_padding=_maybe_scalar(cfg["output_padding"], sc), groups=cfg["groups"],
                  dilation=_maybe_scalar(cfg["dilation"], sc))
    out = check_parity(ours_ct(nd), torch_ct(nd), (x, w, b), kwargs)
    expected = tuple(ct_out_size(*v) for v in zip(cfg["size"], cfg["kernel"], cfg["stride"], cfg["padding"],
                                                  cfg["output_padding"], cfg["dilation"]))
    assert tuple(out.shape) == (cfg["n"], cfg["cout"]) + expected


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=MAX_EXAMPLES)
@given(cfg=conv_configs(transpose=False))
def test_conv_matches_torch(device, cfg):
    nd = cfg["nd"]
    x = make_tensor((cfg["n"], cfg["cin"]) + cfg["size"], device=device)
    w = make_tensor((cfg["cout"], cfg["cin"] // cfg["groups"]) + cfg["kernel"], device=device)
    b = make_tensor((cfg["cout"],), device=device) if cfg["bias"] else None
    sc = cfg["scalar_args"]
    kwargs = dict(stride=_maybe_scalar(cfg["stride"], sc), padding=_maybe_scalar(cfg["padding"], sc),
                  dilation=_maybe_scalar(cfg["dilation"], sc), groups=cfg["groups"])
    out = check_parity(ours_conv(nd), torch_conv(nd), (x, w, b), kwargs)
    expected = tuple(conv_out_size(*v) for v in zip(cfg["size"], cfg["kernel"], cfg["stride"], cfg["padding"],
                                                    cfg["dilation"]))
    assert tuple(out.shape) == (cfg["n"], cfg["cout"]) + expected


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60)
@given(cfg=conv_configs(transpose=False), same=st.booleans())
def test_conv_string_padding_matches_torch(device, cfg, same):
    """padding='same' (stride 1) / 'valid' on random kernels and dilations."""
    nd = cfg["nd"]
    stride = (1,) * nd if same else cfg["stride"]
    size = tuple(max(i, d * (k - 1) + 1) for i, k, d in zip(cfg["size"], cfg["kernel"], cfg["dilation"]))
    x = make_tensor((max(cfg["n"], 1), cfg["cin"]) + size, device=device)
    w = make_tensor((cfg["cout"], cfg["cin"] // cfg["groups"]) + cfg["kernel"], device=device)
    b = make_tensor((cfg["cout"],), device=device) if cfg["bias"] else None
    kwargs = dict(stride=stride, padding="same" if same else "valid", dilation=cfg["dilation"],
                  groups=cfg["groups"])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = check_parity(ours_conv(nd), torch_conv(nd), (x, w, b), kwargs)
    if same:
        assert tuple(out.shape[2:]) == size


@settings(max_examples=60)
@given(cfg=conv_configs(transpose=True))
def test_adjointness_conv_and_conv_transpose(cfg):
    """<conv_transpose(y, w), x> == <y, conv(x, w)> whenever the conv of the big tensor has y's size: the two ops
    of ours are exact adjoints (checked without torch)."""
    nd = cfg["nd"]
    n = max(cfg["n"], 1)
    y = make_tensor((n, cfg["cin"]) + cfg["size"])
    w = make_tensor((cfg["cin"], cfg["cout"] // cfg["groups"]) + cfg["kernel"])
    kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])
    big = ours_ct(nd)(y, w, None, output_padding=cfg["output_padding"], **kw)
    x = make_tensor(big.shape)
    small = ours_conv(nd)(x, w, None, **kw)
    # conv of the big tensor can be longer than y when output_padding >= stride; the extra positions only
    # see output padding and do not take part in the pairing.
    small = small[(slice(None), slice(None)) + tuple(slice(0, s) for s in cfg["size"])]
    assert small.shape == y.shape
    lhs = (big * x).sum()
    rhs = (y * small).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


@settings(max_examples=40)
@given(cfg=conv_configs(transpose=True), k=st.integers(1, 2))
def test_groups_equal_concatenation_of_groups(cfg, k):
    """A grouped conv_transpose equals the concatenation of per-group ungrouped ones."""
    nd = cfg["nd"]
    g = cfg["groups"]
    n = max(cfg["n"], 1)
    x = make_tensor((n, cfg["cin"]) + cfg["size"])
    w = make_tensor((cfg["cin"], cfg["cout"] // g) + cfg["kernel"])
    kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"],
              output_padding=cfg["output_padding"])
    full = ours_ct(nd)(x, w, None, groups=g, **kw)
    ci, co = cfg["cin"] // g, cfg["cout"] // g
    parts = [ours_ct(nd)(x[:, i * ci:(i + 1) * ci], w[i * ci:(i + 1) * ci], None, **kw) for i in range(g)]
    torch.testing.assert_close(full, torch.cat(parts, 1), rtol=1e-12, atol=1e-12)
    assert full.shape[1] == co * g


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_linearity_and_batch_independence(nd):
    torch.manual_seed(nd)
    x1 = make_tensor((3, 4) + (4,) * nd)
    x2 = make_tensor((3, 4) + (4,) * nd)
    w = make_tensor((4, 3) + (3,) * nd)
    f = lambda x: ours_ct(nd)(x, w, None, stride=2, padding=1, output_padding=1, groups=2)  # noqa: E731
    torch.testing.assert_close(f(2.0 * x1 - 3.0 * x2), 2.0 * f(x1) - 3.0 * f(x2), rtol=1e-12, atol=1e-12)
    full = f(x1)
    for i in range(3):
        torch.testing.assert_close(f(x1[i:i + 1]), full[i:i + 1], rtol=1e-12, atol=1e-12)
