"""Parity of torch_convt.functional with torch.nn.functional: forward and all three gradients.

Grids cover dims 1/2/3, stride, padding, output_padding, dilation, groups (incl. depthwise), bias / no bias,
asymmetric per-dim values, all supported dtypes, memory layouts, batch 0 and unbatched inputs.

Device-generic tests take the ``device`` fixture (conftest.py): the reference is torch.nn.functional on the same
device. Integer dtypes are CPU-only (CUDA has no integer convolutions; see test_errors.py for the CUDA error
types); the thread-count determinism test is CPU-only (test_cuda.py checks CUDA determinism).
"""
import threading

import pytest
import torch
import torch_convt

from helpers import (DIMS, Cfg, channels_last, check_parity, ct_out_size, exc_of, fn_pair, ours_conv, ours_ct,
                     LOW_PRECISION, randn, reversed_layout, strided_view, torch_conv, torch_ct)

# ----------------------------------------------------------------------------------------------------------
# configuration grids (tuple values are per-dim for 3 dims and truncated for lower dims)
# ----------------------------------------------------------------------------------------------------------
CT_VARIANTS = {
    "basic": Cfg(),
    "k1": Cfg(kernel=1),
    "k2_even": Cfg(kernel=2),
    "s2": Cfg(stride=2),
    "s2_p1_op1": Cfg(stride=2, padding=1, output_padding=1),
    "s3_p2_op2_k4": Cfg(stride=3, padding=2, output_padding=2, kernel=4, size=4),
    "d2_op1": Cfg(dilation=2, output_padding=1),
    "d3_s2_p3_op2": Cfg(dilation=3, stride=2, padding=3, output_padding=2, size=4),
    "g2": Cfg(groups=2, cin=4, cout=6),
    "depthwise": Cfg(groups=3, cin=3, cout=3),
    "depthwise_mult2": Cfg(groups=3, cin=3, cout=6),
    "g2_s2_d2_p1_op1": Cfg(groups=2, cin=4, cout=4, stride=2, dilation=2, padding=1, output_padding=1, size=4),
    "kernel_gt_input": Cfg(size=2, kernel=4, stride=2),
    "padding_big": Cfg(size=4, kernel=3, stride=2, padding=2),
    "size1": Cfg(size=1, kernel=3, stride=2),
    "asym": Cfg(size=(5, 4, 3), kernel=(2, 3, 4), stride=(1, 2, 3), padding=(0, 1, 2), dilation=(2, 1, 3),
                output_padding=(1, 0, 2)),
    "asym2": Cfg(size=(3, 6, 4), kernel=(3, 1, 2), stride=(2, 3, 1), padding=(1, 0, 0), dilation=(1, 2, 2),
                 output_padding=(0, 1, 1)),
    "c1": Cfg(n=1, cin=1, cout=1),
    "many_channels_g2": Cfg(n=3, cin=6, cout=4, groups=2, size=4, stride=2),
    # strides larger than the dilated kernel: output positions no tap reaches hold the bias alone
    "s3_k1_holes": Cfg(stride=3, kernel=1, size=4),
    "s2_k1_op1": Cfg(stride=2, kernel=1, output_padding=1, size=4),
    "size1_s5_k2_op3": Cfg(size=1, stride=5, kernel=2, output_padding=3),
    "s4_k2_d3_p1_op2": Cfg(stride=4, kernel=2, dilation=3, padding=1, output_padding=2, size=3),
    "s2_d2_phase_gap": Cfg(stride=2, dilation=2, kernel=3, padding=1, output_padding=1, size=4),
}

CONV_VARIANTS = {
    "basic": Cfg(),
    "k1": Cfg(kernel=1),
    "k2_even": Cfg(kernel=2),
    "s2": Cfg(stride=2, size=6),
    "s3_p2": Cfg(stride=3, padding=2, size=7),
    "p1": Cfg(padding=1),
    "p3_gt_kernel": Cfg(padding=3, kernel=2, size=3),
    "d2": Cfg(dilation=2),
    "d3_p2": Cfg(dilation=3, padding=2, size=6),
    "g2": Cfg(groups=2, cin=4, cout=6),
    "depthwise": Cfg(groups=3, cin=3, cout=3),
    "depthwise_mult2": Cfg(groups=3, cin=3, cout=6),
    "g2_s2_d2_p1": Cfg(groups=2, cin=4, cout=4, stride=2, dilation=2, padding=1, size=6),
    "kernel_eq_input": Cfg(size=3, kernel=3),
    "asym": Cfg(size=(7, 6, 9), kernel=(2, 3, 4), stride=(1, 2, 3), padding=(0, 1, 2), dilation=(2, 1, 2)),
    "asym2": Cfg(size=(6, 5, 4), kernel=(3, 1, 2), stride=(2, 3, 1), padding=(1, 0, 0), dilation=(1, 2, 3)),
    "same": Cfg(padding="same"),
    "same_even_k4": Cfg(padding="same", kernel=4),
    "same_dil2": Cfg(padding="same", dilation=2),
    "same_asym_even": Cfg(padding="same", kernel=(2, 4, 3), dilation=(3, 1, 2), size=(5, 6, 4)),
    "same_g2": Cfg(padding="same", groups=2, kernel=2),
    "valid": Cfg(padding="valid"),
    "valid_s2": Cfg(padding="valid", stride=2, size=6),
    "c1": Cfg(n=1, cin=1, cout=1),
    "many_channels_g2": Cfg(n=3, cin=6, cout=4, groups=2, size=4),
}

CT_DTYPE_SUBSET = ["basic", "s2_p1_op1", "g2_s2_d2_p1_op1", "asym", "depthwise"]
CONV_DTYPE_SUBSET = ["basic", "s3_p2", "g2_s2_d2_p1", "asym", "same_asym_even", "depthwise"]


def _variants(kind):
    return CT_VARIANTS if kind == "ct" else CONV_VARIANTS


def _run(kind, nd, cfg, dtype=torch.float64, *, grad=True, small_int=False, ref_dtype=None, transform=None,
         device="cpu"):
    ours, ref = fn_pair(kind, nd)
    x, w, b = cfg.tensors(kind, nd, dtype, small_int=small_int, device=device)
    if transform is not None:
        x, w, b = transform(x, w, b)
    return check_parity(ours, ref, (x, w, b), cfg.kwargs(kind, nd), grad=grad, ref_dtype=ref_dtype)


# ----------------------------------------------------------------------------------------------------------
# float64 grid: forward + grads
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("variant", list(CT_VARIANTS), ids=list(CT_VARIANTS))
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_conv_transpose_float64(nd, variant, bias, device):
    cfg = CT_VARIANTS[variant].replace(bias=bias)
    out = _run("ct", nd, cfg, device=device)
    assert tuple(out.shape) == cfg.ct_out_shape(nd)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("variant", list(CONV_VARIANTS), ids=list(CONV_VARIANTS))
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_conv_float64(nd, variant, bias, device):
    _run("conv", nd, CONV_VARIANTS[variant].replace(bias=bias), device=device)


# ----------------------------------------------------------------------------------------------------------
# other dtypes
# ----------------------------------------------------------------------------------------------------------
def _dtype_cases():
    out = []
    for kind, subset in (("ct", CT_DTYPE_SUBSET), ("conv", CONV_DTYPE_SUBSET)):
        for nd in DIMS:
            for v in subset:
                out.append(pytest.param(kind, nd, v, id=f"{kind}-{nd}d-{v}"))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64, torch.complex128],
                         ids=["float32", "complex64", "complex128"])
@pytest.mark.parametrize("kind,nd,variant", _dtype_cases())
def test_dtype_float_complex(kind, nd, variant, dtype, device):
    _run(kind, nd, _variants(kind)[variant], dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex128], ids=["float32", "complex128"])
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_dtype_conv_same_padding(nd, dtype, device):
    _run("conv", nd, CONV_VARIANTS["same_asym_even"], dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["ct", "conv"])
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
@pytest.mark.parametrize("variant", ["basic", "asym"])
def test_dtype_low_precision(variant, nd, kind, dtype, device):
    """bfloat16 / float16: compared with torch computed in float32 from the same (exactly representable)
    inputs, then cast."""
    _run(kind, nd, _variants(kind)[variant], dtype, ref_dtype=torch.float32, device=device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["ct", "conv"])
def test_dtype_low_precision_grouped(kind, dtype, device):
    variant = "g2_s2_d2_p1_op1" if kind == "ct" else "g2_s2_d2_p1"
    _run(kind, 2, _variants(kind)[variant], dtype, ref_dtype=torch.float32, device=device)


@pytest.mark.parametrize("kind,nd,variant", _dtype_cases())
def test_dtype_int64(kind, nd, variant):
    out = _run(kind, nd, _variants(kind)[variant], torch.int64, grad=False)
    assert out.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8],
                         ids=["int32", "int16", "int8", "uint8"])
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
@pytest.mark.parametrize("variant", ["basic", "g2_s2_d2_p1", "asym", "same"])
def test_dtype_conv_small_ints(variant, nd, dtype):
    """int32/int16/int8/uint8 conv (values small enough never to overflow). torch itself does not
    implement every path for these types (e.g. dilated int32 conv), so the reference is torch's int64
    result cast back. Where torch raises NotImplementedError for the dtype, ours may do the same."""
    cfg = CONV_VARIANTS[variant]
    x, w, b = cfg.conv_tensors(nd, dtype)
    try:
        torch_conv(nd)(x, w, b, **cfg.conv_kwargs(nd))
    except NotImplementedError:
        try:
            ours_conv(nd)(x, w, b, **cfg.conv_kwargs(nd))
        except NotImplementedError as e:
            assert str(e)
            return
    out = _run("conv", nd, cfg, dtype, grad=False, ref_dtype=torch.int64)
    assert out.dtype == dtype


@pytest.mark.parametrize("kind", ["ct", "conv"])
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_float_with_integer_values_exact(nd, kind, device):
    """Small integer values in float64: every product and sum is exact, so results must be identical."""
    variant = "asym"
    out = _run(kind, nd, _variants(kind)[variant], torch.float64, small_int=True, grad=False, device=device)
    ours, ref = fn_pair(kind, nd)
    cfg = _variants(kind)[variant]
    x, w, b = cfg.tensors(kind, nd, torch.int64, device=device)
    # the exact reference is torch on the CPU (cuDNN may pick a transform-based algorithm that is not exact)
    expected = ref(x.double().cpu(), w.double().cpu(), b.double().cpu(), **cfg.kwargs(kind, nd))
    got = ours(x.double(), w.double(), b.double(), **cfg.kwargs(kind, nd))
    assert got.device == x.device
    assert torch.equal(got.cpu(), expected)
    assert out.dtype == torch.float64


# ----------------------------------------------------------------------------------------------------------
# memory layouts
# ----------------------------------------------------------------------------------------------------------
def _channel_slice(x):
    big = torch.zeros((x.shape[0], 2 * x.shape[1]) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    big[:, 1::2] = x
    return big[:, 1::2]


LAYOUTS = {
    "x_strided": lambda x, w, b: (strided_view(x), w, b),
    "x_reversed": lambda x, w, b: (reversed_layout(x), w, b),
    "x_channels_last": lambda x, w, b: (channels_last(x), w, b),
    "w_channels_last": lambda x, w, b: (x, channels_last(w), b),
    "all_channels_last": lambda x, w, b: (channels_last(x), channels_last(w), b),
    "w_strided": lambda x, w, b: (x, strided_view(w), b),
    "w_reversed": lambda x, w, b: (x, reversed_layout(w), b),
    "w_transposed_view": lambda x, w, b: (x, w.transpose(0, 1).contiguous().transpose(0, 1), b),
    "bias_strided": lambda x, w, b: (x, w, strided_view(b)),
    "all_strided": lambda x, w, b: (strided_view(x), strided_view(w), strided_view(b)),
    "x_batch_expanded": lambda x, w, b: (x[:1].expand_as(x), w, b),
    "x_channel_slice": lambda x, w, b: (_channel_slice(x), w, b),
    "x_offset_view": lambda x, w, b: (torch.cat([torch.zeros_like(x[:1]), x])[1:], w, b),
}


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("kind", ["ct", "conv"])
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_layouts(nd, kind, layout, device):
    variant = "g2_s2_d2_p1_op1" if kind == "ct" else "g2_s2_d2_p1"
    x, w, b = _variants(kind)[variant].tensors(kind, nd, device=device)
    x2, w2, b2 = LAYOUTS[layout](x, w, b)
    if layout != "x_batch_expanded":  # (that one deliberately repeats sample 0)
        assert torch.equal(x2, x) and torch.equal(w2, w) and torch.equal(b2, b)
    ours, ref = fn_pair(kind, nd)
    check_parity(ours, ref, (x2, w2, b2), _variants(kind)[variant].kwargs(kind, nd))


# Transposed layers whose phases gather their windows of the input together (one frame pad for all) where that
# is exact, and geometries where a shared pad would read wrong points past a frame row's end (must not share).
SHARED_WINDOWS = [
    # (input shape, weight shape, stride, padding, output_padding, dilation, groups)
    ((2, 8, 6, 5, 7), (8, 8, 4, 4, 4), 2, 1, 0, 1, 1),         # k4 s2 p1 3d: eight phases, one pad
    ((2, 16, 9, 11), (16, 12, 4, 4), 2, 1, 0, 1, 1),           # 2d, odd sizes
    ((2, 16, 9, 11), (16, 12, 4, 4), 2, 1, 1, 1, 1),           # output_padding: phase grids differ
    ((1, 8, 7, 13), (8, 8, 6, 6), 3, 2, 1, 1, 1),              # k6 s3
    ((2, 8, 4, 1, 9), (8, 8, 5, 2, 5), (3, 3, 4), (0, 0, 5), (0, 1, 1), (1, 3, 3), 1),
    ((2, 16, 12, 11), (16, 1, 3, 3), (1, 4), (3, 2), (1, 0), (3, 3), 1),
    ((1, 4, 1, 11), (4, 8, 4, 4), (4, 1), (5, 0), (3, 0), (3, 1), 1),
    ((2, 16, 16, 7), (16, 1, 5, 3), (3, 4), (0, 2), (0, 1), (1, 3), 2),
]


@pytest.mark.parametrize("case", SHARED_WINDOWS, ids=[f"case{i}" for i in range(len(SHARED_WINDOWS))])
def test_phases_sharing_windows(case):
    in_shape, w_shape, stride, padding, output_padding, dilation, groups = case
    nd = len(in_shape) - 2
    torch.manual_seed(3)
    y, w = torch.randn(in_shape, dtype=torch.float64), torch.randn(w_shape, dtype=torch.float64)
    b = torch.randn(w_shape[1] * groups, dtype=torch.float64)
    kwargs = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation)
    check_parity(ours_ct(nd), torch_ct(nd), (y, w, b), kwargs)


GRID_TILES = [
    # (input shape, weight shape, stride, padding, dilation, channels_last): transposed layers whose every phase
    # set reads a frame, so the CPU kernel tiles the grid points of the whole batch and reads its columns through a
    # column map; each case takes one of its paths (checked with a temporary print when it was written; the
    # in-place two-run panels are float32 only)
    ((3, 32, 16, 16), (32, 64, 4, 4), 2, 1, 1, False),     # 64-row sets: panels of two lines (a half each),
                                                           # packed by the first A panel's kernel (float32); a
                                                           # tile spans two images
    ((2, 8, 16, 16), (8, 16, 4, 4), 2, 1, 1, False),       # 16-row sets, lines of 16: two-run panels in place
    ((2, 8, 6, 7, 9), (8, 8, 4, 4, 4), 2, 1, 1, False),    # 8-row sets, lines of 9: the frame's lines, whose
                                                           # pad points are computed and dropped
    ((3, 32, 50), (32, 16, 16), 8, 4, 1, False),           # 1d, 64 rows: ragged and image-crossing panels
    ((3, 16, 5, 6, 7), (16, 16, 2, 2, 2), 2, 0, 1, False), # k == s: the input is the frame, read in place
                                                           # across images
    ((2, 8, 13, 11), (8, 12, 3, 3), 1, 2, 2, False),       # dilated, stride 1: wide pads; lines of 11, so panels
                                                           # of at most two runs a half (packed by the first A
                                                           # panel's kernel) and of three (assembled first)
    ((1, 4096, 24, 24), (4096, 1, 2, 2), 2, 0, 1, True),   # windows past the budget: frame tiles instead
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", GRID_TILES, ids=[f"case{i}" for i in range(len(GRID_TILES))])
def test_grid_tiles(case, dtype):
    in_shape, w_shape, stride, padding, dilation, channels_last = case
    nd = len(in_shape) - 2
    torch.manual_seed(5)
    y, w = torch.randn(in_shape, dtype=dtype), torch.randn(w_shape, dtype=dtype)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    b = torch.randn(w_shape[1], dtype=dtype)
    check_parity(ours_ct(nd), torch_ct(nd), (y, w, b), dict(stride=stride, padding=padding, dilation=dilation))


@pytest.mark.parametrize("channels", list(range(1, 27)) + [33, 45, 50])
def test_register_blockings(channels):
    """Every row count of the micro-kernels' blockings (float32: 4 to 12 rows on AVX-512, chosen by the channel
    count), through each GEMM: a k=4, s=2 layer whose 16-point lines make two-run panels read in place (the forward),
    the input gradient (a conv with `channels` rows) and the weight gradient. On AVX2 (6-row panels) the rows past
    the last whole panel take the tail kernels (1 to 5 rows; under 4 their K steps alternate between two sets of
    sums): also at odd depths (k=3 1d, channels x 3 deep)."""
    torch.manual_seed(channels)
    y = torch.randn(2, channels, 16, 16)
    w, b = torch.randn(channels, channels, 4, 4), torch.randn(channels)
    check_parity(ours_ct(2), torch_ct(2), (y, w, b), dict(stride=2, padding=1))
    y1, w1 = torch.randn(2, channels, 50), torch.randn(channels, channels, 3)
    check_parity(ours_ct(1), torch_ct(1), (y1, w1, b), dict(padding=1))


ODD_LINES = [
    # (input shape, weight shape, stride, padding, output_padding): odd output lines of 64+ grid points per phase, so
    # the phases' innermost grids differ by one point and are computed on the longest (conv_transpose's extended
    # grids), the extra points not stored
    ((2, 6, 70), (6, 5, 3), 2, 0, 0),                    # 141 points: grids 71 and 70
    ((1, 4, 3, 67), (4, 6, 3, 3), 2, 1, 0),              # 133
    ((1, 3, 2, 3, 65), (3, 5, 3, 2, 3), (2, 1, 2), (1, 0, 0), 0),
    ((1, 3, 2, 70), (3, 4, 5, 5), 3, 1, (0, 1)),         # stride 3, 212 points: grids 71, 71, 70
    ((1, 16, 2, 3, 100), (16, 33, 3, 3, 3), 2, 0, 0),    # the seed k=3, s=2 layer, 201-point lines
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("case", ODD_LINES, ids=[f"case{i}" for i in range(len(ODD_LINES))])
def test_odd_lines_extended_grids(case, dtype, layout):
    """Parity, gradients included, where phases of different innermost grids are computed on one grid; also with
    a non-finite weight, which the direct kernel (phases on their own grids) takes."""
    in_shape, w_shape, stride, padding, output_padding = case
    nd = len(in_shape) - 2
    torch.manual_seed(11)
    y, w, b = torch.randn(in_shape, dtype=dtype), torch.randn(w_shape, dtype=dtype), torch.randn(w_shape[1], dtype=dtype)
    if layout == "channels_last" and nd > 1:
        y = channels_last(y)
    kwargs = dict(stride=stride, padding=padding, output_padding=output_padding)
    ref_dtype = torch.float32 if dtype == torch.bfloat16 else None
    check_parity(ours_ct(nd), torch_ct(nd), (y, w, b), kwargs, grad=dtype == torch.float64, ref_dtype=ref_dtype)
    w_inf = w.clone()
    w_inf.view(-1)[5] = float("inf")
    # (against float64: torch's float32 kernel turns some of these infinities into NaN)
    expected = torch_ct(nd)(*(t.double() for t in (y, w_inf, b)), **kwargs).to(dtype)
    torch.testing.assert_close(ours_ct(nd)(y, w_inf, b, **kwargs), expected, equal_nan=True,
                               **({} if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)))


@pytest.mark.parametrize("case", [((1, 32, 32, 32, 32), (32, 16, 2, 2, 2), 2, 0), ((1, 8, 255, 257), (8, 16, 4, 4), 2, 1),
                                  ((1, 8, 256, 257), (8, 16, 3, 3), 2, 0), ((1, 4, 128, 255), (4, 16, 5, 5), 4, 0),
                                  ((1, 8, 255, 509), (8, 16, 3, 3), (2, 1), 0), ((1, 8, 1024, 3), (8, 16, 8, 8), 8, 0),
                                  ((1, 8, 40000, 1), (8, 16, 3, 3), 2, 0), ((1, 8, 16384, 9), (8, 16, 3, 1), 1, 0)],
                         ids=["k2s2_3d", "k4s2p1_2d_odd_lines", "k3s2_2d_odd_width", "k5s4_2d_odd_width",
                              "stride1_inner_rows", "k8s8_short_lines", "k3s2_lines_of_3", "stride1_lines_of_9"])
def test_large_outputs_streamed(case):
    """Float32 outputs of 8 MiB and more are written with non-temporal stores, whole 64-byte lines at a time, where
    phases interleave (stride 2 or 4): aligned lines; lines of 514 floats that start anywhere (a pair starts a
    line); and lines of 515 and 1021 floats, in which every other line no pair (or group of 4) starts a line, so
    each line is put together from two vectors. And rows of one phase (stride 1 innermost), 511 floats long; and
    output lines shorter than a 64-byte line (24, 3 and 9 floats), which hold no whole line."""
    in_shape, w_shape, stride, padding = case
    nd = len(in_shape) - 2
    torch.manual_seed(7)
    y, w = torch.randn(in_shape), torch.randn(w_shape)
    b = torch.randn(w_shape[1])
    out = check_parity(ours_ct(nd), torch_ct(nd), (y, w, b), dict(stride=stride, padding=padding), grad=False)
    assert out.numel() * 4 >= 8 << 20


def transposed_parity(in_shape, w_shape, kwargs, layout, dtype, seed):
    """Parity with gradients of a transposed layer on random data, the input contiguous or channels_last."""
    nd = len(in_shape) - 2
    torch.manual_seed(seed)
    y, w = torch.randn(in_shape, dtype=dtype), torch.randn(w_shape, dtype=dtype)
    b = torch.randn(w_shape[1] * kwargs.get("groups", 1), dtype=dtype)
    if layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)
    check_parity(ours_ct(nd), torch_ct(nd), (y, w, b), kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", [((2, 4, 3, 20, 70), (4, 6, 3, 3, 3), dict(stride=2)),  # the seed layer's shape, small
                                  ((1, 3, 20, 70), (3, 5, 5, 5), dict(stride=4)),  # four rows stacked, 3 of 4 dropped
                                  ((2, 3, 20, 70), (3, 5, 4, 3), dict(stride=2, padding=1)),  # even heights
                                  ((1, 3, 20, 70), (3, 5, 4, 4), dict(stride=3)),  # three ways (no vector store)
                                  ((1, 3, 30, 37), (3, 5, 3, 3), dict(stride=(2, 1))),  # one phase a row
                                  ((1, 3, 17, 9, 70), (3, 4, 3, 2, 3), dict(stride=(1, 2, 2), padding=(0, 1, 0))),
                                  ((2, 4, 20, 70), (4, 3, 3, 3), dict(stride=2, groups=2)),
                                  ((1, 3, 20, 70), (3, 4, 3, 3), dict(stride=2, dilation=3))],
                         ids=["seed_3d", "k5s4", "k4s2_even_lines", "k4s3", "stride1_inner", "short_planes", "groups",
                              "dilated"])
def test_stacked_rows(case, layout, dtype):
    """Odd output heights and widths at stride 2 or more: the phases of one plane are computed on the longest grid in
    both inner dims (past their own by a point and by a line), and where the output's rows are contiguous each
    line's rows are stored one after another (the phases stacked), the points past a phase's own grid left out
    (16 lines and even heights: stacked, not extended). Parity with gradients, float64 and float32, batches of 1 and
    2 (tiles across images), groups, dilation, and channels_last output (not stacked)."""
    transposed_parity(*case, layout, dtype, seed=17)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", [((2, 4, 5, 16, 40), (4, 6, 3, 3, 3), dict(stride=2), "contiguous"),  # end planes
                                  ((1, 3, 40, 600), (3, 4, 3, 3), dict(stride=2), "contiguous"),  # end lines
                                  ((1, 3, 12, 600), (3, 4, 2, 3), dict(stride=2, dilation=(5, 1)), "contiguous"),
                                  ((1, 3, 5, 12, 520), (3, 4, 2, 2, 3), dict(stride=2, dilation=(5, 5, 1)),
                                   "contiguous"),
                                  ((2, 3, 6, 16, 48), (3, 4, 2, 3, 2), dict(stride=2, dilation=(4, 3, 1), padding=1),
                                   "channels_last"),
                                  ((1, 4, 9, 700), (4, 3, 3, 3), dict(stride=2, groups=2), "contiguous")],
                         ids=["end_planes", "end_lines", "lines_without_taps", "planes_without_taps", "dilated_3d",
                              "groups"])
def test_line_classes(case, dtype):
    """Planes (and lines of 512 points or more) of a phase's grid where some taps read past the input along the outer
    dims (end planes and lines of strided layers) are multiplied over the taps that read the input there only, and
    those where none does (dilated phases' first lines and planes) hold the bias alone: parity with gradients, tiles
    across images, channels_last, groups and dilation."""
    transposed_parity(*case, dtype, seed=19)


@pytest.mark.parametrize("case", [((2, 24, 16, 16, 16), (24, 32, 1, 1, 1), 1),  # pointwise, planes of 16 KiB
                                  ((1, 40, 8, 16, 32), (40, 20, 1, 1, 1), 1),  # 20 output channels
                                  ((1, 24, 8, 8, 8), (24, 20, 2, 2, 2), 2)],  # k=2: input gradient, 20 channels read
                         ids=["pointwise_32", "pointwise_20", "k2s2_input_grad"])
def test_rows_4k_apart(case):
    """GEMMs reading the channels of an input in place whose planes are multiples of 4 KiB (the rows of B fall into
    one set of L1 lines), with 3 to 7 panels of A: B's blocks are copied into a panel first (AVX2; AVX-512's kernel
    packs them as it multiplies). Parity, gradients included."""
    in_shape, w_shape, stride = case
    torch.manual_seed(13)
    x, w, b = torch.randn(in_shape), torch.randn(w_shape), torch.randn(w_shape[1])
    check_parity(ours_ct(3), torch_ct(3), (x, w, b), dict(stride=stride))


STORE_CASES = [
    # (op, input shape, weight shape, stride, padding): outputs stored through the vectorised stores (runs of phases
    # interleaved in registers, 16-bit outputs rounded there)
    ("ct", (2, 64, 5, 6, 19), (64, 8, 2, 2, 2), 2, 0),    # two phases interleaved, runs of 19 (16 + a tail)
    ("ct", (2, 48, 7, 37), (48, 8, 3, 2), (2, 1), 0),     # stride 1 innermost: plain rows, runs of 38
    ("ct", (1, 16, 128, 1024), (16, 16, 2, 2), 2, 0),     # 8 MiB or more of output: streamed lines
    ("ct", (1, 16, 128, 1021), (16, 16, 2, 2), 2, 0),     # the same, lines of 2042 values starting anywhere
    ("ct", (1, 16, 128, 1021), (16, 16, 2, 3), 2, 0),     # lines of 2043: pairs split at a 64-byte boundary
    ("ct", (1, 16, 128, 1021), (16, 16, 2, 3), (2, 1), 0),  # streamed plain rows of 1023 starting anywhere
    ("ct", (1, 16, 5, 21), (16, 8, 4, 4), 4, 0),          # four phases interleaved
    ("ct", (1, 8, 3, 19), (8, 4, 8, 8), 8, 0),            # eight
    ("ct", (1, 4, 2, 17), (4, 4, 1, 16), (1, 16), 0),     # sixteen
    ("ct", (2, 32, 45), (32, 8, 16), 8, 4),               # HiFi-GAN-like: two sets of four phases, 8 apart
    ("conv", (2, 32, 11, 40), (16, 32, 3, 3), 1, 0),      # conv's output rows
    # odd extents at stride 2 in both dims: phases computed on the longest grid, each line's two rows stored one after
    # another (stacked), the last value of every row dropped from the longer grid
    ("ct", (1, 16, 129, 301), (16, 16, 3, 3), 2, 0),      # rows of 603, streamed (float)
    ("ct", (1, 8, 20, 70), (8, 8, 5, 5), 4, 0),           # four rows of 281 stacked, three values dropped
    ("ct", (1, 8, 30, 37), (8, 8, 3, 3), (2, 1), 0),      # rows of one phase (stride 1 innermost) stacked
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", STORE_CASES, ids=["interleaved", "rows", "streamed", "streamed_odd", "streamed_split",
                                                   "streamed_rows", "ways4", "ways8", "ways16", "ways4_step8", "conv",
                                                   "stacked_streamed", "stacked_ways4", "stacked_rows"])
def test_stores_exact_and_round_to_nearest_even(case, dtype):
    """Outputs are stored exactly, and bfloat16 and float16 ones rounded from the float sums as torch rounds (to
    nearest, ties to even; NaN stays NaN). Small integers make every sum exact in float whatever its order, and for
    the 16-bit types many of them are not representable, so each output must equal torch's float64 result rounded
    to the dtype, bit for bit; a NaN bias puts NaN in one channel."""
    op, in_shape, w_shape, stride, padding = case
    nd = len(in_shape) - 2
    g = torch.Generator().manual_seed(11)
    r = 8 if dtype == torch.bfloat16 else 32  # (sums past 256 and 2048, where the 16-bit types round integers)
    x = torch.randint(-r, r + 1, in_shape, generator=g).to(dtype)
    w = torch.randint(-r, r + 1, w_shape, generator=g).to(dtype)
    out_channels = w_shape[1] if op == "ct" else w_shape[0]
    b = (torch.randint(-64, 65, (out_channels,), generator=g) + 0.5).to(dtype)
    b[1] = float("nan")
    ours, ref = (ours_ct(nd), torch_ct(nd)) if op == "ct" else (ours_conv(nd), torch_conv(nd))
    got = ours(x, w, b, stride=stride, padding=padding)
    exact = ref(x.double(), w.double(), b.double(), stride=stride, padding=padding)
    want = exact.to(dtype)
    assert got.dtype == dtype and got.shape == want.shape
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan) and nan[:, 1].all() and nan.sum() == nan[:, 1].numel()
    view = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got[~nan].view(view), want[~nan].view(view))
    if dtype != torch.float32:
        assert (want[~nan].double() != exact[~nan]).float().mean() > 0.02  # (the case rounds)


CONV_GRID_TILES = [
    # (input shape, weight shape, stride, padding, dilation, channels_last): convolutions whose frame has points off
    # the output grid, so the CPU conv tiles the grid points of the whole batch through a column map; each case
    # takes one of its paths (checked with a temporary print when it was written)
    ((3, 32, 16, 16), (64, 32, 4, 4), 2, 1, 1, False),          # gathered windows, a tile spans images, Y in place
    ((2, 64, 24, 24, 24), (16, 64, 4, 4, 4), 2, 1, 1, False),   # the windows from a whole-frame copy (split)
    ((2, 8, 20, 20), (16, 8, 3, 3), 1, 0, 1, False),            # the input is its own frame: read in place
    ((1, 8, 6, 6, 24), (8, 8, 3, 3, 3), 1, 1, 1, False),        # 8 rows, lines of 24: the frame's lines, Y stored
    ((2, 16, 10, 12), (24, 16, 3, 3), 2, 1, 2, True),           # channels_last: Y stored; dilated
    ((1, 32, 32, 32, 32), (64, 32, 3, 3, 3), 2, 1, 1, False),   # MONAI's input gradient: windows 1% over the columns
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CONV_GRID_TILES, ids=[f"case{i}" for i in range(len(CONV_GRID_TILES))])
def test_conv_grid_tiles(case, dtype):
    in_shape, w_shape, stride, padding, dilation, channels_last = case
    nd = len(in_shape) - 2
    torch.manual_seed(6)
    x, w = torch.randn(in_shape, dtype=dtype), torch.randn(w_shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    b = torch.randn(w_shape[0], dtype=dtype)
    ours, ref = fn_pair("conv", nd)
    check_parity(ours, ref, (x, w, b), dict(stride=stride, padding=padding, dilation=dilation))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", [((2, 16, 12, 14), (128, 16, 4, 4), 2, 1), ((2, 16, 20, 20), (128, 16, 3, 3), 1, 0)],
                         ids=["stride2_padded", "input_is_frame"])
def test_weight_grad_grid_points(case, dtype):
    """Weight gradients of 128+ output channels sum over the grid points of Y only (the frame's points off the grid,
    where Y is zero, are skipped through a column map): a padded stride-2 frame, and an input that is its own
    frame (read in place)."""
    in_shape, w_shape, stride, padding = case
    nd = len(in_shape) - 2
    torch.manual_seed(8)
    x, w = torch.randn(in_shape, dtype=dtype), torch.randn(w_shape, dtype=dtype)
    ours, ref = fn_pair("conv", nd)
    check_parity(ours, ref, (x, w), dict(stride=stride, padding=padding))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", [((1, 24, 12, 12, 12), (24, 16, 3, 3, 3), 2, 1, 1),   # one tile -> two
                                  ((2, 64, 400), (64, 32, 16), 8, 4, 0),              # a HiFi-GAN-like 1d layer
                                  ((3, 16, 9, 40, 30), (16, 8, 3, 5, 2), (2, 1, 1), (0, 4, 2), 0)],
                         ids=["monai_like", "hifigan_like", "aniso_batch3"])
def test_weight_grad_equal_chunks(case, dtype):
    """Transposed layers whose weight-gradient tiles are re-cut into equal ones, more of them where a few would not
    split evenly into the reduction's chunks: the gradients still match torch's, and are bitwise the same on 1 and
    2 threads (the cut depends on the shapes only)."""
    in_shape, w_shape, stride, padding, output_padding = case
    nd = len(in_shape) - 2
    torch.manual_seed(9)
    x, w = torch.randn(in_shape, dtype=dtype), torch.randn(w_shape, dtype=dtype)
    ours, ref = fn_pair("ct", nd)
    kw = dict(stride=stride, padding=padding, output_padding=output_padding)
    check_parity(ours, ref, (x, w), kw)
    grads = _weight_grads_on_1_and_2_threads(ours, x, w, kw, torch.ones_like)
    assert torch.equal(grads[0], grads[1])


def _weight_grads_on_1_and_2_threads(ours, x, w, kw, grad_out):
    """The weight gradient of ours(x, w, **kw) for the upstream gradient grad_out(y), on 1 and on 2 threads."""
    grads = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            wr = w.clone().requires_grad_(True)
            y = ours(x, wr, **kw)
            grads.append(torch.autograd.grad(y, wr, grad_out(y))[0])
        finally:
            torch.set_num_threads(old)
    return grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("case", [((2, 128, 400), (128, 64, 16), 8, 4, 1),  # chunks on 1-2 of 4-8 channel blocks
                                  ((2, 128, 64, 64), (128, 16, 4, 4), 2, 1, 1),  # chunks of 2-4 items, 8 on a block
                                  ((2, 256, 9, 9), (256, 48, 3, 3), 2, 1, 2),  # 2 groups of 128 channels
                                  ((3, 16, 9, 40, 30), (16, 8, 3, 5, 2), (2, 1, 1), (0, 4, 2), 1),  # dot products
                                  ((0, 128, 10), (128, 64, 16), 8, 4, 1)],  # no batch: dW is zero
                         ids=["hifigan_blocks", "dcgan_items", "grouped_wide", "aniso_narrow", "empty_batch"])
def test_weight_grad_chunk_regions(case, dtype):
    """Weight gradients whose reduction chunks each reach part of dW (a chunk's first item on a channel block writes
    its partial sums instead of adding to zeros, and only the chunks that reached a block are summed): they match
    torch's, are bitwise the same on 1 and 2 threads, and are zeros for an empty batch."""
    in_shape, w_shape, stride, padding, groups = case
    nd = len(in_shape) - 2
    torch.manual_seed(10)
    x, w = torch.randn(in_shape, dtype=dtype), torch.randn(w_shape, dtype=dtype)
    ours, ref = fn_pair("ct", nd)
    kw = dict(stride=stride, padding=padding, groups=groups)
    check_parity(ours, ref, (x, w), kw, ref_dtype=torch.float32 if dtype == torch.bfloat16 else None)
    grads = _weight_grads_on_1_and_2_threads(
        ours, x, w, kw, lambda y: torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype))
    assert torch.equal(grads[0], grads[1])
    if in_shape[0] == 0:
        assert not grads[0].any()


@pytest.mark.parametrize("case", [((2, 32, 7, 9, 11), (32, 16, 4, 4, 4), 2, 1),  # stride-2 planes, 2 panels of 8
                                  ((1, 24, 6, 7, 5), (24, 5, 3, 3, 3), 2, 1),  # 5 channels: one part panel
                                  ((2, 30, 9, 13), (30, 20, 3, 3), 1, 1),  # stride 1, 20 channels
                                  ((1, 26, 37), (26, 12, 5), 2, 2),  # 1d, 12 channels
                                  ((2, 28, 5, 6, 19), (28, 16, 3, 2, 3), (1, 2, 2), (1, 0, 1))],  # mixed strides
                         ids=["k4s2_3d", "part_panel", "stride1_2d", "conv1d_12ch", "mixed_3d"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_weight_grad_packed_windows(case, layout):
    """Tap-by-tap float weight gradients whose windows are gathered straight into packed panels (transposed in
    registers: 8 channels a panel on AVX-512, panels of up to 8 on AVX2; others by a plain loop): stride-1 and
    stride-2 planes, part panels, runs with odd tails and pads. They match torch's and are bitwise the same on 1 and
    2 threads."""
    in_shape, w_shape, stride, padding = case
    nd = len(in_shape) - 2
    torch.manual_seed(11)
    x, w = torch.randn(in_shape), torch.randn(w_shape)
    if layout == "channels_last" and nd >= 2:
        x = x.contiguous(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)
    ours, ref = fn_pair("ct", nd)
    kw = dict(stride=stride, padding=padding)
    check_parity(ours, ref, (x, w), kw)
    grads = _weight_grads_on_1_and_2_threads(ours, x, w, kw, torch.ones_like)
    assert torch.equal(grads[0], grads[1])


DEPTHWISE_LONG_ROWS = [
    # (kind, input shape, kernel, stride, padding, output_padding, dilation, channels_last): per-channel layers whose
    # innermost rows span several 16-point vectors, with taps whose ranges start and end inside them
    ("ct", (2, 4, 5, 6, 37), 3, 2, 1, 1, 1, False),       # phases interleaved 2 ways
    ("ct", (1, 3, 4, 45), (2, 5), (1, 3), (0, 2), 0, 1, False),  # 3 ways
    ("conv", (2, 4, 6, 7, 75), 3, 2, 1, 0, 1, False),     # stride-2 reads, de-interleaved
    ("conv", (2, 3, 70), 5, 1, 4, 0, 2, False),           # dilated, unit-stride reads
    ("conv", (1, 5, 33, 40), 3, 3, 1, 0, 1, False),       # stride 3 (the loops without vectors)
    ("ct", (2, 4, 5, 6, 20), 3, 2, 1, 1, 1, True),        # channels_last
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["float64", "float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", DEPTHWISE_LONG_ROWS, ids=[f"case{i}" for i in range(len(DEPTHWISE_LONG_ROWS))])
def test_depthwise_long_rows(case, dtype):
    """(16-bit rows are widened to float as the vectors load them: compared with torch in float32 on the same
    values.)"""
    kind, in_shape, kernel, stride, padding, output_padding, dilation, channels_last = case
    nd = len(in_shape) - 2
    C = in_shape[1]
    kernel = (kernel,) * nd if isinstance(kernel, int) else kernel
    torch.manual_seed(10)
    x, w, b = torch.randn(in_shape, dtype=dtype), torch.randn((C, 1) + kernel, dtype=dtype), torch.randn(C, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d if nd == 3 else torch.channels_last)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=C)
    if kind == "ct":
        kw["output_padding"] = output_padding
    ours, ref = fn_pair(kind, nd)
    check_parity(ours, ref, (x, w, b), kw, ref_dtype=torch.float32 if dtype in LOW_PRECISION else None)


DEPTHWISE_FLOAT_ROWS = [
    # (kind, input shape, kernel, stride, padding, output_padding): float32 per-channel layers, whose rows the vector
    # kernels keep in registers across the taps, 8 or 16 points a block, masking the lanes outside a tap's range
    # (AVX-512; on AVX2 the rows read at step 2: the conv's, and the transposed layers' gradients)
    ("ct", (2, 3, 4, 5, 16), 3, 2, 1, 1),   # the bench's depthwise layer in small: phase rows of 17 and 16 points
    ("ct", (1, 2, 3, 6), 3, 2, 1, 0),       # rows of 6 and 5 points: one part block
    ("ct", (1, 2, 40), 5, 1, 2, 0),         # stride 1, a row of 40: a block of 32 points, then one of 8
    ("conv", (2, 3, 5, 4, 33), 3, 2, 1, 0),  # stride-2 reads whose last row ends the tensor
    ("conv", (1, 2, 9), 4, 1, 2, 0),        # unit-stride reads, taps inside a short row
]


@pytest.mark.parametrize("case", DEPTHWISE_FLOAT_ROWS, ids=[f"case{i}" for i in range(len(DEPTHWISE_FLOAT_ROWS))])
def test_depthwise_float_rows(case):
    """Parity with gradients; the weight gradient the same on 1 and 2 threads; and a non-finite weight adds to no point
    outside its tap's range: for transposed layers against torch in float64; for convolutions, where torch's padding
    turns inf into NaN at the borders, against our float64 loops (which take no vector kernel)."""
    kind, in_shape, kernel, stride, padding, output_padding = case
    nd = len(in_shape) - 2
    C = in_shape[1]
    torch.manual_seed(12)
    x, w, b = torch.randn(in_shape), torch.randn((C, 1) + (kernel,) * nd), torch.randn(C)
    kw = dict(stride=stride, padding=padding, groups=C)
    if kind == "ct":
        kw["output_padding"] = output_padding
    ours, ref = fn_pair(kind, nd)
    check_parity(ours, ref, (x, w, b), kw)
    grads = _weight_grads_on_1_and_2_threads(ours, x, w, kw, torch.ones_like)
    assert torch.equal(grads[0], grads[1])
    w_inf = w.clone()
    w_inf[1].view(-1)[0] = float("inf")
    expected = (ref if kind == "ct" else ours)(x.double(), w_inf.double(), b.double(), **kw).float()
    got = ours(x, w_inf, b, **kw)
    assert got.isinf().any()
    torch.testing.assert_close(got, expected, equal_nan=True, rtol=1e-4, atol=1e-4)


COLUMN_GATHERS = [
    # (kind, input shape, weight shape, stride, padding): layers whose CPU kernel gathers GEMM columns piece by piece
    # (AVX2, float: 8 points a vector, each piece's next channel fetched ahead): frame windows would span a source
    # plane per tile (the 33-channel stride-2 convs) or cost more than the columns (few channels)
    ("conv", (1, 33, 3, 41, 83), (16, 33, 3, 3, 3), 2, 0),          # the seed k=3, s=2 input gradient in small: step 2
    ("conv", (1, 33, 3, 41, 83), (16, 33, 3, 3, 3), 2, (0, 0, 1)),  # padded rows: zero heads and tails in the pieces
    ("ct", (2, 5, 4, 4, 5), (5, 3, 3, 3, 3), 2, 1),                 # a transposed layer's phases: step-1 pieces
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("case", COLUMN_GATHERS, ids=[f"case{i}" for i in range(len(COLUMN_GATHERS))])
def test_column_gathers(case, dtype):
    kind, in_shape, w_shape, stride, padding = case
    torch.manual_seed(14)
    x, w = torch.randn(in_shape, dtype=dtype), torch.randn(w_shape, dtype=dtype)
    b = torch.randn(w_shape[1 if kind == "ct" else 0], dtype=dtype)
    ours, ref = fn_pair(kind, 3)
    check_parity(ours, ref, (x, w, b), dict(stride=stride, padding=padding),
                 ref_dtype=torch.float32 if dtype in LOW_PRECISION else None)


WIDE_TILES = [
    # (input shape, weight shape, stride, padding, dilation): convolutions whose packed weights (output channels x
    # input channels x taps) outgrow L2, so the CPU conv takes position tiles several times its column tile, and
    # whose rows pad by under 5% to the taller register blocking (80 and 256 rows: 12-row panels)
    ((4, 128, 20, 20), (80, 128, 4, 4), 2, 1, 1),     # stride 2: phase-split frame
    ((4, 64, 20, 20), (256, 64, 3, 3), 1, 0, 1),      # the input is its own frame (read in place)
    ((2, 16, 2000), (160, 16, 64), 1, 0, 8),          # a long dilated 1d kernel: wide windows
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", WIDE_TILES, ids=[f"case{i}" for i in range(len(WIDE_TILES))])
def test_conv_wide_tiles(case, dtype):
    in_shape, w_shape, stride, padding, dilation = case
    nd = len(in_shape) - 2
    torch.manual_seed(4)
    x, w = torch.randn(in_shape, dtype=dtype), torch.randn(w_shape, dtype=dtype)
    b = torch.randn(w_shape[0], dtype=dtype)
    ours, ref = fn_pair("conv", nd)
    check_parity(ours, ref, (x, w, b), dict(stride=stride, padding=padding, dilation=dilation))


def test_plans_reused_across_calls():
    """The CPU conv_transpose keeps the plans of each thread's recent geometries (a few dozen). Calls with the same
    shapes in turn in two layouts and two dtypes (different plans), cycling through more geometries than it keeps,
    from the main thread and a second one, must each match torch: a plan is only ever reused for its own
    geometry."""
    calls = []
    extra = [Cfg(kernel=2, stride=2, size=4), Cfg(kernel=4, stride=2, padding=1, size=4), Cfg(kernel=3, stride=3)]
    for cfg in list(CT_VARIANTS.values()) + extra:
        for nd in DIMS:
            y, w, b = cfg.tensors("ct", nd)
            calls.append((nd, y, w, b, cfg.kwargs("ct", nd)))
    failures = []

    def run_all(tag):
        for nd, y, w, b, kw in calls:
            for dtype in (torch.float64, torch.float32):
                for layout in (lambda t: t, channels_last, lambda t: t):
                    yy, ww, bb = layout(y.to(dtype)), w.to(dtype), b.to(dtype)
                    got, want = ours_ct(nd)(yy, ww, bb, **kw), torch_ct(nd)(yy, ww, bb, **kw)
                    tol = 1e-12 if dtype == torch.float64 else 1e-4
                    if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol):
                        failures.append((tag, nd, dtype, kw))

    run_all("main, first pass")
    run_all("main, second pass")
    thread = threading.Thread(target=run_all, args=("second thread",))
    thread.start()
    thread.join()
    assert len(calls) > 32 and not failures, failures[:5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["ct", "conv"])
@pytest.mark.parametrize("nd", [2, 3], ids=["2d", "3d"])
def test_channels_last_other_dtypes(nd, kind, dtype, device):
    cfg = _variants(kind)["asym"]
    x, w, b = cfg.tensors(kind, nd, dtype, device=device)
    ours, ref = fn_pair(kind, nd)
    check_parity(ours, ref, (channels_last(x), channels_last(w), b), cfg.kwargs(kind, nd),
                 ref_dtype=torch.float32 if dtype == torch.bfloat16 else None)


def is_dense(t):
    """Non-overlapping and dense: some permutation of the dims is a contiguous layout."""
    dims = sorted(range(t.dim()), key=lambda i: t.stride(i))
    expected = 1
    for i in dims:
        if t.size(i) != 1 and t.stride(i) != expected:
            return False
        expected *= t.size(i)
    return True


@pytest.mark.parametrize("kind", ["ct", "conv"])
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_output_is_fresh_tensor(nd, kind, device):
    """The output must not alias any input and must be a dense tensor with the expected shape."""
    cfg = _variants(kind)["basic"]
    x, w, b = cfg.tensors(kind, nd, device=device)
    ours, _ = fn_pair(kind, nd)
    out = ours(x, w, b, **cfg.kwargs(kind, nd))
    assert out.device == x.device
    assert out.untyped_storage().data_ptr() not in {
        x.untyped_storage().data_ptr(), w.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()}
    assert is_dense(out), out.stride()
    xs, ws, bs = x.clone(), w.clone(), b.clone()
    out.add_(1)  # writable, does not affect inputs
    assert torch.equal(x, xs) and torch.equal(w, ws) and torch.equal(b, bs)


# ----------------------------------------------------------------------------------------------------------
# batch 0, unbatched inputs, no grad inputs
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", ["ct", "conv"])
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_batch_zero(nd, kind, bias, device):
    variant = "g2_s2_d2_p1_op1" if kind == "ct" else "g2_s2_d2_p1"
    cfg = _variants(kind)[variant].replace(n=0, bias=bias)
    out = _run(kind, nd, cfg, device=device)
    assert out.shape[0] == 0
    if kind == "ct":
        assert tuple(out.shape) == cfg.ct_out_shape(nd)


# An empty batch with empty spatial dims or (transposed) an empty output: torch.nn returns an empty result and zero
# weight and bias gradients; a geometry it rejects even then (a negative output size, a kernel past the padded
# input) raises in both. (last spatial dim, stride, padding, output_padding, which)
EMPTY_BATCH_GEOMETRIES = [
    (0, 1, 0, 0, "ct"), (1, 1, 1, 0, "ct"), (0, 2, 1, 1, "ct"), (0, 1, 3, 0, "ct"), (1, 1, 2, 0, "ct"),
    (0, 1, 1, 0, "conv"), (0, 1, 2, 0, "conv"), (0, 1, 0, 0, "conv"), (1, 1, 0, 0, "conv"),
]


@pytest.mark.parametrize("geometry", EMPTY_BATCH_GEOMETRIES,
                         ids=[f"case{i}" for i in range(len(EMPTY_BATCH_GEOMETRIES))])
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_empty_batch_degenerate_geometry(nd, geometry):
    last, stride, pad, out_pad, kind = geometry
    shape = (0, 3) + (3,) * (nd - 1) + (last,)
    w_shape = ((3, 2) if kind == "ct" else (2, 3)) + (2,) * nd
    kw = dict(stride=stride, padding=(0,) * (nd - 1) + (pad,))
    if kind == "ct":
        kw["output_padding"] = (0,) * (nd - 1) + (out_pad,)
    ours, ref = fn_pair(kind, nd)

    def run(fn):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        w = torch.randn(w_shape, dtype=torch.float64, requires_grad=True)
        b = torch.randn(2, dtype=torch.float64, requires_grad=True)
        out = fn(x, w, b, **kw)
        return (out, *torch.autograd.grad(out.sum(), (x, w, b)))

    try:
        expected = run(ref)
    except Exception as e:  # noqa: BLE001
        got = exc_of(lambda: run(ours))
        assert type(got) is type(e), f"torch raised {type(e).__name__}, ours {got!r}"
        return
    for name, a, e in zip(("output", "input grad", "weight grad", "bias grad"), run(ours), expected):
        assert a.shape == e.shape and a.dtype == e.dtype, f"{name}: {a.shape} against torch's {e.shape}"
        assert torch.equal(a, e), name


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", ["ct", "conv"])
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
@pytest.mark.parametrize("variant", ["asym", "g2"])
def test_unbatched(nd, kind, bias, variant, device):
    cfg = _variants(kind)[variant].replace(bias=bias)
    x, w, b = cfg.tensors(kind, nd, device=device)
    ours, ref = fn_pair(kind, nd)
    out = check_parity(ours, ref, (x[0], w, b), cfg.kwargs(kind, nd))
    assert out.dim() == nd + 1
    # unbatched result equals the batched result for the same sample
    batched = ours(x[:1], w, b, **cfg.kwargs(kind, nd))
    torch.testing.assert_close(out, batched[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_unbatched_conv_same_padding(nd, device):
    cfg = CONV_VARIANTS["same_asym_even"]
    x, w, b = cfg.conv_tensors(nd, device=device)
    check_parity(ours_conv(nd), torch_conv(nd), (x[1], w, b), cfg.conv_kwargs(nd))


@pytest.mark.parametrize("kind", ["ct", "conv"])
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_unbatched_low_precision_and_int(nd, kind, device):
    cfg = _variants(kind)["basic"]
    ours, ref = fn_pair(kind, nd)
    x, w, b = cfg.tensors(kind, nd, torch.bfloat16, device=device)
    check_parity(ours, ref, (x[0], w, b), cfg.kwargs(kind, nd), ref_dtype=torch.float32)
    x, w, b = cfg.tensors(kind, nd, torch.int64, device=device)
    if device == "cpu":
        check_parity(ours, ref, (x[0], w, b), cfg.kwargs(kind, nd), grad=False)
    else:  # no integer convolutions on CUDA: the same exception type as torch's
        expected = exc_of(lambda: ref(x[0], w, b, **cfg.kwargs(kind, nd)))
        got = exc_of(lambda: ours(x[0], w, b, **cfg.kwargs(kind, nd)))
        assert expected is not None and got is not None, (expected, got)
        assert type(got) is type(expected), (got, expected)


@pytest.mark.parametrize("which", ["input", "weight", "bias", "input_weight", "none"])
@pytest.mark.parametrize("kind", ["ct", "conv"])
def test_partial_requires_grad(kind, which, device):
    """Only some arguments require grad: the others must get no gradient and the rest must still match."""
    nd = 2
    variant = "g2_s2_d2_p1_op1" if kind == "ct" else "g2_s2_d2_p1"
    cfg = _variants(kind)[variant]
    x, w, b = cfg.tensors(kind, nd, device=device)
    ours, ref = fn_pair(kind, nd)
    flags = {"input": (1, 0, 0), "weight": (0, 1, 0), "bias": (0, 0, 1), "input_weight": (1, 1, 0),
             "none": (0, 0, 0)}[which]
    xs = [t.clone().requires_grad_(bool(f)) for t, f in zip((x, w, b), flags)]
    xr = [t.clone().requires_grad_(bool(f)) for t, f in zip((x, w, b), flags)]
    out = ours(*xs, **cfg.kwargs(kind, nd))
    exp = ref(*xr, **cfg.kwargs(kind, nd))
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)
    assert out.requires_grad == exp.requires_grad
    if exp.requires_grad:
        g = torch.randn_like(exp)
        out.backward(g)
        exp.backward(g)
        for a, e in zip(xs, xr):
            if e.requires_grad:
                torch.testing.assert_close(a.grad, e.grad, rtol=1e-12, atol=1e-12)
            else:
                assert a.grad is None


@pytest.mark.parametrize("kind", ["ct", "conv"])
def test_no_grad_mode(kind, device):
    nd = 2
    cfg = _variants(kind)["basic"]
    x, w, b = cfg.tensors(kind, nd, device=device)
    ours, ref = fn_pair(kind, nd)
    w.requires_grad_(True)
    with torch.no_grad():
        out = ours(x, w, b, **cfg.kwargs(kind, nd))
    assert not out.requires_grad
    torch.testing.assert_close(out, ref(x, w.detach(), b, **cfg.kwargs(kind, nd)), rtol=1e-12, atol=1e-12)
    with torch.inference_mode():
        out2 = ours(x, w, b, **cfg.kwargs(kind, nd))
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["ct", "conv"])
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_positional_and_keyword_calls(nd, kind, device):
    """Same positional order and keyword names as torch.nn.functional."""
    ours, ref = fn_pair(kind, nd)
    if kind == "ct":
        cfg = CT_VARIANTS["g2_s2_d2_p1_op1"]
        x, w, b = cfg.ct_tensors(nd, device=device)
        pos = (x, w, b, 2, 1, 1, 2, 2)  # stride, padding, output_padding, groups, dilation
        kw = dict(input=x, weight=w, bias=b, stride=2, padding=1, output_padding=1, groups=2, dilation=2)
    else:
        cfg = CONV_VARIANTS["g2_s2_d2_p1"]
        x, w, b = cfg.conv_tensors(nd, device=device)
        pos = (x, w, b, 2, 1, 2, 2)  # stride, padding, dilation, groups
        kw = dict(input=x, weight=w, bias=b, stride=2, padding=1, dilation=2, groups=2)
    expected = ref(*pos)
    torch.testing.assert_close(ours(*pos), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours(**kw), expected, rtol=1e-12, atol=1e-12)
    # defaults: bias=None, stride=1 ...
    torch.testing.assert_close(ours(x, w, groups=2), ref(x, w, groups=2), rtol=1e-12, atol=1e-12)
    # list arguments are accepted as well as tuples
    lst = dict(stride=[2] * nd, padding=[1] * nd, dilation=[2] * nd, groups=2)
    if kind == "ct":
        lst["output_padding"] = [1] * nd
    torch.testing.assert_close(ours(x, w, b, **lst), expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# output-size formula
# ----------------------------------------------------------------------------------------------------------
def test_output_size_formula_random_configs(device):
    gen = torch.Generator().manual_seed(1234)

    def r(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    checked = 0
    while checked < 60:
        nd = r(1, 3)
        size = tuple(r(1, 6) for _ in range(nd))
        kernel = tuple(r(1, 4) for _ in range(nd))
        stride = tuple(r(1, 3) for _ in range(nd))
        dilation = tuple(r(1, 3) for _ in range(nd))
        padding = tuple(r(0, 3) for _ in range(nd))
        op = tuple(r(0, max(s, d) - 1) for s, d in zip(stride, dilation))
        expected = tuple(ct_out_size(*v) for v in zip(size, kernel, stride, padding, op, dilation))
        if min(expected) < 1:
            continue
        x = randn((1, 2) + size, device=device)
        w = randn((2, 3) + kernel, device=device)
        out = ours_ct(nd)(x, w, None, stride, padding, op, 1, dilation)
        assert tuple(out.shape[2:]) == expected, (size, kernel, stride, padding, op, dilation)
        torch.testing.assert_close(out, torch_ct(nd)(x, w, None, stride, padding, op, 1, dilation),
                                   rtol=1e-12, atol=1e-12)
        checked += 1


# ----------------------------------------------------------------------------------------------------------
# edge cases where torch succeeds
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_conv_zero_input_channels(nd, device):
    """conv with 0 input channels (weight (Cout, 0, k...)). torch returns a (N, 0, L...) tensor here (its
    quirk); the mathematically right answer is the bias broadcast (zeros without bias) of shape
    (N, Cout, L...). Either is accepted; nothing else."""
    x = randn((2, 0) + (5,) * nd, device=device)
    w = randn((3, 0) + (3,) * nd, device=device)
    b = randn(3, device=device)
    for bias in (b, None):
        # the reference semantics are torch's on the CPU (what its CUDA backend does with 0 channels varies)
        expected = torch_conv(nd)(x.cpu(), w.cpu(), bias.cpu() if bias is not None else None).to(device)
        got = ours_conv(nd)(x, w, bias)
        assert got.device == x.device
        if got.shape == expected.shape:
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        else:
            assert got.shape == (2, 3) + (3,) * nd
            want = torch.zeros_like(got) if bias is None else bias.view((1, 3) + (1,) * nd).expand_as(got)
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["ct", "conv"])
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_large_values_no_overflow_float64(nd, kind, device):
    """Results are computed in the input dtype: large float64 magnitudes must not overflow/lose range."""
    cfg = _variants(kind)["basic"]
    x, w, b = cfg.tensors(kind, nd, device=device)
    ours, ref = fn_pair(kind, nd)
    check_parity(ours, ref, (x * 1e150, w * 1e100, b * 1e250), cfg.kwargs(kind, nd), grad=False)


@pytest.mark.parametrize("kind", ["ct", "conv"])
def test_nan_inf_propagation(kind, device):
    nd = 2
    cfg = _variants(kind)["basic"]
    x, w, b = cfg.tensors(kind, nd, device=device)
    x[0, 0, 1, 1] = float("nan")
    x[1, 1, 2, 2] = float("inf")
    ours, ref = fn_pair(kind, nd)
    # the reference is torch on the CPU: direct summation, where each NaN/Inf reaches exactly the outputs it
    # contributes to (a transform-based cuDNN algorithm could smear it over a whole tile)
    expected = ref(x.cpu(), w.cpu(), b.cpu(), **cfg.kwargs(kind, nd)).to(device)
    got = ours(x, w, b, **cfg.kwargs(kind, nd))
    assert got.device == expected.device
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got), finite)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# medium sizes: many channels x taps so that the work is split into several column tiles (tile boundaries in
# the middle of a row), several reduction chunks and several threads
# ----------------------------------------------------------------------------------------------------------
MEDIUM = [
    ("conv1d_c96_k5_L700", "conv", 1, Cfg(n=2, cin=96, cout=5, size=700, kernel=5, padding=2)),
    ("conv2d_c64_k3_23x29", "conv", 2, Cfg(n=1, cin=64, cout=4, size=(23, 29), kernel=3, padding=1)),
    ("conv2d_c128_g2_s2_d2_61x57", "conv", 2, Cfg(n=2, cin=128, cout=6, groups=2, size=(61, 57), kernel=3,
                                                  stride=2, dilation=2, padding=2)),
    ("conv3d_c32_k3_9x10x11", "conv", 3, Cfg(n=1, cin=32, cout=3, size=(9, 10, 11), kernel=3, padding=1)),
    ("ct1d_c96_k5_L700", "ct", 1, Cfg(n=2, cin=96, cout=4, size=700, kernel=5)),
    ("ct2d_c128_k4_s2_30x33", "ct", 2, Cfg(n=1, cin=128, cout=4, size=(30, 33), kernel=4, stride=2, padding=1)),
    ("ct2d_c128_g2_s2_d2_op1_25x27", "ct", 2, Cfg(n=1, cin=128, cout=4, groups=2, size=(25, 27), kernel=3,
                                                   stride=2, dilation=2, padding=1, output_padding=1)),
    ("ct2d_c8_cout96_30x30", "ct", 2, Cfg(n=1, cin=8, cout=96, size=(30, 30), kernel=3)),
    ("ct3d_c48_k3_9x10x11", "ct", 3, Cfg(n=1, cin=48, cout=3, size=(9, 10, 11), kernel=3, padding=1)),
    # strided 3d with deep columns: short tiles next to the frame's span, so conv reads its windows from a
    # whole-frame copy of the input (use_split), in batch chunks; also the GEMM straight from the windows
    ("conv3d_c16_k4_s2_28x28x30", "conv", 3, Cfg(n=2, cin=16, cout=5, size=(28, 28, 30), kernel=4, stride=2,
                                                 padding=1)),
    ("ct3d_c5_cout16_k4_s2_14x14x15", "ct", 3, Cfg(n=2, cin=5, cout=16, size=(14, 14, 15), kernel=4, stride=2,
                                                    padding=1)),
    # weight gradient tap by tap on the windows: register-blocked with the small tensor's channels as columns
    # (32 and 24 of them), tiles across batch items; in place on a source that is its own frame (stride 1, no
    # padding); dot products for few channels per group; input channels in several window blocks
    ("ct3d_c32_cout16_k4_s2_12x12x13", "ct", 3, Cfg(n=2, cin=32, cout=16, size=(12, 12, 13), kernel=4, stride=2,
                                                     padding=1)),
    ("conv2d_c20_cout24_k3_40x41", "conv", 2, Cfg(n=3, cin=20, cout=24, size=(40, 41), kernel=3)),
    ("ct2d_c16_cout12_g2_k3_s2_33x31", "ct", 2, Cfg(n=2, cin=16, cout=12, groups=2, size=(33, 31), kernel=3,
                                                     stride=2, padding=1, output_padding=1)),
    ("ct3d_c32_cout64_k4_s2_12x12x12", "ct", 3, Cfg(n=1, cin=32, cout=64, size=(12, 12, 12), kernel=4, stride=2,
                                                     padding=1)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name,kind,nd,cfg", MEDIUM, ids=[m[0] for m in MEDIUM])
def test_medium_sizes_multi_tile(name, kind, nd, cfg, dtype, device):
    _run(kind, nd, cfg, dtype, device=device)


@pytest.mark.parametrize("name,kind,nd,cfg", [MEDIUM[1], MEDIUM[5]], ids=[MEDIUM[1][0], MEDIUM[5][0]])
def test_medium_sizes_bfloat16(name, kind, nd, cfg, device):
    _run(kind, nd, cfg, torch.bfloat16, ref_dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------------------
def _forward_backward(kind, nd, cfg, dtype, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours, _ = fn_pair(kind, nd)
        torch.manual_seed(7)
        x, w, b = (t.requires_grad_(True) for t in cfg.tensors(kind, nd, dtype))
        y = ours(x, w, b, **cfg.kwargs(kind, nd))
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), g)
        return (y.detach(),) + grads
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("name,kind,nd,cfg", [MEDIUM[1], MEDIUM[6], MEDIUM[8], MEDIUM[11]],
                         ids=[MEDIUM[1][0], MEDIUM[6][0], MEDIUM[8][0], MEDIUM[11][0]])
def test_deterministic_run_to_run(name, kind, nd, cfg):
    """Bitwise identical forward and gradients across repeated runs and across 1 and 2 threads. CPU-only: it is
    about the intra-op thread count; test_cuda.py::test_deterministic_* covers CUDA."""
    a = _forward_backward(kind, nd, cfg, torch.float32, 2)
    b = _forward_backward(kind, nd, cfg, torch.float32, 2)
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)
    c = _forward_backward(kind, nd, cfg, torch.float32, 1)
    d = _forward_backward(kind, nd, cfg, torch.float32, 1)
    for tc, td in zip(c, d):
        assert torch.equal(tc, td)
    # deterministic by construction: the summation order depends on the shapes only, not on the thread count
    for ta, tc in zip(a, c):
        assert torch.equal(ta, tc)


@pytest.mark.parametrize("kind", ["ct", "conv"])
def test_works_under_deterministic_algorithms(kind, device):
    nd = 2
    cfg = _variants(kind)["asym"]
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _run(kind, nd, cfg, device=device)
    finally:
        torch.use_deterministic_algorithms(old)


def _amx_available():
    was = torch_convt.set_amx(True)
    return torch_convt.set_amx(was)


# bfloat16 GEMMs on AMX tiles or AVX512-BF16 dot products (CPUs that have them): every tile edge. (shape of Y, weight
# shape, stride, padding, output_padding, groups, channels_last)
AMX_CASES = [
    ((2, 256, 8, 8), (256, 40, 4, 4), 2, 1, 0, 1, False),     # grid tiles; weight gradient on tiles (256 rows)
    ((2, 300, 23), (300, 40, 5), 1, 2, 0, 1, False),          # depth 1500: two K blocks; 40 rows: 32 + 8
    ((1, 24, 5, 6, 7), (24, 20, 3, 3, 3), 2, 1, 1, 1, False),  # 20 rows, ragged grids, odd depth
    ((2, 64, 5, 6, 7), (64, 33, 2, 2, 2), 2, 0, 0, 1, False),  # k == s: 264 stacked rows, dense source
    ((2, 40, 9, 13), (40, 24, 3, 3), 2, 1, 1, 1, True),        # channels_last; lines of 13: mapped panels
    ((2, 64, 10, 10), (64, 16, 3, 3), 2, 1, 1, 4, False),      # grouped: 16 + 16 input channels a group
    ((3, 150, 37), (150, 24, 3), 2, 1, 1, 1, False),           # weight gradient: 150 rows (ragged tile), 72 columns
    # stride 1: the forward tap by tap on tiles (conv_transpose_amx_taps)
    ((1, 32, 6, 7, 9), (32, 32, 3, 3, 3), 1, 1, 0, 1, False),   # 32 channels: one K step, 2 x 2 tiles
    ((2, 48, 5, 6, 7), (48, 20, 3, 3, 3), 1, 0, 0, 1, False),   # two K steps (48 of 64 channels), 20 rows: 16 + 4
    ((2, 5, 11, 13), (5, 3, 3, 3), 1, 2, 0, 1, True),           # odd channels, channels_last, output as large as input
    ((1, 64, 40), (64, 40, 7), 1, 3, 0, 2, False),              # 1d, grouped, 40 rows: 32 + 8
    ((1, 16, 12, 12), (16, 24, 3, 3), 1, 3, 0, 1, False),       # padding past the kernel: output smaller than input
    ((1, 32, 9, 8, 10), (32, 32, 3, 3, 3), 1, 2, 0, 1, False, 2),  # dilated
    ((2, 17, 4, 5, 33), (17, 33, 2, 3, 4), 1, (1, 0, 2), 0, 1, False, (2, 1, 3)),  # anisotropic, 17 channels
    # strided, every phase 4 taps or more: the forward phase by phase over one frame copy
    ((1, 32, 5, 6, 7), (32, 16, 4, 4, 4), 2, 1, 0, 1, False),     # k=4, s=2: 8 phases of 8 taps
    ((2, 24, 7, 9), (24, 40, 4, 4), 2, 1, 0, 1, True),            # 2d, 40 rows: 32 + 8, channels_last
    ((2, 16, 3, 6, 11), (16, 33, 3, 5, 2), (2, 1, 1), (0, 4, 2), 0, 1, False),  # the seed's anisotropic layer
    ((1, 64, 13), (64, 24, 12), 3, 2, 1, 2, False),               # 1d, stride 3, grouped, output_padding
    ((1, 20, 4, 5, 6), (20, 18, 5, 5, 4), 2, 2, 1, 1, False, (1, 1, 2)),  # phases of 4 to 12 taps, dilated
    # AVX512-BF16 dot products (8-row blocks of 16-row panels): rows 16 + 3, 16 + 8 + 5, 7; 5 positions a row
    ((2, 32, 5, 7), (32, 19, 3, 3), 2, 1, 0, 1, False),
    ((1, 48, 3, 5), (48, 29, 4, 4), 2, 1, 0, 1, False),
    ((3, 16, 5), (16, 7, 4), 2, 1, 0, 1, False),
]


@pytest.mark.skipif(not _amx_available(), reason="this CPU has neither AMX (granted by the OS) nor AVX512-BF16")
@pytest.mark.parametrize("case", AMX_CASES, ids=[f"case{i}" for i in range(len(AMX_CASES))])
def test_bf16_amx_matches_float64(case):
    """bfloat16 layers on AMX tiles (else AVX512-BF16 dot products) and on the FMA units (set_amx(False)): output, input
    and weight gradients within bfloat16 rounding of the float64 result on the same values (a lost K block, tile or
    edge is off by far more)."""
    in_shape, w_shape, stride, padding, out_pad, groups, cl = case[:7]
    dilation = case[7] if len(case) > 7 else 1
    nd = len(in_shape) - 2
    torch.manual_seed(11)
    y = torch.randn(in_shape).bfloat16()
    if cl:
        y = channels_last(y)
    w = (torch.randn(w_shape) / (w_shape[0] * w_shape[2]) ** 0.5).bfloat16()
    b = torch.randn(w_shape[1] * groups).bfloat16()
    kw = dict(stride=stride, padding=padding, output_padding=out_pad, groups=groups, dilation=dilation)

    def run(fn, dtype, g_out=None):
        yy, ww, bb = (t.detach().to(dtype).requires_grad_() for t in (y, w, b))
        out = fn(yy, ww, bb, **kw)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
        out.backward(g)
        return [t.detach().double() for t in (out, yy.grad, ww.grad)]

    ref = run(torch_ct(nd), torch.float64)
    was = torch_convt.set_amx(True)
    try:
        amx = run(ours_ct(nd), torch.bfloat16)
        torch_convt.set_amx(False)
        fma = run(ours_ct(nd), torch.bfloat16)
    finally:
        torch_convt.set_amx(was)
    for name, r, a, f in zip(("output", "input grad", "weight grad"), ref, amx, fma):
        scale = r.abs().max().item()
        for path, got in (("amx", a), ("fma", f)):
            err = ((got - r).abs() - r.abs() / 128).max().item()
            assert err <= 2e-3 * scale, \
                f"{name} ({path}): off by {err:.3g} beyond bfloat16 rounding (scale {scale:.3g})"


@pytest.mark.skipif(not _amx_available(), reason="this CPU has neither AMX (granted by the OS) nor AVX512-BF16")
@pytest.mark.parametrize("stride,cl", [(3, False), (2, True), (1, True)], ids=["stride3", "cl_stride2", "cl_stride1"])
def test_bf16_amx_weight_grad_window_reads(stride, cl):
    """The tap-by-tap bfloat16 weight gradient on AMX copies its windows as bfloat16: read at the layer's stride (3:
    element by element) and through a channels_last gradient's strides. Within bfloat16 rounding of float64 on the
    same values, on tiles and on the FMA units."""
    torch.manual_seed(7)
    x = torch.randn(2, 24, 9, 11).bfloat16()  # the transposed layer's input (24 channels: the windows' GEMM rows)
    w_shape = [24, 20, 4, 3]
    big = [(n - 1) * stride - 2 + k for n, k in zip((9, 11), (4, 3))]
    g = torch.randn(2, 20, *big).bfloat16()
    if cl:
        g = channels_last(g)
    ref = torch.ops.aten.convolution_backward(g.double(), x.double(), torch.zeros(w_shape, dtype=torch.double), None,
                                              [stride] * 2, [1, 1], [1, 1], True, [0, 0], 1, [False, True, False])[1]
    was = torch_convt.set_amx(True)
    try:
        got = [torch.ops.torch_convt.conv_weight_grad(g, x, w_shape, [stride] * 2, [1, 1], [1, 1], 1)]
        torch_convt.set_amx(False)
        got.append(torch.ops.torch_convt.conv_weight_grad(g, x, w_shape, [stride] * 2, [1, 1], [1, 1], 1))
    finally:
        torch_convt.set_amx(was)
    scale = ref.abs().max().item()
    for path, dw in zip(("amx", "fma"), got):
        err = ((dw.double() - ref).abs() - ref.abs() / 128).max().item()
        assert err <= 2e-3 * scale, f"{path}: off by {err:.3g} beyond bfloat16 rounding (scale {scale:.3g})"


@pytest.mark.skipif(not _amx_available(), reason="this CPU has neither AMX (granted by the OS) nor AVX512-BF16")
@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
def test_bf16_amx_stride1_copies_by_chunks_of_images(cl):
    """Stride-1 bfloat16 layers on AMX copy their input a few images at a time (within 32 MiB): 3 images of 16 MiB
    copies run as 2 + 1, and a conv reading them the same way; every image matches float32 on the same
    values within bfloat16 rounding (an image left out or written twice is off by far more)."""
    torch.manual_seed(5)
    y = torch.randn(3, 64, 50, 50, 50).bfloat16()
    if cl:
        y = channels_last(y)
    w = (torch.randn(64, 16, 1, 1, 1) / 8).bfloat16()
    b = torch.randn(16).bfloat16()
    was = torch_convt.set_amx(True)
    try:
        got = torch_convt.functional.conv_transpose3d(y, w, b)
        back = torch_convt.functional.conv3d(y, w.transpose(0, 1).contiguous())
    finally:
        torch_convt.set_amx(was)
    ref = torch.nn.functional.conv_transpose3d(y.float(), w.float(), b.float())
    ref_back = torch.nn.functional.conv3d(y.float(), w.transpose(0, 1).float())
    for name, g, r in (("conv_transpose3d", got, ref), ("conv3d", back, ref_back)):
        assert g.is_contiguous(memory_format=torch.channels_last_3d) == cl
        err = ((g.double() - r.double()).abs() - r.double().abs() / 128).amax(dim=(1, 2, 3, 4))
        scale = r.abs().max().item()
        assert (err <= 2e-3 * scale).all(), f"{name}: per-image error {err.tolist()} (scale {scale:.3g})"


# ----------------------------------------------------------------------------------------------------------
# Winograd: float32 layers at stride 1 with kernels of 3 along the innermost dim and one more (F(2, 3); dilated ones
# by sub-lattices), conv_transpose at stride 2 with kernel 4 padding 1 or kernel 3 padding 0 or 1 (F(2, 2) phases);
# 16 channels a group or more, AVX-512 or AVX2 CPUs. (kind, input shape, weight shape, padding, groups)
# ----------------------------------------------------------------------------------------------------------
def _winograd_available():
    """Whether this CPU has what the Winograd path needs (AVX-512 F/BW/VL/DQ, FMA, BMI2; or AVX2 and FMA): from the
    CPU's flags, not from the path's results, so that a broken path fails the tests below instead of skipping them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "bmi2"} <= set(flags) or {"avx2", "fma"} <= set(flags)


WINOGRAD_CASES = [
    ("ct", (2, 32, 7, 9, 13), (32, 32, 3, 3, 3), 1, 1),       # odd extents: half tiles at every far edge
    ("ct", (2, 16, 5, 6, 37), (16, 24, 3, 3, 3), 0, 1),       # rows of 20 tiles (runs of 16 + 4), output past the input
    ("ct", (2, 20, 12, 14, 16), (20, 17, 3, 3, 3), 3, 1),     # padding past the kernel (the input cropped), 17 rows
    ("conv", (2, 24, 9, 10, 11), (40, 24, 3, 3, 3), 1, 1),    # 40 rows: panels of the register blocking and a rest
    ("conv", (2, 32, 8, 9, 35), (16, 32, 3, 3, 3), 0, 1),     # no padding: 33-point rows, 16 rows
    ("ct", (3, 32, 17, 40), (32, 48, 3, 3), 1, 1),            # 2d
    ("conv", (4, 64, 23, 30), (64, 32, 3, 3), 2, 2),          # 2d, grouped, padding 2 (output larger than the input)
    ("ct", (2, 32, 12, 7, 30), (32, 16, 3, 1, 3), 1, 1),      # 3 x 1 x 3: tiles of 2 x 1 x 2, padding along the 1
    ("ct", (2, 32, 6, 14, 30), (32, 16, 1, 3, 3), (0, 1, 1), 1),  # 1 x 3 x 3 in 3d
    ("conv", (4, 128, 24, 32), (96, 128, 3, 3), 1, 1),        # 2d, 128 channels in, 96 out
    ("ct", (1, 96, 10, 11, 12), (96, 96, 3, 3, 3), 1, 1),     # 2.4 MB of transformed weights
    # dilated: by sub-lattices (copied in and out), (kind, input, weight, padding, groups, dilation, channels_last)
    ("ct", (1, 32, 20, 20, 20), (32, 32, 3, 3, 3), 2, 1, 2, False),             # 8 sub-lattices of 10^3
    ("ct", (2, 32, 13, 14, 21), (32, 24, 3, 3, 3), 3, 1, (2, 3, 2), False),     # extents the dilations do not divide
    ("conv", (2, 32, 15, 17, 23), (24, 32, 3, 3, 3), (1, 2, 0), 1, (3, 2, 2), True),  # pads per residue, channels_last
    ("ct", (4, 32, 21, 30), (32, 32, 3, 3), 0, 1, 2, False),                    # 2d
    ("conv", (2, 64, 12, 14, 40), (64, 32, 3, 3, 3), 0, 2, (1, 1, 2), False),  # grouped, dilated along x only
    # stride 2: the phases of conv_transpose (its forward; conv's input gradient), (..., dilation, channels_last, kw)
    ("ct", (1, 32, 12, 13, 14), (32, 16, 4, 4, 4), 1, 1, 1, False, dict(stride=2)),  # kernel 4: half tiles at edges
    ("ct", (1, 32, 11, 12, 13), (32, 16, 4, 4, 4), 1, 1, 1, False, dict(stride=2, output_padding=1)),
    ("ct", (6, 32, 15, 17), (32, 32, 4, 4), 1, 1, 1, False, dict(stride=2)),  # 2d (DCGAN's kernel)
    ("ct", (8, 192, 16, 18), (192, 96, 4, 4), 1, 1, 1, False, dict(stride=2)),  # 2.6 MB of transformed weights
    ("conv", (6, 32, 30, 34), (32, 32, 4, 4), 1, 1, 1, False, dict(stride=2)),  # its input gradient
    ("ct", (2, 64, 8, 9, 10), (64, 16, 4, 4, 4), 1, 2, 1, False, dict(stride=2)),  # grouped
    ("ct", (2, 32, 6, 10, 22), (32, 16, 1, 4, 4), (0, 1, 1), 1, 1, False, dict(stride=(1, 2, 2))),  # 1 x 4 x 4
    ("ct", (2, 32, 6, 10, 22), (32, 16, 4, 1, 4), (1, 0, 1), 1, 1, False, dict(stride=(2, 1, 2))),  # 4 x 1 x 4
    ("ct", (1, 32, 13, 14, 15), (32, 24, 3, 3, 3), 1, 1, 1, False, dict(stride=2, output_padding=1)),  # MONAI's
    ("ct", (2, 16, 7, 9, 21), (16, 33, 3, 3, 3), 0, 1, 1, False, dict(stride=2)),  # kernel 3, padding 0, 33 rows
    ("ct", (8, 64, 20, 22), (64, 64, 3, 3), 1, 1, 1, False, dict(stride=2, output_padding=1)),  # 2d kernel 3
    # 1d up-samplers by kernel 2s (vocoders): F(3, 2) on triples of each phase, 384 channels in or more a group
    ("ct", (6, 384, 17), (384, 64, 16), 4, 1, 1, False, dict(stride=8)),  # HiFi-GAN's, odd length: edge tiles
    ("ct", (3, 384, 40), (384, 256, 4), 1, 1, 1, False, dict(stride=2)),  # kernel 4 stride 2
    ("ct", (5, 400, 23), (400, 120, 10), 7, 1, 1, False, dict(stride=5, output_padding=3)),  # padding past s
    ("ct", (4, 768, 30), (768, 128, 8), 2, 2, 1, False, dict(stride=4)),  # grouped
    ("ct", (7, 384, 12), (384, 171, 6), 0, 1, 1, False, dict(stride=3)),  # 513 rows: a ragged panel
]


# (transformed inputs, products, direct multiply-adds) of a tile along a dim, per scheme (winograd.h's table)
_WINO_SIZES = {"k1": (1, 1, 1), "k3": (4, 4, 6), "k2": (3, 3, 4), "t4": (5, 6, 8), "t3": (4, 5, 6)}


def _weight_grad_takes_winograd(w_shape, padding, groups, stride):
    """Whether a layer's weight gradient (undilated, dense rows) takes the Winograd path, by winograd_weight_grad's
    bound: seen as conv at stride 1 (input channels those of conv's input, i.e. of conv_transpose's output) or as
    conv_transpose's phases at stride 2, its products save at least 32 multiply-adds per value the transforms write."""
    nd = len(w_shape) - 2
    k = w_shape[2:]
    st = (stride,) * nd if isinstance(stride, int) else tuple(stride)
    pd = (padding,) * nd if isinstance(padding, int) else tuple(padding)
    cx, cy = w_shape[1], w_shape[0] // groups  # conv_weight_grad's X (the big side) and Y channels, a group
    if all(s == 1 for s in st):
        kinds, ci, co = [{1: "k1", 2: "k2", 3: "k3"}.get(kk) for kk in k], cx, cy
    else:
        kinds = ["k1" if (s, kk) == (1, 1) else "t4" if (s, kk, p) == (2, 4, 1) else
                 "t3" if s == 2 and kk == 3 and p in (0, 1) else None for s, kk, p in zip(st, k, pd)]
        ci, co = cy, cx
    if None in kinds:
        return False
    nv = np_ = macs = 1
    for kind in kinds:
        a, b, c = _WINO_SIZES[kind]
        nv, np_, macs = nv * a, np_ * b, macs * c
    return (macs - np_) * ci * co >= 32 * (nv * ci + np_ * co)


def _winograd_and_direct(kind, x, w, b, kw):
    """Output, input gradient and weight gradient (as float64) of conv ("conv") or conv_transpose ("ct"): torch's in
    float64, ours in float32 with Winograd on, and ours with it off (set_winograd(False)), all on the same values."""
    nd = x.dim() - 2
    ours, ref = (ours_ct(nd), torch_ct(nd)) if kind == "ct" else (ours_conv(nd), torch_conv(nd))

    def run(fn, dtype):
        xx, ww, bb = (t.detach().to(dtype).requires_grad_() for t in (x, w, b))
        out = fn(xx, ww, bb, **kw)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype))
        return [t.detach().double() for t in (out, xx.grad, ww.grad)]

    return (run(ref, torch.float64),) + _with_and_without_winograd(run, ours, torch.float32)


def _with_and_without_winograd(fn, *args, **kw):
    """fn(*args, **kw) with the Winograd path on, then off (set_winograd(False))."""
    was = torch_convt.set_winograd(True)
    try:
        got = fn(*args, **kw)
        torch_convt.set_winograd(False)
        return got, fn(*args, **kw)
    finally:
        torch_convt.set_winograd(was)


def _assert_as_direct(got, direct, huge=False):
    """Results with non-finite values: direct summation's, bit for bit (NaN where it has NaN); with finite values near
    float32's largest (huge): finite, within 1e-5 of direct summation's."""
    if huge:
        assert direct.isfinite().all() and direct.max() > 1e36
        assert got.isfinite().all() and (got - direct).abs().max() <= 1e-5 * direct.max()
        return
    assert torch.equal(got.isnan(), direct.isnan()) and torch.equal(got.isfinite(), direct.isfinite())
    assert got.isfinite().any() and not got.isfinite().all()
    assert torch.equal(got[got.isfinite()], direct[direct.isfinite()])
    assert torch.equal(got[got.isinf()], direct[direct.isinf()])


@pytest.mark.skipif(not _winograd_available(), reason="no AVX-512 or AVX2: float32 layers take direct summation")
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=[f"case{i}" for i in range(len(WINOGRAD_CASES))])
def test_winograd_matches_float64(case):
    """Output, input and weight gradients in float32 by Winograd (the forward and, through conv / conv_transpose, the
    input gradient) within 1e-5 of the largest float64 value on the same inputs, as direct summation is; and not the
    bits of direct summation (set_winograd(False)), so the path was taken. A wrong transform, tile edge or run is off
    by far more."""
    kind, in_shape, w_shape, padding, groups = case[:5]
    dilation, cl, extra = (case[5:] + ({},))[:3] if len(case) > 5 else (1, False, {})
    torch.manual_seed(5)
    x = torch.randn(in_shape)
    if cl:
        x = channels_last(x)
    w = torch.randn(w_shape) / (w_shape[1] * 9) ** 0.5
    b = torch.randn(w_shape[1] * groups if kind == "ct" else w_shape[0])
    kw = dict(padding=padding, groups=groups, dilation=dilation, **extra)
    expected, wino, direct = _winograd_and_direct(kind, x, w, b, kw)
    for name, e, got, d in zip(("output", "input grad", "weight grad"), expected, wino, direct):
        scale = e.abs().max().item()
        assert (got - e).abs().max().item() <= 1e-5 * scale, name
        assert (d - e).abs().max().item() <= 1e-5 * scale, name
    # (at stride 2 only conv_transpose has phases: the output of "ct", the input gradient of "conv")
    strided = extra.get("stride", 1) != 1
    assert (strided and kind == "conv") or not torch.equal(wino[0], direct[0])
    assert (strided and kind == "ct") or not torch.equal(wino[1], direct[1])
    # the weight gradient by the transposed transforms: undilated layers with dense rows where its products save enough
    if dilation == 1 and not cl and x.dim() > 3:
        takes = _weight_grad_takes_winograd(w_shape, padding, groups, extra.get("stride", 1))
        assert torch.equal(wino[2], direct[2]) != takes


@pytest.mark.skipif(not _winograd_available(), reason="no AVX-512 or AVX2: float32 layers take direct summation")
def test_winograd_weight_grad_chunks_of_one_group():
    """The weight gradient by Winograd of a grouped layer whose chunks of blocks mostly hold one group's blocks only
    (batch 1, two groups, 400 tiles an image): a chunk's sums of a group it lacks are zeros, not what the layer
    before left in the reused buffer of partial sums (one runs first)."""
    torch.manual_seed(11)
    before = _winograd_and_direct("ct", torch.randn(8, 256, 16, 16), torch.randn(256, 128, 4, 4) / 45,
                                  torch.randn(128), dict(padding=1, stride=2))
    assert not torch.equal(before[1][2], before[2][2])  # (its weight gradient by Winograd too)
    x, w, b = torch.randn(1, 256, 40, 40), torch.randn(256, 128, 4, 4) / 45, torch.randn(256)
    assert _weight_grad_takes_winograd(tuple(w.shape), 1, 2, 2)
    expected, wino, direct = _winograd_and_direct("ct", x, w, b, dict(padding=1, stride=2, groups=2))
    scale = expected[2].abs().max().item()
    assert (wino[2] - expected[2]).abs().max().item() <= 1e-5 * scale
    assert (direct[2] - expected[2]).abs().max().item() <= 1e-5 * scale
    assert not torch.equal(wino[2], direct[2])


# A conv at stride 2 by kernel 4 (GAN discriminators; the input gradient of kernel-4 stride-2 transposed layers):
# F(2, 2) on each sub-lattice of its input, the sub-lattices copied as channels (wino_strided); and kernel 2 at stride 1.
# (input, weight, padding, groups, stride)
WINOGRAD_STRIDED_CASES = [
    ("conv", (1, 16, 33, 34, 35), (32, 16, 4, 4, 4), 1, 1, 2),      # 3d, odd extents: residues of unequal length
    ("conv", (6, 32, 30, 34), (32, 32, 4, 4), 1, 1, 2),             # 2d (DCGAN's discriminator kernel)
    ("conv", (8, 32, 31, 36), (40, 32, 4, 4), 0, 1, 2),             # padding 0: the residues' copies shifted
    ("conv", (8, 32, 30, 33), (24, 32, 4, 4), (2, 3), 1, 2),         # paddings 2 and 3
    ("conv", (8, 64, 30, 32), (32, 32, 4, 4), 1, 2, 2),             # grouped
    ("conv", (2, 32, 6, 30, 34), (40, 32, 1, 4, 4), (0, 1, 1), 1, (1, 2, 2)),  # a kernel-1 dim at stride 1
    ("conv", (2, 32, 30, 6, 34), (40, 32, 4, 1, 4), (1, 0, 1), 1, (2, 1, 2)),  # 4 x 1 x 4
    ("conv", (8, 128, 32, 32), (192, 128, 4, 4), 1, 1, 2),          # 3.5 MB of transformed weights: blocks of 2 panels
    ("conv", (2, 32, 20, 22, 24), (32, 32, 2, 2, 2), 1, 1, 1),      # kernel 2 at stride 1
    ("ct", (2, 32, 14, 15, 16), (32, 24, 2, 2, 2), 0, 1, 1),        # its transpose (taps reversed)
    ("ct", (10, 256, 12, 14), (256, 128, 4, 4), 1, 1, 2),           # stride-2 kernel 4 transposed, 2-panel blocks
    ("ct", (4, 256, 13, 15), (256, 256, 3, 3), 1, 1, 1),            # F(2, 3) in 2d, 2-panel blocks
]


@pytest.mark.skipif(not _winograd_available(), reason="no AVX-512 or AVX2: float32 layers take direct summation")
@pytest.mark.parametrize("case", WINOGRAD_STRIDED_CASES, ids=[f"case{i}" for i in range(len(WINOGRAD_STRIDED_CASES))])
def test_winograd_strided_conv_matches_float64(case):
    """Output, input and weight gradients within 1e-5 of the largest float64 value, and the output (the layer's
    forward) not the bits of direct summation, so the path was taken."""
    kind, in_shape, w_shape, padding, groups, stride = case
    torch.manual_seed(7)
    x = torch.randn(in_shape)
    w = torch.randn(w_shape) / (w_shape[1] * 16) ** 0.5
    b = torch.randn(w_shape[1] * groups if kind == "ct" else w_shape[0])
    expected, wino, direct = _winograd_and_direct(kind, x, w, b, dict(padding=padding, groups=groups, stride=stride))
    for name, e, got, d in zip(("output", "input grad", "weight grad"), expected, wino, direct):
        scale = e.abs().max().item()
        assert (got - e).abs().max().item() <= 1e-5 * scale, name
        assert (d - e).abs().max().item() <= 1e-5 * scale, name
    assert not torch.equal(wino[0], direct[0])
    # the weight gradient: a conv at stride 2 by kernel 4 as its transpose's phases (padding 1 only)
    assert torch.equal(wino[2], direct[2]) != _weight_grad_takes_winograd(w_shape, padding, groups, stride)


def _winograd_random_cases(count, seed=11):
    """Random layers of the Winograd schemes (stride-1 kernel 3 or 2, stride-2 transposed kernel 4 padding 1 and kernel
    3 padding 0 or 1, conv at stride 2 by kernel 4 with paddings 0 to 3, kernel-1 dims among them), sized around the
    path's bounds, extents from 1 point up."""
    import random
    rng = random.Random(seed)
    schemes = [(1, 3, None), (2, 4, 1), (2, 3, 1), (2, 3, 0), (1, 2, None), (2, 4, "conv")]
    cases = []
    while len(cases) < count:
        stride, k, pad = rng.choice(schemes)
        nd = rng.choice((2, 3, 3))
        kind = "conv" if pad == "conv" or (stride == 1 and rng.random() < 0.3) else "ct"
        pad = rng.randrange(4) if pad == "conv" else pad
        ones = [False] * nd
        if nd == 3 and rng.random() < 0.3:
            ones[rng.randrange(2)] = True  # a kernel-1 dim (never the innermost)
        kernel = tuple(1 if one else k for one in ones)
        strides = tuple(1 if one else stride for one in ones)
        pads = tuple(0 if one else (rng.randrange(3) if pad is None else pad) for one in ones)
        ops = tuple(0 if (one or stride == 1) else rng.randrange(2) for one in ones)
        small = rng.random() < 0.2  # (mostly sizes the path takes; now and then tiny extents)
        size = tuple(rng.randint(1, 6) if one else rng.randint(1 if small else (8 if nd == 3 else 16),
                                                               17 if nd == 3 else 40) for one in ones)
        groups = rng.choice((1, 1, 2))
        ci, co = groups * rng.randint(16, 40), groups * rng.randint(16, 40)
        batch = rng.randint(1, 4)
        w_shape = (ci, co // groups) + kernel if kind == "ct" else (co, ci // groups) + kernel
        if kind == "conv" and any(n + 2 * p < k for n, p, k in zip(size, pads, kernel)):
            continue
        if kind == "ct" and any((n - 1) * t - 2 * p + k + o < 1
                                for n, t, p, k, o in zip(size, strides, pads, kernel, ops)):
            continue
        extra = dict(stride=strides, output_padding=ops) if kind == "ct" else dict(stride=strides)
        cases.append((kind, (batch, ci) + size, w_shape, pads, groups, extra))
    return cases


@pytest.mark.skipif(not _winograd_available(), reason="no AVX-512 or AVX2: float32 layers take direct summation")
def test_winograd_random_layers_match_float64():
    """40 random layers of the Winograd schemes: output and both gradients within 1e-5 of float64 whichever path
    they take, and the Winograd path taken by at least a quarter of them (its bits differ from direct summation's)."""
    taken = 0
    for kind, in_shape, w_shape, padding, groups, extra in _winograd_random_cases(40):
        torch.manual_seed(1)
        x = torch.randn(in_shape)
        w = torch.randn(w_shape) / (w_shape[1] * 9) ** 0.5
        b = torch.randn(w_shape[1] * groups if kind == "ct" else w_shape[0])
        expected, wino, direct = _winograd_and_direct(kind, x, w, b, dict(padding=padding, groups=groups, **extra))
        for name, e, got in zip(("output", "input grad", "weight grad"), expected, wino):
            scale = max(e.abs().max().item(), 1e-30)
            assert (got - e).abs().max().item() <= 1e-5 * scale, (name, kind, in_shape, w_shape, padding, extra)
        taken += not torch.equal(wino[0], direct[0]) or not torch.equal(wino[1], direct[1])
    assert taken >= 10, taken


@pytest.mark.skipif(not _winograd_available(), reason="no AVX-512 or AVX2: float32 layers take direct summation")
def test_winograd_same_bits_any_thread_count():
    x, w = torch.randn(2, 32, 7, 9, 13), torch.randn(32, 24, 3, 3, 3)
    xs, ws = torch.randn(1, 16, 25, 26, 27), torch.randn(32, 16, 4, 4, 4)  # a conv at stride 2 by kernel 4
    x2, w2 = torch.randn(8, 128, 30, 32), torch.randn(192, 128, 4, 4)  # the same in 2d, blocks of 2 panels
    x1, w1 = torch.randn(4, 384, 50), torch.randn(384, 128, 16)  # a 1d up-sampler, blocks of unequal work
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append((torch_convt.functional.conv_transpose3d(x, w, padding=1),
                            torch_convt.functional.conv3d(x, w.transpose(0, 1), padding=1),
                            torch_convt.functional.conv3d(xs, ws, stride=2, padding=1),
                            torch_convt.functional.conv2d(x2, w2, stride=2, padding=1),
                            torch_convt.functional.conv_transpose1d(x1, w1, stride=8, padding=4)))
    finally:
        torch.set_num_threads(old)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, results[0]))


@pytest.mark.skipif(not _winograd_available(), reason="no AVX-512 or AVX2: float32 layers take direct summation")
def test_winograd_weight_grad_same_bits_any_thread_count():
    """The weight gradient by the transposed transforms sums its tiles in chunks fixed by the layer, not by the
    threads: the same bits with 1, 2 and 3 threads (stride-1 kernel 3 in 3d and 2d, DCGAN's kernel 4 at stride 2), and
    not direct summation's (the path was taken)."""
    wg = torch.ops.torch_convt.conv_weight_grad
    layers = [(torch.randn(2, 32, 9, 10, 11), torch.randn(2, 24, 9, 10, 11), (24, 32, 3, 3, 3), [1] * 3, [1] * 3),
              (torch.randn(6, 128, 32, 34), torch.randn(6, 96, 16, 17), (96, 128, 4, 4), [2] * 2, [1] * 2),
              (torch.randn(4, 64, 30, 31), torch.randn(4, 48, 30, 31), (48, 64, 3, 3), [1] * 2, [1] * 2)]
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append([wg(x, y, list(s), st, pd, [1] * len(st), 1) for x, y, s, st, pd in layers])
        was = torch_convt.set_winograd(False)
        try:
            direct = [wg(x, y, list(s), st, pd, [1] * len(st), 1) for x, y, s, st, pd in layers]
        finally:
            torch_convt.set_winograd(was)
    finally:
        torch.set_num_threads(old)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, results[0]))
    for got, d in zip(results[0], direct):
        assert not torch.equal(got, d) and (got - d).abs().max() <= 1e-5 * d.abs().max()


@pytest.mark.skipif(not _winograd_available(), reason="no AVX-512 or AVX2: float32 layers take direct summation")
@pytest.mark.parametrize("where", ["input", "grad_output", "huge"])
@pytest.mark.parametrize("stride", [1, 2])
def test_winograd_weight_grad_non_finite_as_direct(where, stride):
    """The weight gradient's tiles mix their points too: NaN and inf inputs or output gradients give direct summation's
    weight gradient bit for bit (the layer is computed again by it); sums near float32's largest values, finite, give
    finite values within 1e-5 of direct summation's."""
    torch.manual_seed(6)
    wg = torch.ops.torch_convt.conv_weight_grad
    if stride == 1:  # (3d kernel 3; 2d kernel 4 at stride 2, DCGAN's)
        x, y, args = torch.randn(2, 32, 12, 13, 14), torch.randn(2, 24, 12, 13, 14), ([24, 32, 3, 3, 3], [1] * 3)
    else:
        x, y, args = torch.randn(2, 128, 24, 26), torch.randn(2, 96, 12, 13), ([96, 128, 4, 4], [2] * 2)
    if where == "input":
        x[0, 3, 2, 3], x[1, 5, 0, 6] = float("nan"), float("inf")
    elif where == "grad_output":
        y[1, 7, 5, 0] = -float("inf")
    else:  # (sums of 4368 or 312 products near 1e37)
        x, y = torch.rand(x.shape) * 6e35, torch.rand(y.shape) / (64 if stride == 1 else 4)
    args += ([1] * (x.dim() - 2), [1] * (x.dim() - 2), 1)
    _assert_as_direct(*_with_and_without_winograd(wg, x, y, *args), huge=where == "huge")


@pytest.mark.skipif(not _winograd_available(), reason="no AVX-512 or AVX2: float32 layers take direct summation")
@pytest.mark.parametrize("kind", ["ct", "conv", "strided conv"])
@pytest.mark.parametrize("where", ["input", "weight"])
def test_winograd_non_finite_as_direct(kind, where):
    """A tile mixes its inputs, so a NaN or inf would reach outputs it does not contribute to: such layers are computed
    by direct summation, each non-finite value reaching exactly its own outputs (bit for bit the direct result)."""
    torch.manual_seed(2)
    strided = kind == "strided conv"
    x, w, b = torch.randn(2, 32, 10, 12, 14), torch.randn(32, 32, 3, 3, 3) / 16, torch.randn(32)
    if strided:  # (F(2, 2) on the input's sub-lattices)
        x, w = torch.randn(2, 32, 20, 24, 26), torch.randn(32, 32, 4, 4, 4) / 16
    if where == "input":
        x[0, 3, 2, 3, 4], x[1, 5, 0, 6, 8], x[1, 7, 5, 0, 0] = float("nan"), float("inf"), -float("inf")
    else:
        w[4, 5, 1, 2, 0] = float("inf")
    fn = torch_convt.functional.conv_transpose3d if kind == "ct" else torch_convt.functional.conv3d
    _assert_as_direct(*_with_and_without_winograd(fn, x, w, b, padding=1, stride=2 if strided else 1))



@pytest.mark.skipif(not _winograd_available(), reason="no AVX-512 or AVX2: float32 layers take direct summation")
@pytest.mark.parametrize("where", ["input", "weight", "huge"])
def test_winograd_upsample_non_finite_as_direct(where):
    """The 1d up-sampler by kernel 2s (a tile's transformed inputs mix three input points): NaN and inf inputs or
    weights give direct summation's output bit for bit; finite values whose products overflow in the transform give
    finite outputs within 1e-5 of direct summation's."""
    torch.manual_seed(8)
    x, w, b = torch.randn(4, 384, 30), torch.randn(384, 64, 16) / 64, torch.randn(64)
    if where == "input":
        x[0, 3, 0], x[1, 5, 17], x[3, 7, 29] = float("nan"), float("inf"), -float("inf")
    elif where == "weight":
        w[4, 5, 11] = float("inf")
    else:
        x, w, b = torch.rand(4, 384, 30) * 6e37, torch.rand(384, 64, 16) / 768, None
    fn = torch_convt.functional.conv_transpose1d
    _assert_as_direct(*_with_and_without_winograd(fn, x, w, b, stride=8, padding=4), huge=where == "huge")


@pytest.mark.skipif(not _winograd_available(), reason="no AVX-512 or AVX2: float32 layers take direct summation")
def test_winograd_huge_finite_values():
    """Outputs near float32's largest values, all finite, all positive: finite outputs within 1e-5 of direct
    summation's (the Winograd path's finiteness check sums a run's outputs, which overflows here, and the layer is then
    computed by direct summation)."""
    torch.manual_seed(4)
    x, w = torch.rand(1, 32, 12, 12, 12) * 6e37, torch.rand(32, 32, 3, 3, 3) / 64
    got, direct = _with_and_without_winograd(torch_convt.functional.conv_transpose3d, x, w, padding=1)
    assert direct.min() > 1e36
    _assert_as_direct(got, direct, huge=True)

_WIDENED_LAYERS = [  # (function, input, weight, kwargs): 16-bit layers that the Winograd path takes
    (torch_convt.functional.conv_transpose2d, (4, 32, 20, 24), (32, 24, 4, 4), dict(stride=2, padding=1)),
    (torch_convt.functional.conv_transpose2d, (4, 32, 21, 23), (32, 24, 4, 4), dict(stride=2, padding=1)),
    (torch_convt.functional.conv_transpose3d, (2, 16, 8, 9, 10), (16, 16, 3, 3, 3), dict(padding=1)),
    (torch_convt.functional.conv_transpose3d, (2, 24, 13, 12, 11), (24, 16, 3, 3, 3),
     dict(stride=2, padding=1, output_padding=1)),
    (torch_convt.functional.conv2d, (2, 24, 30, 31), (16, 24, 3, 3), dict(padding=1)),
    (torch_convt.functional.conv_transpose1d, (2, 384, 61), (384, 64, 16), dict(stride=8, padding=4)),
]


@pytest.mark.skipif(not _winograd_available(), reason="no AVX-512 or AVX2: float32 layers take direct summation")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer", range(len(_WIDENED_LAYERS)))
def test_winograd_16bit_is_float_rounded_once(layer, dtype):
    """A 16-bit layer that the Winograd path takes (without AMX) computes in float on its widened values: its output
    is, bit for bit, the float32 layer's on those values rounded to the 16-bit type (and within the 16-bit type's
    rounding of float64's), at tile edges and row ends too (masked 16-bit loads and stores). Set_winograd(False)
    gives the 16-bit path's own sums."""
    fn, xs, ws, kw = _WIDENED_LAYERS[layer]
    torch.manual_seed(layer)
    x, w, b = torch.randn(xs).to(dtype), (torch.randn(ws) / 8).to(dtype), torch.randn(ws[1 if "transpose" in
                                                                                        fn.__name__ else 0]).to(dtype)
    x0 = x.clone()
    was, amx = torch_convt.set_winograd(True), torch_convt.set_amx(False)
    try:
        got = fn(x, w, b, **kw)
        wide = fn(x.float(), w.float(), b.float(), **kw)
        torch_convt.set_winograd(False)
        direct = fn(x, w, b, **kw)
    finally:
        torch_convt.set_winograd(was), torch_convt.set_amx(amx)
    assert torch.equal(x, x0)
    assert got.dtype == dtype and got.shape == direct.shape and got.stride() == direct.stride()
    assert torch.equal(got, wide.to(dtype)), (got.float() - wide).abs().max()
    ref = getattr(torch.nn.functional, fn.__name__)(x.double(), w.double(), b.double(), **kw)
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert ((got.double() - ref).abs() <= eps * ref.abs() + 1e-3 * ref.abs().max()).all()
    assert not torch.equal(got, direct)


_REUSE_LAYERS = [  # (function, input, weight, kwargs): Winograd's transformed weights prepared once, then reused
    (torch_convt.functional.conv_transpose3d, (1, 32, 16, 15, 16), (32, 24, 3, 3, 3),
     dict(stride=2, padding=1, output_padding=1)),
    (torch_convt.functional.conv3d, (2, 24, 8, 9, 10), (32, 24, 3, 3, 3), dict(padding=1)),
    (torch_convt.functional.conv3d, (1, 16, 24, 26, 28), (32, 16, 4, 4, 4), dict(stride=2, padding=1)),
    (torch_convt.functional.conv_transpose3d, (1, 32, 16, 16, 16), (32, 32, 3, 3, 3), dict(padding=2, dilation=2)),
    (torch_convt.functional.conv_transpose2d, (8, 64, 20, 22), (64, 32, 3, 3),
     dict(stride=2, padding=1, output_padding=1, groups=2)),  # (a change in the second group's weights is seen)
    (torch_convt.functional.conv_transpose1d, (5, 384, 20), (384, 64, 16), dict(stride=8, padding=4)),  # 1d k = 2s
]


def _in_new_thread(call):
    """call() on a thread of its own: kept transformed weights are per calling thread, so it prepares afresh."""
    out = []
    t = threading.Thread(target=lambda: out.append(call()))
    t.start()
    t.join()
    return out[0]


@pytest.mark.skipif(not _winograd_available(), reason="no AVX-512 or AVX2: float32 layers take direct summation")
@pytest.mark.parametrize("layer", range(len(_REUSE_LAYERS)))
def test_winograd_reused_weights_follow_every_change(layer):
    """Transformed weights are kept for later calls with the same weights (compared byte for byte with a copy): every
    change to the weights, in place and behind autograd's back (.data, one element off the sampled ones, a NaN), gives
    the output of the changed weights, bit for bit what a first call with them gives; unchanged weights give the same
    bits again; same-shape layers alternating and more layers than the cache keeps each give their own output."""
    fn, in_shape, w_shape, kw = _REUSE_LAYERS[layer]
    torch.manual_seed(5)
    x, w = torch.randn(in_shape), torch.randn(w_shape) / 16
    was = torch_convt.set_winograd(True)
    try:
        first = _in_new_thread(lambda: fn(x, w, **kw))
        torch_convt.set_winograd(False)
        assert not torch.equal(fn(x, w, **kw), first)  # (the path is taken)
        torch_convt.set_winograd(True)
        for _ in range(3):  # (the second call copies the weights, the third reuses)
            assert torch.equal(fn(x, w, **kw), first)
        for index in (1, w.numel() - 1, w.numel() // 2 + 7):
            w.data.view(-1)[index] += 0.25  # (no version counter change)
            fresh = _in_new_thread(lambda: fn(x, w, **kw))
            got = fn(x, w, **kw)
            assert torch.equal(got, fresh) and not torch.equal(got, first)
            assert torch.equal(fn(x, w, **kw), fresh)
        w.data.view(-1)[3] = float("nan")
        torch_convt.set_winograd(False)
        direct = fn(x, w, **kw)
        torch_convt.set_winograd(True)
        got = fn(x, w, **kw)
        assert torch.equal(got.isnan(), direct.isnan()) and torch.equal(got[~got.isnan()], direct[~direct.isnan()])
        # same-shape layers in turn, more of them than the cache keeps (32 entries, 64 MiB)
        ws = [torch.randn(w_shape) / 16 for _ in range(3)] + [torch.randn(w_shape) / 16 for _ in range(35)]
        outs = _in_new_thread(lambda: [fn(x, v, **kw) for v in ws])
        for _ in range(2):
            for v, out in zip(ws[:3], outs[:3]):
                assert torch.equal(fn(x, v, **kw), out)
        for _ in range(2):
            for v, out in zip(ws, outs):
                assert torch.equal(fn(x, v, **kw), out)
    finally:
        torch_convt.set_winograd(was)



@pytest.mark.skipif(not _winograd_available(), reason="no AVX-512 or AVX2: float32 layers take direct summation")
def test_winograd_reused_weights_released():
    """empty_cache() releases the kept transformed weights (and says so in its byte count); with set_cache_limit(0)
    none are kept, and the outputs are the same bits."""
    fn, in_shape, w_shape, kw = _REUSE_LAYERS[1]  # (an output under 1 MiB: no output memory kept)
    torch.manual_seed(7)
    x, w = torch.randn(in_shape), torch.randn(w_shape) / 16
    torch_convt.empty_cache()
    first = [fn(x, w, **kw) for _ in range(3)]
    assert torch_convt.empty_cache() >= w.numel() * 4 * 2  # (the transformed weights and the weights' copy)
    assert torch_convt.empty_cache() == 0
    previous = torch_convt.set_cache_limit(0)
    try:
        again = [fn(x, w, **kw) for _ in range(3)]
        assert torch_convt.empty_cache() == 0, "transformed weights kept with a cache limit of 0"
    finally:
        torch_convt.set_cache_limit(previous)
    assert all(torch.equal(a, first[0]) for a in first + again)

@pytest.mark.skipif(not _winograd_available(), reason="no AVX-512 or AVX2: float32 layers take direct summation")
def test_winograd_reused_weights_per_calling_thread():
    """Python threads calling the same layer shape with their own weights at once: each gets its own output."""
    fn, in_shape, w_shape, kw = _REUSE_LAYERS[0]
    torch.manual_seed(6)
    x = torch.randn(in_shape)
    ws = [torch.randn(w_shape) / 16 for _ in range(4)]
    expected = _in_new_thread(lambda: [fn(x, v, **kw) for v in ws])
    bad = []

    def work(i):
        for j in range(12):
            k = (i + j) % len(ws)
            if not torch.equal(fn(x, ws[k], **kw), expected[k]):
                bad.append((i, j))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
