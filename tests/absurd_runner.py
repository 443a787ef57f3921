"""Runs the 'absurd argument' cases of test_errors.py in a separate process.

Each case could crash (segfault), hang or try to allocate exabytes if the implementation does not check its
arguments, so test_errors.py runs this file once in a subprocess (with a timeout) and reads one JSON line per
case from its stdout. Not collected by pytest (the name does not start with ``test_``).

Expectations:
  "raise"      ours must raise RuntimeError quickly (torch raises too, or returns garbage because it silently
               truncates the value to 32 bits -- noted per case),
  "match"      the call is mathematically valid: ours must succeed and equal torch (or ``ref_kwargs``).

A few "raise" cases have a CUDA twin (``device: "cuda"``, id prefixed ``cuda-``): the tensors are moved to the GPU
before the call (the argument checks are shared, but the CUDA kernels' launch path is not). test_errors.py runs
them only where torch sees a GPU.
"""
import json
import sys
import time

BIG = 2 ** 62
MAX = 2 ** 63 - 1
TIME_LIMIT_S = 5.0


def _cases():
    cases = []
    for nd in (1, 2, 3):
        ct = lambda cid, kw, exp="raise", note="": cases.append(  # noqa: E731
            dict(id=f"ct{nd}d-{cid}", fn="ct", nd=nd, kwargs=kw, expect=exp, note=note))
        cv = lambda cid, kw, exp="raise", note="", **more: cases.append(  # noqa: E731
            dict(id=f"conv{nd}d-{cid}", fn="conv", nd=nd, kwargs=kw, expect=exp, note=note, **more))
        ct("stride_2e62", dict(stride=BIG), note="output size overflows int64")
        ct("stride_max", dict(stride=MAX))
        ct("padding_2e62", dict(padding=BIG))
        ct("padding_2e31", dict(padding=2 ** 31), note="negative output size")
        ct("dilation_2e62", dict(dilation=BIG), note="effective kernel overflows int64")
        ct("dilation_max", dict(dilation=MAX))
        ct("stride_op_2e62", dict(stride=BIG, output_padding=BIG - 1))
        ct("output_padding_2e62", dict(output_padding=BIG))
        if nd >= 2:
            ct("stride_2e40", dict(stride=2 ** 40), note="numel overflows int64")
        cv("padding_2e62", dict(padding=BIG))
        cv("padding_2e61", dict(padding=2 ** 61), note="numel / bytes overflow int64")
        if nd >= 2:
            cv("padding_2e40", dict(padding=2 ** 40), note="numel overflows int64")
        cv("dilation_2e62", dict(dilation=BIG),
           note="effective kernel > input (torch truncates the dilation to 32 bits and returns garbage)")
        cv("dilation_max", dict(dilation=MAX), note="torch returns garbage (overflow)")
        cv("dilation_2e31", dict(dilation=2 ** 31))
        cv("stride_2e62", dict(stride=BIG), exp="match", note="valid: a single output position")
        cv("stride_max", dict(stride=MAX), exp="match", note="valid: a single output position")
        cv("stride_2e62_padding_1", dict(stride=BIG, padding=1), exp="match")
        cv("dilation_2e62_kernel1", dict(dilation=BIG), exp="match", kernel=1, ref_kwargs=dict(dilation=1),
           note="valid: kernel 1 ignores the dilation")
        cv("meta_weight", dict(), meta="weight", note="torch silently returns garbage")
        cv("meta_bias", dict(), meta="bias")
        ct("meta_weight", dict(), note="torch silently returns garbage")
        cases[-1]["meta"] = "weight"
        ct("meta_bias", dict())
        cases[-1]["meta"] = "bias"
    # raw ops
    cases.append(dict(id="op_conv_transpose-stride_2e62", fn="op_ct", nd=2, kwargs=dict(stride=BIG),
                      expect="raise"))
    cases.append(dict(id="op_conv-padding_2e62", fn="op_conv", nd=2, kwargs=dict(padding=BIG), expect="raise"))
    cases.append(dict(id="op_conv-dilation_2e62", fn="op_conv", nd=3, kwargs=dict(dilation=BIG),
                      expect="raise"))
    cases.append(dict(id="op_conv_weight_grad-huge_weight", fn="op_wg", nd=2, kwargs=dict(), expect="raise",
                      weight_size=[BIG, 2, 3, 3]))
    cases.append(dict(id="op_conv_weight_grad-huge_kernel", fn="op_wg", nd=2, kwargs=dict(), expect="raise",
                      weight_size=[3, 2, BIG, 3]))
    cases.append(dict(id="op_conv_weight_grad-dilation_2e62", fn="op_wg", nd=1, kwargs=dict(dilation=BIG),
                      expect="raise", weight_size=[3, 2, 3]))
    cases.append(dict(id="op_conv_transpose-meta_weight", fn="op_ct", nd=2, kwargs=dict(), expect="raise",
                      meta="weight"))
    # CUDA twins of a few "raise" cases (cheap: each fails in the argument checks before any launch)
    by_id = {c["id"]: c for c in cases}
    for cid in ("ct2d-stride_2e62", "ct2d-padding_2e31", "ct2d-stride_2e40", "ct3d-dilation_2e62",
                "conv2d-padding_2e61", "conv2d-dilation_2e31", "conv2d-meta_weight",
                "op_conv_weight_grad-huge_weight"):
        assert by_id[cid]["expect"] == "raise", cid
        cases.append(dict(by_id[cid], id="cuda-" + cid, device="cuda"))
    return cases


CASES = _cases()


def _run_case(case):
    import torch
    import torch.nn.functional as F

    import torch_convt  # noqa: F401
    import torch_convt.functional as TF

    nd = case["nd"]
    k = case.get("kernel", 3)
    x = torch.randn((1, 2) + (5,) * nd)
    if case["fn"] in ("ct", "op_ct"):
        w = torch.randn((2, 3) + (k,) * nd)
    else:
        w = torch.randn((3, 2) + (k,) * nd)
    b = torch.randn(3)
    device = case.get("device", "cpu")
    if device != "cpu":
        x, w, b = x.to(device), w.to(device), b.to(device)
    if case.get("meta") == "weight":
        w = w.to("meta")
    elif case.get("meta") == "bias":
        b = b.to("meta")
    kw = case["kwargs"]
    fn = case["fn"]

    def lists(**defaults):
        out = []
        for name, dflt in defaults.items():
            out.append([kw.get(name, dflt)] * nd)
        return out

    if fn == "ct":
        ours = lambda kws: TF.__dict__[f"conv_transpose{nd}d"](x, w, b, **kws)  # noqa: E731
        ref = lambda kws: F.__dict__[f"conv_transpose{nd}d"](x, w, b, **kws)  # noqa: E731
    elif fn == "conv":
        ours = lambda kws: TF.__dict__[f"conv{nd}d"](x, w, b, **kws)  # noqa: E731
        ref = lambda kws: F.__dict__[f"conv{nd}d"](x, w, b, **kws)  # noqa: E731
    elif fn == "op_ct":
        s, p, op, d = lists(stride=1, padding=0, output_padding=0, dilation=1)
        ours = lambda kws: torch.ops.torch_convt.conv_transpose(x, w, b, s, p, op, d, 1)  # noqa: E731
        ref = None
    elif fn == "op_conv":
        s, p, d = lists(stride=1, padding=0, dilation=1)
        ours = lambda kws: torch.ops.torch_convt.conv(x, w, b, s, p, d, 1)  # noqa: E731
        ref = None
    elif fn == "op_wg":
        s, p, d = lists(stride=1, padding=0, dilation=1)
        gy = torch.randn((1, 3) + (3,) * nd).to(device)
        ours = lambda kws: torch.ops.torch_convt.conv_weight_grad(x, gy, case["weight_size"], s, p, d, 1)  # noqa
        ref = None
    else:
        raise AssertionError(fn)

    res = dict(id=case["id"])
    t0 = time.perf_counter()
    try:
        out = ours(kw)
        res["status"] = "ok"
        res["shape"] = list(out.shape)
        res["device"] = str(out.device)
        if case["expect"] == "match":
            want = ref(dict(kw, **case.get("ref_kwargs", {})))
            res["match"] = bool(out.shape == want.shape and torch.allclose(out, want, rtol=1e-5, atol=1e-5))
            res["want_shape"] = list(want.shape)
    except Exception as e:  # noqa: BLE001
        res["status"] = "raised"
        res["type"] = type(e).__name__
        res["is_runtime_error"] = isinstance(e, RuntimeError) and not isinstance(e, NotImplementedError)
        res["msg"] = str(e)[:300]
    res["secs"] = time.perf_counter() - t0
    return res


def main():
    import torch
    torch.set_num_threads(2)
    only = set(sys.argv[1:])
    for case in CASES:
        if only and case["id"] not in only:
            continue
        print("START " + case["id"], flush=True)
        print("RESULT " + json.dumps(_run_case(case)), flush=True)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
