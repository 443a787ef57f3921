"""torch.nn.functional-compatible transposed and regular convolutions, computed by torch_convt's own kernels.

Same signatures, defaults, argument forms (int or tuple), unbatched inputs and errors as
torch.nn.functional.conv_transpose{1,2,3}d and conv{1,2,3}d.
"""
import warnings

import torch
import torch.nn.functional as F

from . import ops

__all__ = ["conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "conv1d", "conv2d", "conv3d"]


def _expand(name, fn, value, dims):
    """int or sequence of ints -> list of `dims` ints (a 1-element sequence is broadcast, as torch does)."""
    def is_int(v):
        return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)

    if is_int(value):
        values = [value]
    elif isinstance(value, (tuple, list, torch.Size)) and all(is_int(v) for v in value):
        values = list(value)
    else:
        raise TypeError(f"{fn}(): argument '{name}' must be tuple of ints, not {type(value).__name__}")
    for v in values:
        if isinstance(v, int) and not -2**63 <= v < 2**63:
            raise ValueError(f"{fn}(): argument '{name}' value {v} does not fit in int64 (overflow)")
    return values * dims if len(values) == 1 else values  # a wrong length is reported by the op


def _batched(fn, input, dims):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{fn}(): argument 'input' (position 1) must be Tensor, not {type(input).__name__}")
    if input.dim() not in (dims + 1, dims + 2):
        raise RuntimeError(f"Expected {dims + 1}D (unbatched) or {dims + 2}D (batched) input to {fn}, "
                           f"but got input of size: {list(input.shape)}")
    return input.dim() == dims + 2


def _conv_transpose(dims, fn, input, weight, bias, stride, padding, output_padding, groups, dilation):
    batched = _batched(fn, input, dims)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and weight.shape[1] == 0:
        # torch.nn refuses a transposed convolution with no output channels; so do we
        raise RuntimeError(f"{fn}: expected weight to have at least 1 output channel per group at dimension 1, "
                           f"but got weight of size {list(weight.shape)}")
    out = ops.conv_transpose(
        input if batched else input.unsqueeze(0), weight, bias,
        _expand("stride", fn, stride, dims), _expand("padding", fn, padding, dims),
        _expand("output_padding", fn, output_padding, dims), _expand("dilation", fn, dilation, dims), groups)
    return out if batched else out.squeeze(0)


def _same_padding(fn, input, weight, stride, dilation, dims):
    """padding='same' as torch defines it: total padding dilation*(k-1), the odd extra on the right (an
    explicit zero pad of the input, as torch does)."""
    if any(s != 1 for s in stride):
        raise RuntimeError("padding='same' is not supported for strided convolutions")
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[-dims:])]
    left = [t // 2 for t in total]
    extra = [t - 2 * l for t, l in zip(total, left)]
    if any(extra):
        if not torch.compiler.is_compiling():  # (Dynamo cannot trace warnings.warn; torch warns from C++)
            warnings.warn("Using padding='same' with even kernel lengths and odd dilation may require a "
                          "zero-padded copy of the input be created", UserWarning, stacklevel=4)
        pad = []
        for e in reversed(extra):
            pad += [0, e]
        input = F.pad(input, pad)
    return input, left


def _conv(dims, fn, input, weight, bias, stride, padding, dilation, groups):
    batched = _batched(fn, input, dims)
    x = input if batched else input.unsqueeze(0)
    stride = _expand("stride", fn, stride, dims)
    dilation = _expand("dilation", fn, dilation, dims)
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0] * dims
        elif padding == "same":
            x, padding = _same_padding(fn, x, weight, stride, dilation, dims)
        else:
            raise RuntimeError(f"Invalid padding string: '{padding}'")
    else:
        padding = _expand("padding", fn, padding, dims)
    out = ops.conv(x, weight, bias, stride, padding, dilation, groups)
    return out if batched else out.squeeze(0)


def conv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Like torch.nn.functional.conv_transpose1d."""
    return _conv_transpose(1, "conv_transpose1d", input, weight, bias, stride, padding, output_padding, groups,
                           dilation)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Like torch.nn.functional.conv_transpose2d."""
    return _conv_transpose(2, "conv_transpose2d", input, weight, bias, stride, padding, output_padding, groups,
                           dilation)


def conv_transpose3d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Like torch.nn.functional.conv_transpose3d."""
    return _conv_transpose(3, "conv_transpose3d", input, weight, bias, stride, padding, output_padding, groups,
                           dilation)


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Like torch.nn.functional.conv1d (padding may be 'same' or 'valid')."""
    return _conv(1, "conv1d", input, weight, bias, stride, padding, dilation, groups)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Like torch.nn.functional.conv2d (padding may be 'same' or 'valid')."""
    return _conv(2, "conv2d", input, weight, bias, stride, padding, dilation, groups)


def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Like torch.nn.functional.conv3d (padding may be 'same' or 'valid')."""
    return _conv(3, "conv3d", input, weight, bias, stride, padding, dilation, groups)
