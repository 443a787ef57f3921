"""Bad inputs: ours must raise the same exception type as torch.nn.functional (computed at test time, on the same
device), with a non-empty message; absurd values must fail fast with RuntimeError (run in a subprocess, so a crash
or a hang is reported as a failure instead of killing the suite).

Device-generic tests take the ``device`` fixture (conftest.py). CPU-only: the integer/bool dtype test (CPU
semantics; the CUDA counterpart is test_integer_dtypes_cuda_same_exception_type) and most absurd values (a few
have a CUDA twin, id prefix ``cuda-``). CUDA-only: mixing devices."""
import json
import os
import subprocess
import sys

import pytest
import torch

import torch_convt  # noqa: F401
from helpers import (exc_of, CUDA_AVAILABLE, CUDA_ONLY, DIMS, assert_close, fn_pair, ours_conv_module, ours_ct_module,
                     requires_cuda, to_device, torch_conv_module, torch_ct_module)

HERE = os.path.dirname(os.path.abspath(__file__))


def _base(kind, nd, dtype=torch.float32):
    x = torch.randn((1, 2) + (5,) * nd, dtype=dtype)
    if kind == "ct":
        w = torch.randn((2, 3) + (3,) * nd, dtype=dtype)
    else:
        w = torch.randn((3, 2) + (3,) * nd, dtype=dtype)
    b = torch.randn(3, dtype=dtype)
    return x, w, b


# name -> (kinds, builder). Builders return (args, kwargs) for functional(*args, **kwargs).
def _mk(kind, nd, **kw):
    x, w, b = _base(kind, nd)
    return (x, w, b), kw


BAD = {
    "input_rank_too_low": ("ct conv", lambda k, nd: ((_base(k, nd)[0][0, 0], _base(k, nd)[1]), {})),
    "input_rank_too_high": ("ct conv", lambda k, nd: ((_base(k, nd)[0][None], _base(k, nd)[1]), {})),
    "input_rank_0d": ("ct conv", lambda k, nd: ((torch.tensor(1.0), _base(k, nd)[1]), {})),
    "weight_rank_low": ("ct conv", lambda k, nd: ((_base(k, nd)[0], _base(k, nd)[1][0]), {})),
    "weight_rank_high": ("ct conv", lambda k, nd: ((_base(k, nd)[0], _base(k, nd)[1][None]), {})),
    "channel_mismatch": ("ct conv", lambda k, nd: (
        (_base(k, nd)[0], torch.randn((3, 3) + (3,) * nd)), {})),
    "groups_not_dividing": ("ct conv", lambda k, nd: _mk(k, nd, groups=3 if k == "ct" else 2)),
    "groups_mismatch_channels": ("ct conv", lambda k, nd: (
        (torch.randn((1, 4) + (5,) * nd), torch.randn((4, 2) + (3,) * nd)), dict(groups=4 if k == "conv" else 3))),
    "groups_zero": ("ct conv", lambda k, nd: _mk(k, nd, groups=0)),
    "groups_negative": ("ct conv", lambda k, nd: _mk(k, nd, groups=-1)),
    "stride_zero": ("ct conv", lambda k, nd: _mk(k, nd, stride=0)),
    "stride_negative": ("ct conv", lambda k, nd: _mk(k, nd, stride=-1)),
    "stride_one_dim_zero": ("ct conv", lambda k, nd: _mk(k, nd, stride=(1,) * (nd - 1) + (0,))),
    "dilation_zero": ("ct conv", lambda k, nd: _mk(k, nd, dilation=0)),
    "dilation_negative": ("ct conv", lambda k, nd: _mk(k, nd, dilation=-2)),
    "padding_negative": ("ct conv", lambda k, nd: _mk(k, nd, padding=-1)),
    "padding_one_dim_negative": ("ct conv", lambda k, nd: _mk(k, nd, padding=(0,) * (nd - 1) + (-1,))),
    "stride_list_too_long": ("ct conv", lambda k, nd: _mk(k, nd, stride=(1,) * (nd + 1))),
    "padding_list_too_long": ("ct conv", lambda k, nd: _mk(k, nd, padding=(0,) * (nd + 1))),
    "dilation_list_too_long": ("ct conv", lambda k, nd: _mk(k, nd, dilation=(1,) * (nd + 1))),
    "output_padding_negative": ("ct", lambda k, nd: _mk(k, nd, stride=2, output_padding=-1)),
    "output_padding_eq_stride": ("ct", lambda k, nd: _mk(k, nd, stride=2, output_padding=2)),
    "output_padding_ge_stride_and_dilation": ("ct", lambda k, nd: _mk(k, nd, stride=2, dilation=2,
                                                                     output_padding=2)),
    "output_padding_stride1": ("ct", lambda k, nd: _mk(k, nd, output_padding=1)),
    "output_padding_list_too_long": ("ct", lambda k, nd: _mk(k, nd, stride=2, output_padding=(1,) * (nd + 1))),
    "output_size_negative_ct": ("ct", lambda k, nd: _mk(k, nd, padding=4)),
    "output_size_zero_ct": ("ct", lambda k, nd: (  # (5-1) - 2*3 + (2-1) + 1 == 0 in the last dim
        (_base(k, nd)[0], torch.randn((2, 3) + (3,) * (nd - 1) + (2,))), dict(padding=(0,) * (nd - 1) + (3,)))),
    "output_size_nonpositive_conv_dilation": ("conv", lambda k, nd: _mk(k, nd, dilation=3)),
    "output_size_nonpositive_conv_kernel": ("conv", lambda k, nd: (
        (_base(k, nd)[0], torch.randn((3, 2) + (6,) * nd)), {})),
    "same_padding_strided": ("conv", lambda k, nd: _mk(k, nd, padding="same", stride=2)),
    "padding_string_unknown": ("conv", lambda k, nd: _mk(k, nd, padding="full")),
    "input_weight_dtype_mismatch": ("ct conv", lambda k, nd: (
        (_base(k, nd)[0], _base(k, nd)[1].double()), {})),
    "input_int_weight_float": ("ct conv", lambda k, nd: (
        (_base(k, nd)[0].long(), _base(k, nd)[1]), {})),
    "input_complex_weight_real": ("ct conv", lambda k, nd: (
        (_base(k, nd)[0].to(torch.complex64), _base(k, nd)[1]), {})),
    "bias_dtype_mismatch_conv": ("conv", lambda k, nd: (
        (_base(k, nd)[0], _base(k, nd)[1], _base(k, nd)[2].double()), {})),
    "bias_wrong_numel": ("ct conv", lambda k, nd: (
        (_base(k, nd)[0], _base(k, nd)[1], torch.randn(4)), {})),
    "bias_2d": ("ct conv", lambda k, nd: ((_base(k, nd)[0], _base(k, nd)[1], torch.randn(3, 1)), {})),
    "bias_0d": ("ct conv", lambda k, nd: ((_base(k, nd)[0], _base(k, nd)[1], torch.tensor(1.0)), {})),
    "zero_spatial_input": ("ct conv", lambda k, nd: (
        (torch.randn((1, 2) + (0,) * nd), _base(k, nd)[1]), {})),
    "zero_spatial_input_one_dim": ("ct conv", lambda k, nd: (
        (torch.randn((1, 2) + (5,) * (nd - 1) + (0,)), _base(k, nd)[1]), {})),
    "zero_spatial_input_padded": ("conv", lambda k, nd: (
        (torch.randn((1, 2) + (0,) * nd), _base(k, nd)[1]), dict(padding=2))),
    "zero_spatial_unbatched": ("ct conv", lambda k, nd: (
        (torch.randn((2,) + (0,) * nd), _base(k, nd)[1]), {})),
    "zero_kernel": ("ct conv", lambda k, nd: (
        (_base(k, nd)[0], torch.randn((2, 3) + (0,) * nd) if k == "ct" else torch.randn((3, 2) + (0,) * nd)), {})),
    "zero_out_channels_weight": ("ct conv", lambda k, nd: (
        (_base(k, nd)[0], torch.randn((2, 0) + (3,) * nd) if k == "ct" else torch.randn((0, 2) + (3,) * nd)), {})),
    "zero_in_channels_ct": ("ct", lambda k, nd: (
        (torch.randn((1, 0) + (5,) * nd), torch.randn((0, 3) + (3,) * nd)), {})),
    "stride_2e63_overflows_python_int": ("ct conv", lambda k, nd: _mk(k, nd, stride=2 ** 63)),
    "stride_float": ("ct conv", lambda k, nd: _mk(k, nd, stride=1.5)),
    "input_not_a_tensor": ("ct conv", lambda k, nd: (([[1.0]], _base(k, nd)[1]), {})),
}


def _bad_cases():
    out = []
    for name, (kinds, _) in BAD.items():
        for kind in kinds.split():
            for nd in DIMS:
                out.append(pytest.param(name, kind, nd, id=f"{kind}{nd}d-{name}"))
    return out


@pytest.mark.parametrize("name,kind,nd", _bad_cases())
def test_bad_inputs_same_exception_type(name, kind, nd, device):
    args, kwargs = BAD[name][1](kind, nd)
    args = to_device(args, device)
    ours, ref = fn_pair(kind, nd)
    expected = exc_of(lambda: ref(*args, **kwargs))
    if expected is None and device != "cpu":
        # torch's CUDA convolution accepts what its CPU one rejects: ours may agree with it or reject it with a
        # RuntimeError (the rule of test_ct_bias_dtype_mismatch)
        got = exc_of(lambda: ours(*args, **kwargs))
        if got is None:
            assert_close(ours(*args, **kwargs), ref(*args, **kwargs))
        else:
            assert type(got) is RuntimeError and str(got).strip(), got
        return
    assert expected is not None, f"test-case error: torch accepts {name}"
    with pytest.raises(Exception) as info:
        ours(*args, **kwargs)
    got = info.value
    assert type(got) is type(expected), \
        f"ours raised {type(got).__name__}({got}) but torch raises {type(expected).__name__}({expected})"
    assert str(got).strip(), "empty error message"


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.int16, torch.int8, torch.uint8],
                         ids=["bool", "int32", "int16", "int8", "uint8"])
@pytest.mark.parametrize("kind", ["ct", "conv"])
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_unsupported_dtypes_same_exception_type(nd, kind, dtype):
    """bool is rejected by both ops; conv_transpose rejects the small integer types (NotImplementedError)."""
    x, w, b = _base(kind, nd)
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    ours, ref = fn_pair(kind, nd)
    for args in ((x, w), (x, w, b)):
        expected = exc_of(lambda: ref(*args))
        if expected is None:
            assert kind == "conv" and dtype != torch.bool
            continue
        assert type(expected) is NotImplementedError
        with pytest.raises(NotImplementedError) as info:
            ours(*args)
        assert type(info.value) is NotImplementedError and str(info.value)


@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_ct_bias_dtype_mismatch(nd, device):
    """torch's conv_transpose{1,2}d accept a float64 bias with float32 input (3d raises RuntimeError): ours must
    raise the same type where torch raises, and otherwise either match torch or raise RuntimeError."""
    x, w, b = to_device(_base("ct", nd), device)
    b = b.double()
    ours, ref = fn_pair("ct", nd)
    expected = exc_of(lambda: ref(x, w, b))
    got = exc_of(lambda: ours(x, w, b))
    if expected is not None:
        assert type(got) is type(expected), (got, expected)
    elif got is not None:
        assert type(got) is RuntimeError and str(got)
    else:
        torch.testing.assert_close(ours(x, w, b), ref(x, w, b))


@pytest.mark.parametrize("kind", ["ct", "conv"])
def test_error_leaves_no_state_behind(kind, device):
    """A failing call must not break later valid calls."""
    nd = 2
    x, w, b = to_device(_base(kind, nd), device)
    ours, ref = fn_pair(kind, nd)
    with pytest.raises(RuntimeError):
        ours(x, w, b, stride=0)
    torch.testing.assert_close(ours(x, w, b), ref(x, w, b))


# ----------------------------------------------------------------------------------------------------------
# absurd values (subprocess)
# ----------------------------------------------------------------------------------------------------------
sys.path.insert(0, HERE)
import absurd_runner  # noqa: E402

_PER_RUN_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def absurd_results():
    """Runs every absurd case in a child process; restarts after a crash/hang with the remaining cases. The CUDA
    cases run only where there is a GPU (their tests are skipped otherwise)."""
    results, crashed = {}, {}
    remaining = [c["id"] for c in absurd_runner.CASES if CUDA_AVAILABLE or c.get("device", "cpu") == "cpu"]
    root = os.path.dirname(HERE)
    # the child imports this checkout's torch_convt, whatever is installed
    env = dict(os.environ, OMP_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    while remaining:
        cmd = [sys.executable, os.path.join(HERE, "absurd_runner.py")] + remaining
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PER_RUN_TIMEOUT_S, cwd=root,
                                  env=env)
            out, err, why = proc.stdout, proc.stderr, f"process exited with code {proc.returncode}"
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            why = f"hung: no result within {_PER_RUN_TIMEOUT_S}s"
        current = None
        for line in out.splitlines():
            if line.startswith("START "):
                current = line[6:]
            elif line.startswith("RESULT "):
                r = json.loads(line[7:])
                results[r["id"]] = r
                current = None
        done = set(results) | set(crashed)
        if current is not None:
            crashed[current] = f"{why}; stderr tail:\n{err[-2000:]}"
        elif "DONE" not in out:
            # died before starting any case (e.g. import failure): mark everything as failed
            for cid in remaining:
                crashed[cid] = f"{why}; stderr tail:\n{err[-2000:]}"
        done = set(results) | set(crashed)
        remaining = [cid for cid in remaining if cid not in done]
    return results, crashed


def _absurd_params():
    out = []
    for c in absurd_runner.CASES:
        marks = [requires_cuda, pytest.mark.cuda] if c.get("device", "cpu") == "cuda" else []
        out.append(pytest.param(c, id=c["id"], marks=marks))
    return out


@pytest.mark.parametrize("case", _absurd_params())
def test_absurd_values(case, absurd_results):
    results, crashed = absurd_results
    cid = case["id"]
    assert cid not in crashed, f"{cid} crashed or hung the process: {crashed[cid]}"
    r = results[cid]
    assert r["secs"] < absurd_runner.TIME_LIMIT_S, f"{cid} took {r['secs']:.1f}s"
    if case["expect"] == "raise":
        assert r["status"] == "raised", f"{cid}: expected RuntimeError, got a result of shape {r.get('shape')}" \
                                        f" on {r.get('device')} ({case.get('note', '')})"
        assert r["is_runtime_error"], f"{cid}: raised {r['type']}: {r['msg']}"
        assert r["msg"].strip()
    else:
        assert r["status"] == "ok", f"{cid}: raised {r.get('type')}: {r.get('msg')}"
        assert r["match"], f"{cid}: result differs from torch (shape {r['shape']} vs {r['want_shape']})"


# ----------------------------------------------------------------------------------------------------------
# module forward errors
# ----------------------------------------------------------------------------------------------------------
MODULE_BAD_INPUTS = {
    "wrong_channels": lambda nd: torch.randn((1, 3) + (5,) * nd),
    "rank_too_low": lambda nd: torch.randn((5,) * nd),
    "rank_too_high": lambda nd: torch.randn((1, 1, 2) + (5,) * nd),
    "dtype_mismatch": lambda nd: torch.randn((1, 2) + (5,) * nd, dtype=torch.float64),
    "zero_spatial": lambda nd: torch.randn((1, 2) + (0,) * nd),
}


@pytest.mark.parametrize("what", list(MODULE_BAD_INPUTS), ids=list(MODULE_BAD_INPUTS))
@pytest.mark.parametrize("kind", ["ct", "conv"])
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_module_forward_errors_same_type(nd, kind, what, device):
    ours_cls, torch_cls = ((ours_ct_module(nd), torch_ct_module(nd)) if kind == "ct"
                           else (ours_conv_module(nd), torch_conv_module(nd)))
    torch.manual_seed(0)
    ours = ours_cls(2, 4, 3, groups=2).to(device)
    torch.manual_seed(0)
    ref = torch_cls(2, 4, 3, groups=2).to(device)
    x = MODULE_BAD_INPUTS[what](nd).to(device)
    expected = exc_of(lambda: ref(x))
    assert expected is not None
    with pytest.raises(Exception) as info:
        ours(x)
    assert type(info.value) is type(expected), (info.value, expected)
    assert str(info.value).strip()


# ----------------------------------------------------------------------------------------------------------
# CUDA-specific errors (skipped without a GPU)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool],
                         ids=["int64", "int32", "int16", "int8", "uint8", "bool"])
@pytest.mark.parametrize("kind", ["ct", "conv"])
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_integer_dtypes_cuda_same_exception_type(nd, kind, dtype, device):
    """The CUDA backend has no integer (or bool) kernels, like torch's CUDA convolutions: ours must raise the
    exception type torch raises on CUDA, and the failure must not poison later CUDA calls."""
    x, w, b = (t.to(device=device, dtype=dtype) for t in _base(kind, nd))
    ours, ref = fn_pair(kind, nd)
    for args in ((x, w), (x, w, b)):
        expected = exc_of(lambda: ref(*args))
        if expected is None:  # (torch computes it after all: then ours must agree)
            assert torch.equal(ours(*args), ref(*args))
            continue
        with pytest.raises(Exception) as info:
            ours(*args)
        assert type(info.value) is type(expected), (info.value, expected)
        assert str(info.value).strip()
    xf, wf, bf = to_device(_base(kind, nd), device)
    torch.testing.assert_close(ours(xf, wf, bf), ref(xf, wf, bf))


MIXED = {
    # name -> (kind, which argument stays on the CPU)
    "ct-weight_cpu": ("ct", "weight"),
    "ct-bias_cpu": ("ct", "bias"),
    "ct-input_cpu": ("ct", "input"),
    "conv-weight_cpu": ("conv", "weight"),
    "conv-bias_cpu": ("conv", "bias"),
    "conv-input_cpu": ("conv", "input"),
}


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
@pytest.mark.parametrize("case", list(MIXED), ids=list(MIXED))
def test_mixed_devices_raise_runtime_error(case, nd, device):
    """A CPU tensor mixed with CUDA ones (e.g. a CPU weight with a CUDA input) is a RuntimeError, as in torch -- not
    a crash or an illegal memory access; later CUDA calls still work."""
    kind, which = MIXED[case]
    x, w, b = _base(kind, nd)
    on = dict(input=x.to(device), weight=w.to(device), bias=b.to(device))
    on[which] = dict(input=x, weight=w, bias=b)[which]
    ours, ref = fn_pair(kind, nd)
    expected = exc_of(lambda: ref(on["input"], on["weight"], on["bias"]))
    with pytest.raises(RuntimeError) as info:
        ours(on["input"], on["weight"], on["bias"])
    assert type(info.value) is RuntimeError, info.value
    assert str(info.value).strip()
    # (Some torch builds raise NotImplementedError here, a RuntimeError subclass, because the CPU input picks a
    # CPU-only kernel that then finds no CUDA implementation; a plain device error is what that stands for.)
    if expected is not None and not isinstance(expected, NotImplementedError):
        assert type(info.value) is type(expected), (info.value, expected)
    torch.cuda.synchronize()
    xd, wd, bd = to_device((x, w, b), device)
    torch.testing.assert_close(ours(xd, wd, bd), ref(xd, wd, bd))


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("which", ["first_arg_cpu", "second_arg_cpu"])
def test_mixed_devices_raw_ops_raise_runtime_error(which, device):
    """The raw ops, conv_weight_grad included, check devices too (also with autograd recording)."""
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(3, 2, 3, 3)
    gy = torch.randn(1, 3, 3, 3)
    xd, wd, gyd = x.to(device), w.to(device), gy.to(device)
    s, p, d = [1, 1], [0, 0], [1, 1]
    calls = {
        "conv": lambda a, b: torch.ops.torch_convt.conv(a, b, None, s, p, d, 1),
        # (gy: 3 channels in, weight (3, 2, 3, 3): 2 channels out -- valid but for the devices)
        "conv_transpose": lambda a, b: torch.ops.torch_convt.conv_transpose(a, b, None, s, p, [0, 0], d, 1),
        "conv_weight_grad": lambda a, b: torch.ops.torch_convt.conv_weight_grad(a, b, [3, 2, 3, 3], s, p, d, 1),
    }
    args = {
        "conv": (x, wd) if which == "first_arg_cpu" else (xd, w),
        "conv_transpose": (gy, wd) if which == "first_arg_cpu" else (gyd, w),
        "conv_weight_grad": (x, gyd) if which == "first_arg_cpu" else (xd, gy),
    }
    for name, fn in calls.items():
        for rg in (False, True):
            a, b = (t.detach().clone().requires_grad_(rg) for t in args[name])
            with pytest.raises(RuntimeError) as info:
                fn(a, b)
            assert type(info.value) is RuntimeError and str(info.value).strip(), (name, info.value)
    torch.cuda.synchronize()
    # the same calls with everything on the GPU are valid
    torch.testing.assert_close(calls["conv"](xd, wd), torch.nn.functional.conv2d(xd, wd))
    torch.testing.assert_close(calls["conv_transpose"](gyd, wd), torch.nn.functional.conv_transpose2d(gyd, wd))
    assert calls["conv_weight_grad"](xd, gyd).shape == (3, 2, 3, 3)
