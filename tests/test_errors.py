"""Bad inputs: ours must raise the same exception type as torch.nn.functional (computed at test time), with a
non-empty message; absurd values must fail fast with RuntimeError (run in a subprocess, so a crash or a hang
is reported as a failure instead of killing the suite)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import torch_convt  # noqa: F401
from helpers import DIMS, fn_pair

HERE = os.path.dirname(os.path.abspath(__file__))


def _exc_of(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None


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
def test_bad_inputs_same_exception_type(name, kind, nd):
    args, kwargs = BAD[name][1](kind, nd)
    ours, ref = fn_pair(kind, nd)
    expected = _exc_of(lambda: ref(*args, **kwargs))
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
        expected = _exc_of(lambda: ref(*args))
        if expected is None:
            assert kind == "conv" and dtype != torch.bool
            continue
        assert type(expected) is NotImplementedError
        with pytest.raises(NotImplementedError) as info:
            ours(*args)
        assert type(info.value) is NotImplementedError and str(info.value)


@pytest.mark.parametrize("nd", DIMS, ids=[f"{d}d" for d in DIMS])
def test_ct_bias_dtype_mismatch(nd):
    """torch's conv_transpose{1,2}d accept a float64 bias with float32 input (3d raises RuntimeError): ours must
    raise the same type where torch raises, and otherwise either match torch or raise RuntimeError."""
    x, w, b = _base("ct", nd)
    b = b.double()
    ours, ref = fn_pair("ct", nd)
    expected = _exc_of(lambda: ref(x, w, b))
    got = _exc_of(lambda: ours(x, w, b))
    if expected is not None:
        assert type(got) is type(expected), (got, expected)
    elif got is not None:
        assert type(got) is RuntimeError and str(got)
    else:
        torch.testing.assert_close(ours(x, w, b), ref(x, w, b))


@pytest.mark.parametrize("kind", ["ct", "conv"])
def test_error_leaves_no_state_behind(kind):
    """A failing call must not break later valid calls."""
    nd = 2
    x, w, b = _base(kind, nd)
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
    """Runs every absurd case in a child process; restarts after a crash/hang with the remaining cases."""
    results, crashed = {}, {}
    remaining = [c["id"] for c in absurd_runner.CASES]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    root = os.path.dirname(HERE)
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


@pytest.mark.parametrize("case", absurd_runner.CASES, ids=[c["id"] for c in absurd_runner.CASES])
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
def test_module_forward_errors_same_type(nd, kind, what):
    from helpers import ours_conv_module, ours_ct_module, torch_conv_module, torch_ct_module
    ours_cls, torch_cls = ((ours_ct_module(nd), torch_ct_module(nd)) if kind == "ct"
                           else (ours_conv_module(nd), torch_conv_module(nd)))
    torch.manual_seed(0)
    ours = ours_cls(2, 4, 3, groups=2)
    torch.manual_seed(0)
    ref = torch_cls(2, 4, 3, groups=2)
    x = MODULE_BAD_INPUTS[what](nd)
    expected = _exc_of(lambda: ref(x))
    assert expected is not None
    with pytest.raises(Exception) as info:
        ours(x)
    assert type(info.value) is type(expected), (info.value, expected)
    assert str(info.value).strip()
