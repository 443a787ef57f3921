"""Property-based tests (hypothesis).

Differential fuzzing against torch.nn.functional:
  * test_fuzz_*_matches_torch draw random VALID configurations -- 1d/2d/3d, stride, padding, output_padding,
    dilation, dense/grouped/depthwise, bias or not, batched/unbatched/empty batch, contiguous/channels_last/
    strided/reversed layouts of input, weight, bias and grad_output, float64/float32/bfloat16, sizes around the
    GEMM tile edges (now and then 40-70 channels, 1d lengths in the hundreds, K = channels x taps past 384) --
    and compare the forward result and every gradient (input, weight, bias) with torch computed in float64 on
    the same values (for bfloat16: the bfloat16-rounded values), at a tolerance fitting the dtype.
  * test_fuzz_*_invalid_args_same_exception draw POSSIBLY INVALID arguments (non-positive stride/dilation/groups,
    negative padding, output_padding too large, groups not dividing the channels, wrong ranks, kernels larger
    than the padded input, bad bias, wrong list lengths, ...): whatever torch rejects, ours rejects with the
    same exception type; whatever torch accepts, ours computes the same.

Bounded by default (derandomized: the same examples on every run, see conftest.py). Long mode:
    TORCH_CONVT_FUZZ_EXAMPLES=10000 python -m pytest tests/test_properties.py -k fuzz
runs that many examples per fuzz test (and per device); TORCH_CONVT_FUZZ_SEED=<int> draws a different
(reproducible) set of examples than the default derandomized one. A failure prints the smallest failing
configuration and a reproduction blob.

Plus algebraic identities that must hold for ours alone (CPU): adjointness of conv and conv_transpose, groups as
a concatenation, linearity and batch independence.
"""
import math
import os
import warnings

import pytest
import torch
from hypothesis import event, example, given, seed, settings
from hypothesis import strategies as st

from helpers import (DEVICES, channels_last, check_parity, conv_out_size, ct_out_size, ct_valid, conv_valid, exc_of,
                     fn_pair, make_tensor, ours_conv, ours_ct, reversed_layout, strided_view, torch_conv)

# ----------------------------------------------------------------------------------------------------------
# example counts: bounded in the default suite, TORCH_CONVT_FUZZ_EXAMPLES=N for a long run
# ----------------------------------------------------------------------------------------------------------
FUZZ_EXAMPLES_ENV = "TORCH_CONVT_FUZZ_EXAMPLES"
FUZZ_SEED_ENV = "TORCH_CONVT_FUZZ_SEED"
LONG_EXAMPLES = int(os.environ.get(FUZZ_EXAMPLES_ENV) or 0)


def fuzz_settings(default_examples: int):
    """settings(max_examples=...) for a fuzz test: `default_examples` in the default suite, the count of
    TORCH_CONVT_FUZZ_EXAMPLES in long mode; with TORCH_CONVT_FUZZ_SEED, a fixed seed other than the default."""
    def apply(test):
        test = settings(max_examples=LONG_EXAMPLES or default_examples)(test)
        if os.environ.get(FUZZ_SEED_ENV):
            test = seed(int(os.environ[FUZZ_SEED_ENV]))(test)
        return test
    return apply


# Tolerances against a float64 reference, as (rtol, atol relative to max(1, max|reference|)):
#   float64   both sides compute in float64, in different orders;
#   float32   accumulation over up to a few thousand float32 products;
#   bfloat16  float32 accumulation and one rounding to bfloat16 (relative error <= 2^-9) per result: 2^-7
#             leaves a factor of 4 for the accumulation, and catches accumulation in bfloat16 itself.
FUZZ_TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (2.0 ** -7, 2.0 ** -7),
}
FUZZ_DTYPES = list(FUZZ_TOLERANCES)

LAYOUTS = ("contiguous", "channels_last", "strided", "reversed")


def with_layout(t: torch.Tensor, layout: str, batched: bool = True) -> torch.Tensor:
    """`t` with the same values laid out as `layout`. channels_last: torch's memory format for batched 4-d/5-d
    tensors; otherwise the channel dim (0 when unbatched) is made the innermost one by a permuted copy."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "strided":
        return strided_view(t)
    if layout == "reversed":
        return reversed_layout(t)
    assert layout == "channels_last", layout
    if batched or t.dim() < 2:
        return channels_last(t) if t.dim() >= 3 else t.contiguous()
    return t.movedim(0, -1).contiguous().movedim(-1, 0)


# Channel counts around the GEMM register-tile edges (6/12 rows, 16/32 columns) and bigger.
BIG_CHANNELS = (5, 6, 7, 11, 12, 13, 16, 17, 24, 31, 32, 33, 40, 47, 48, 64, 70)
# Multiply-adds of one pass (forward, or one of the gradients): bigger draws are shrunk to this, so that one
# example stays well under a second on 2 cores, float64 reference included.
MAX_MACS = 8_000_000


# ----------------------------------------------------------------------------------------------------------
# valid configurations
# ----------------------------------------------------------------------------------------------------------
def _repair(kind, size, kernel, stride, padding, output_padding, dilation):
    """Smallest change that makes a drawn configuration valid: enlarge the input until the conv output is not
    empty, lower the padding until the conv_transpose output is not empty."""
    if kind == "conv":
        size = tuple(max(i, d * (k - 1) + 1 - 2 * p) for i, k, p, d in zip(size, kernel, padding, dilation))
    else:
        padding = tuple(min(p, ((i - 1) * s + d * (k - 1) + op) // 2)
                        for p, i, k, s, op, d in zip(padding, size, kernel, stride, output_padding, dilation))
    return size, padding


def _macs(kind, n, cin, cout, groups, size, kernel, stride, padding, output_padding, dilation):
    """Multiply-adds of one pass: positions of the small tensor x taps x small channels x big channels per group
    (the small tensor is the conv_transpose input, the conv output)."""
    if kind == "ct":
        small, small_channels, big_channels = size, cin, cout
    else:
        small = [max(1, conv_out_size(*v)) for v in zip(size, kernel, stride, padding, dilation)]
        small_channels, big_channels = cout, cin
    return max(n, 1) * math.prod(small) * math.prod(kernel) * small_channels * (big_channels // groups)


@st.composite
def fuzz_cases(draw, kind: str):
    """One random valid call of ``kind`` ('ct': conv_transpose, 'conv') with its tensors' dtype and layouts."""
    nd = draw(st.integers(1, 3))
    big = draw(st.integers(0, 5)) == 0  # now and then: tile edges, several column tiles, K past one block
    grouping = draw(st.sampled_from(["dense", "dense", "grouped", "depthwise"]))
    channels = st.sampled_from(BIG_CHANNELS) if big else st.integers(1, 7)
    if grouping == "dense":
        groups, in_g, out_g = 1, draw(channels), draw(channels)
    elif grouping == "grouped":
        groups = draw(st.integers(2, 4))
        in_g = draw(st.integers(1, 17 if big else 3))
        out_g = draw(st.integers(1, 17 if big else 3))
    else:  # depthwise: one input channel per group, a channel multiplier of 1-2
        groups, in_g, out_g = draw(st.integers(1, 40 if big else 8)), 1, draw(st.integers(1, 2))
    cin, cout = groups * in_g, groups * out_g

    max_size = {1: 700, 2: 40, 3: 12}[nd] if big else {1: 24, 2: 10, 3: 5}[nd]
    size = tuple(draw(st.integers(1, max_size)) for _ in range(nd))
    max_kernel = 7 if (big and nd == 1) else 5 if big else 4
    kernel = tuple(draw(st.integers(1, max_kernel)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 4)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    padding = tuple(draw(st.integers(0, 4)) for _ in range(nd))
    if kind == "ct":
        output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    else:
        output_padding = (0,) * nd

    batch = draw(st.sampled_from(["batched"] * 4 + ["unbatched", "empty"]))
    n = {"batched": draw(st.integers(1, 2 if big else 3)), "unbatched": 1, "empty": 0}[batch]

    # bound the work: halve the largest input dim until one pass is cheap enough
    size = list(size)
    while _macs(kind, n, cin, cout, groups, size, kernel, stride, padding, output_padding, dilation) > MAX_MACS \
            and max(size) > 1:
        j = size.index(max(size))
        size[j] = (size[j] + 1) // 2
    size, padding = _repair(kind, tuple(size), kernel, stride, padding, output_padding, dilation)
    if kind == "ct":
        assert ct_valid(size, kernel, stride, padding, output_padding, dilation)
    else:
        assert conv_valid(size, kernel, stride, padding, dilation)

    return dict(
        kind=kind, nd=nd, n=n, batch=batch, cin=cin, cout=cout, groups=groups, size=size, kernel=kernel,
        stride=stride, padding=padding, output_padding=output_padding, dilation=dilation,
        bias=draw(st.booleans()),
        dtype=draw(st.sampled_from(FUZZ_DTYPES)),
        x_layout=draw(st.sampled_from(LAYOUTS)), w_layout=draw(st.sampled_from(LAYOUTS)),
        grad_layout=draw(st.sampled_from(LAYOUTS)), bias_strided=draw(st.booleans()),
        scalar_args=draw(st.booleans()),  # pass ints instead of tuples when all dims agree
    )


def _maybe_scalar(t, scalar):
    return t[0] if scalar and len(set(t)) == 1 else t


def _call_kwargs(case):
    sc = case["scalar_args"]
    kw = dict(stride=_maybe_scalar(case["stride"], sc), padding=_maybe_scalar(case["padding"], sc),
              dilation=_maybe_scalar(case["dilation"], sc), groups=case["groups"])
    if case["kind"] == "ct":
        kw["output_padding"] = _maybe_scalar(case["output_padding"], sc)
    return kw


def _out_shape(case):
    if case["kind"] == "ct":
        spatial = tuple(ct_out_size(*v) for v in zip(case["size"], case["kernel"], case["stride"], case["padding"],
                                                     case["output_padding"], case["dilation"]))
    else:
        spatial = tuple(conv_out_size(*v) for v in zip(case["size"], case["kernel"], case["stride"],
                                                       case["padding"], case["dilation"]))
    lead = () if case["batch"] == "unbatched" else (case["n"],)
    return lead + (case["cout"],) + spatial


def _case_tensors(case, device):
    """(input, weight, bias, grad_output) in the case's dtype and layouts. Values are drawn in float64 and rounded
    to the dtype, so the float64 reference sees exactly the values ours sees."""
    dtype, kind = case["dtype"], case["kind"]
    lead = () if case["batch"] == "unbatched" else (case["n"],)
    x = make_tensor(lead + (case["cin"],) + case["size"], dtype, device=device)
    if kind == "ct":
        w_shape = (case["cin"], case["cout"] // case["groups"]) + case["kernel"]
    else:
        w_shape = (case["cout"], case["cin"] // case["groups"]) + case["kernel"]
    w = make_tensor(w_shape, dtype, device=device)
    b = make_tensor((case["cout"],), dtype, device=device) if case["bias"] else None
    g = make_tensor(_out_shape(case), dtype, device=device)
    batched = case["batch"] != "unbatched"
    x = with_layout(x, case["x_layout"], batched)
    w = with_layout(w, case["w_layout"])
    g = with_layout(g, case["grad_layout"], batched)
    if b is not None and case["bias_strided"]:
        b = strided_view(b)
    return x, w, b, g


def _assert_matches_reference(got, want, dtype, what):
    """`got` (dtype) against the float64 reference `want`, at FUZZ_TOLERANCES[dtype]."""
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    rtol, atol = FUZZ_TOLERANCES[dtype]
    want = want.to(torch.float64)
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.to(torch.float64), want, rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def _record_coverage(case):
    """hypothesis events (pytest --hypothesis-show-statistics): how often the drawn cases reach the tile edges."""
    kind = case["kind"]
    taps = 1
    for k in case["kernel"]:
        taps *= k
    event(f"dtype {str(case['dtype']).replace('torch.', '')}")
    event(f"batch {case['batch']}")
    if case["cin"] // case["groups"] * taps > 384:
        event("input channels per group x taps > 384")
    if max(case["cin"], case["cout"]) >= 40:
        event("40+ channels")
    if case["nd"] == 1 and case["size"][0] >= 100:
        event("1d length >= 100")


def run_differential(case, device):
    """Forward and all gradients of ours against torch.nn.functional in float64 on the same values."""
    kind, nd = case["kind"], case["nd"]
    ours, ref = fn_pair(kind, nd)
    kwargs = _call_kwargs(case)
    x, w, b, g = _case_tensors(case, device)
    given_tensors = [t for t in (x, w, b, g) if t is not None]
    snapshots = [t.clone() for t in given_tensors]  # (clone keeps the values; checked below with equal)

    def leaves(reference):
        # the reference runs on contiguous float64 copies: the layouts are there to test ours, and torch's own
        # float64 CPU convolution has layout bugs (e.g. a permuted weight gradient for a grouped conv2d with an
        # unbatched channels-innermost input and a channels_last weight)
        return [None if t is None else (t.detach().to(torch.float64).contiguous() if reference else t.detach())
                .requires_grad_(True) for t in (x, w, b)]

    rx, rw, rb = leaves(True)
    want = ref(rx, rw, rb, **kwargs)
    ox, ow, ob = leaves(False)
    got = ours(ox, ow, ob, **kwargs)
    assert tuple(got.shape) == _out_shape(case)
    _assert_matches_reference(got.detach(), want.detach(), case["dtype"], "forward")

    ref_leaves = [t for t in (rx, rw, rb) if t is not None]
    our_leaves = [t for t in (ox, ow, ob) if t is not None]
    want_grads = torch.autograd.grad(want, ref_leaves, g.detach().to(torch.float64).contiguous(), allow_unused=True)
    got_grads = torch.autograd.grad(got, our_leaves, g, allow_unused=True)
    for name, leaf, gv, wv in zip(("input", "weight", "bias"), our_leaves, got_grads, want_grads):
        # torch gives no gradient (None) where nothing flows (empty batch); ours must then be zero or None
        wv = torch.zeros(leaf.shape, dtype=torch.float64, device=leaf.device) if wv is None else wv
        gv = torch.zeros_like(leaf) if gv is None else gv
        _assert_matches_reference(gv, wv, case["dtype"], f"grad_{name}")

    for t, snap in zip(given_tensors, snapshots):
        assert torch.equal(t, snap), "an input or grad_output was modified"


def explicit_case(kind, nd, **fields):
    """A fuzz case written out by hand (defaults: batched, float32, contiguous, no bias)."""
    case = dict(kind=kind, nd=nd, n=1, batch="batched", groups=1, stride=(1,) * nd, padding=(0,) * nd,
                output_padding=(0,) * nd, dilation=(1,) * nd, bias=False, dtype=torch.float32,
                x_layout="contiguous", w_layout="contiguous", grad_layout="contiguous", bias_strided=False,
                scalar_args=False)
    case.update(fields)
    return case


# Run on every run besides the drawn ones: the big GEMM edges that random draws reach only now and then. Cin x
# taps past one K block of 384 (twice), output channels past the 6/12-row register tiles, positions past
# several 16/32-column panels, 40-70 channels.
EXPLICIT_CT_CASES = [
    explicit_case("ct", 1, n=2, cin=70, cout=13, size=(300,), kernel=(7,), padding=(3,), bias=True),
    explicit_case("ct", 2, cin=48, cout=12, size=(13, 11), kernel=(3, 3), stride=(2, 2), padding=(1, 1),
                  output_padding=(1, 1), dtype=torch.bfloat16, x_layout="channels_last", bias=True),
    explicit_case("ct", 3, n=2, groups=40, cin=40, cout=80, size=(5, 4, 6), kernel=(2, 2, 2), stride=(2, 2, 2),
                  x_layout="strided", grad_layout="channels_last", bias=True),
]
EXPLICIT_CONV_CASES = [
    explicit_case("conv", 1, cin=64, cout=33, size=(400,), kernel=(7,), stride=(2,), dilation=(2,),
                  padding=(5,), x_layout="channels_last", bias=True),
    explicit_case("conv", 3, cin=40, cout=7, size=(6, 7, 5), kernel=(3, 3, 3), padding=(1, 1, 1),
                  dtype=torch.float64, w_layout="reversed"),
    explicit_case("conv", 2, n=2, groups=70, cin=70, cout=70, size=(17, 19), kernel=(3, 3), padding=(1, 1),
                  dtype=torch.bfloat16, bias=True, bias_strided=True),
    # found by a long run: torch's float64 weight gradient is wrong on these layouts (ours is right), so the
    # reference must run on contiguous copies
    explicit_case("conv", 2, batch="unbatched", groups=2, cin=4, cout=2, size=(1, 2), kernel=(1, 2),
                  dtype=torch.float64, x_layout="channels_last", w_layout="channels_last"),
]


def _with_examples(cases):
    def apply(test):
        for case in reversed(cases):
            test = example(case=case)(test)
        return test
    return apply


@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(300)
@given(case=fuzz_cases("ct"))
@_with_examples(EXPLICIT_CT_CASES)
def test_fuzz_conv_transpose_matches_torch(device, case):
    _record_coverage(case)
    run_differential(case, device)


@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(300)
@given(case=fuzz_cases("conv"))
@_with_examples(EXPLICIT_CONV_CASES)
def test_fuzz_conv_matches_torch(device, case):
    _record_coverage(case)
    run_differential(case, device)


# ----------------------------------------------------------------------------------------------------------
# possibly invalid arguments: the same exception type as torch, or the same result
# ----------------------------------------------------------------------------------------------------------
@st.composite
def possibly_invalid_calls(draw, kind: str):
    """Arguments of one call, each usually plausible and now and then wrong; the weight/bias shapes are drawn
    so that channel mismatches and groups that do not divide the channels come up often."""
    nd = draw(st.integers(1, 3))
    often = lambda good, bad: draw(st.one_of(good, bad) if draw(st.integers(0, 3)) == 0 else good)  # noqa: E731

    groups = often(st.integers(1, 3), st.integers(-1, 4))
    cin = often(st.sampled_from([groups * c for c in (1, 2)] if groups > 0 else [2]), st.integers(0, 6))
    out_g = often(st.integers(1, 3), st.integers(0, 3))
    x_rank = often(st.just(nd + 2), st.sampled_from([nd + 1, nd + 1, nd, nd + 3, 1]))
    w_rank = often(st.just(nd + 2), st.sampled_from([nd + 1, nd + 3]))
    size = [often(st.integers(1, 6), st.integers(0, 8)) for _ in range(max(x_rank - 2, 0))]
    kernel = [often(st.integers(1, 4), st.integers(0, 9)) for _ in range(max(w_rank - 2, 0))]
    if kind == "ct":
        w0 = often(st.just(cin), st.integers(0, 6))  # weight (in, out / groups, *kernel)
        w_shape = [w0, out_g] + kernel
        n_out = out_g * max(groups, 1)
    else:
        w0 = often(st.just(out_g * max(groups, 1)), st.integers(0, 6))  # weight (out, in / groups, *kernel)
        w_shape = [w0, often(st.just(cin // groups if groups > 0 else cin), st.integers(0, 4))] + kernel
        n_out = w0
    w_shape = w_shape[:w_rank]
    x_shape = ([draw(st.integers(0, 2))] if x_rank == nd + 2 else []) + [cin] + size
    x_shape = x_shape[:x_rank] if x_rank >= 1 else []

    def hyper(lo_good, hi_good, lo_bad, hi_bad):
        """An int or a list of ints (now and then of the wrong length), each usually in [lo_good, hi_good]."""
        one = lambda: often(st.integers(lo_good, hi_good), st.integers(lo_bad, hi_bad))  # noqa: E731
        if draw(st.booleans()):
            return one()
        value = tuple(one() for _ in range(nd))
        if draw(st.integers(0, 7)) == 0:
            value = value + (value[-1],) if draw(st.booleans()) else value[:-1]
        return value

    kwargs = dict(stride=hyper(1, 3, -1, 4), padding=hyper(0, 3, -1, 6), dilation=hyper(1, 2, -1, 3),
                  groups=groups)
    if kind == "ct":
        kwargs["output_padding"] = hyper(0, 1, -1, 4)
    elif draw(st.integers(0, 5)) == 0:
        kwargs["padding"] = draw(st.sampled_from(["same", "valid", "full"]))
    bias = draw(st.sampled_from(["none", "good", "good", "wrong_length", "2d"]))
    bias_shape = {"none": None, "good": [n_out], "wrong_length": [n_out + 1], "2d": [n_out, 1]}[bias]
    return dict(kind=kind, nd=nd, x_shape=x_shape, w_shape=w_shape, bias_shape=bias_shape, kwargs=kwargs)


def _torch_index_error_on_empty(expected, x, w):
    """torch's shortcut for an empty batch fails inside (IndexError from a select() on the empty weight) instead
    of checking the arguments; ours checks them and raises RuntimeError."""
    return isinstance(expected, IndexError) and "select()" in str(expected) and x.numel() == 0 and w.numel() == 0


def run_invalid_args(call, device):
    """Ours raises what torch raises; where torch computes a result, ours computes the same, with two documented
    exceptions that concern empty tensors only:
      * torch skips its hyper-parameter checks for an empty input (empty batch or spatial dim): it accepts e.g.
        dilation 0, output_padding >= stride or a kernel larger than the input there. Ours validates the
        arguments whatever the batch size, so it may raise RuntimeError where torch returns an empty tensor;
      * conv with 0 input channels: torch returns a tensor with 0 channels, ours the bias broadcast over the
        right number of output channels (test_parity.py::test_conv_zero_input_channels);
      * a transposed convolution whose output size comes out 0: torch raises RuntimeError on the CPU but its
        CUDA path returns an empty tensor. Ours raises RuntimeError on every device, as torch does on the CPU."""
    kind, nd = call["kind"], call["nd"]
    ours, ref = fn_pair(kind, nd)
    x = make_tensor(call["x_shape"], device=device)
    w = make_tensor(call["w_shape"], device=device)
    b = None if call["bias_shape"] is None else make_tensor(call["bias_shape"], device=device)
    kwargs = call["kwargs"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (padding='same' with an even kernel)
        expected = exc_of(lambda: ref(x, w, b, **kwargs))
        got = exc_of(lambda: ours(x, w, b, **kwargs))
        if expected is None:
            if got is not None and x.numel() == 0 and type(got) is RuntimeError:
                return  # an empty input with arguments torch does not check (see above)
            if got is not None and device != "cpu" and kind == "ct":
                want = ref(x, w, b, **kwargs)
                cpu_expected = exc_of(lambda: ref(x.cpu(), w.cpu(), None if b is None else b.cpu(), **kwargs))
                if want.numel() == 0 and 0 in want.shape[2:] and type(cpu_expected) is type(got):
                    return  # an output size of 0, which torch rejects on the CPU only (see above)
            assert got is None, f"torch accepts this call, ours raised {type(got).__name__}: {got}"
            want = ref(x, w, b, **kwargs)
            out = ours(x, w, b, **kwargs)
            if kind == "conv" and x.shape[-nd - 1] == 0 and out.shape != want.shape:
                # 0 input channels (see above): the bias (or zero) at every output position
                assert want.shape[-nd - 1] == 0 and out.shape[-nd - 1] == w.shape[0]
                bias = 0.0 if b is None else b.reshape((-1,) + (1,) * nd)
                torch.testing.assert_close(out, torch.zeros_like(out) + bias, rtol=0, atol=0)
                return
            assert out.shape == want.shape
            torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        elif _torch_index_error_on_empty(expected, x, w):
            assert type(got) is RuntimeError, f"ours raised {type(got).__name__}({got}) for an empty input"
        else:
            assert got is not None, f"torch raises {type(expected).__name__}({expected}), ours returned a result"
            assert type(got) is type(expected), \
                f"ours raised {type(got).__name__}({got}) but torch raises {type(expected).__name__}({expected})"
            assert str(got).strip(), "empty error message"


@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(300)
@given(call=possibly_invalid_calls("ct"))
def test_fuzz_conv_transpose_invalid_args_same_exception(device, call):
    run_invalid_args(call, device)


@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(300)
@given(call=possibly_invalid_calls("conv"))
def test_fuzz_conv_invalid_args_same_exception(device, call):
    run_invalid_args(call, device)


# ----------------------------------------------------------------------------------------------------------
# float64 configurations for the string-padding and algebraic-identity tests
# ----------------------------------------------------------------------------------------------------------
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
    return dict(nd=nd, n=n, cin=cin, cout=cout, groups=groups, size=size, kernel=kernel, stride=stride,
                dilation=dilation, padding=padding, output_padding=output_padding, bias=bias)


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
