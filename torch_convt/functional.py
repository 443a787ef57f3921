"""torch.nn.functional-compatible transposed and regular convolutions, computed by torch_convt's own kernels.

Same signatures, defaults, argument forms (int or tuple), unbatched inputs and errors as
torch.nn.functional.conv_transpose{1,2,3}d and conv{1,2,3}d.

Beyond torch, conv_transpose{1,2,3}d also take
- padding='valid' (padding 0) and padding='same': the output is exactly input * stride long in every spatial dim
  (TensorFlow/Keras conv_transpose 'SAME'); output_padding must then be 0. With extent = dilation*(kernel-1)+1,
  the full output ((input-1)*stride + extent) is cropped by total = extent - stride positions, total // 2 at the
  start and the rest at the end (an odd total crops the extra position at the end); when extent < stride nothing
  is cropped and the last stride - extent positions are ones no input reaches (zeros, plus bias). With
  padding_mode='zeros', an odd total makes the result a view narrowed from a one-longer output (no copy).
- a keyword-only padding_mode='zeros' | 'reflect' | 'replicate' | 'circular' (after torch's arguments, so
  positional calls stay torch's): the exact adjoint of the Conv with the same padding_mode, i.e. of
  conv(F.pad(x, padding, mode=padding_mode), weight, padding=0, ...), so a ConvTranspose stays the
  input-gradient of the matching Conv. The output size is the one padding_mode='zeros' gives.
"""
import itertools
import warnings

import torch
import torch.nn.functional as F

from . import ops

__all__ = ["conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "conv1d", "conv2d", "conv3d"]


_INT64_END = 2**63  # int64 holds [-_INT64_END, _INT64_END)


def _expand(name, fn, value, dims):
    """int or sequence of ints -> list of `dims` ints (a 1-element sequence is broadcast, as torch does)."""
    # fast path, the common case of every module call: plain ints in range (bool is not int here: type() is exact)
    kind = type(value)
    if kind is int:
        if -_INT64_END <= value < _INT64_END:
            return [value] * dims
    elif kind is tuple and len(value) == dims:
        for v in value:
            if type(v) is not int or not -_INT64_END <= v < _INT64_END:
                break
        else:
            return list(value)

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
    rank = input.dim()
    if rank == dims + 2:
        return True
    if rank != dims + 1:
        raise RuntimeError(f"Expected {dims + 1}D (unbatched) or {dims + 2}D (batched) input to {fn}, "
                           f"but got input of size: {list(input.shape)}")
    return False


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _conv_transpose(dims, fn, input, weight, bias, stride, padding, output_padding, groups, dilation,
                    padding_mode="zeros"):
    batched = _batched(fn, input, dims)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and weight.shape[1] == 0:
        # torch.nn refuses a transposed convolution with no output channels; so do we
        raise RuntimeError(f"{fn}: expected weight to have at least 1 output channel per group at dimension 1, "
                           f"but got weight of size {list(weight.shape)}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"{fn}(): padding_mode must be one of {PADDING_MODES}, "
                         f"but got padding_mode={padding_mode!r}")
    y = input if batched else input.unsqueeze(0)
    stride = _expand("stride", fn, stride, dims)
    output_padding = _expand("output_padding", fn, output_padding, dims)
    dilation = _expand("dilation", fn, dilation, dims)
    if isinstance(padding, str):
        if padding == "valid":
            left = right = [0] * dims
        elif padding == "same":
            if any(op != 0 for op in output_padding):
                raise ValueError(f"{fn}(): padding='same' fixes the output size to input * stride, so output_padding "
                                 f"must be 0, but got output_padding={output_padding}")
            # (a malformed weight is reported by the op; any kernel size will do until then)
            kernel = (list(weight.shape[2:]) if isinstance(weight, torch.Tensor) and weight.dim() == dims + 2
                      else [1] * dims)
            left, right, output_padding = _transposed_same_padding(kernel, stride, dilation)
        else:
            raise TypeError(f"{fn}(): argument 'padding' must be tuple of ints, 'same' or 'valid', "
                            f"not the string {padding!r}")
    else:
        left = right = _expand("padding", fn, padding, dims)

    if padding_mode == "zeros" or not any(left + right) or len(left) != dims:  # (a wrong length: the op reports)
        # The op crops `left` positions from both ends itself; an odd 'same' crop takes one more from the end,
        # as a narrowed view (no copy).
        out = ops.conv_transpose(y, weight, bias, stride, left, output_padding, dilation, groups)
        for j in range(dims):
            if right[j] != left[j]:
                out = out.narrow(2 + j, 0, out.shape[2 + j] - (right[j] - left[j]))
    else:
        out = _conv_transpose_padding_mode(fn, y, weight, bias, stride, left, right, output_padding, dilation,
                                           groups, padding_mode)
    return out if batched else out.squeeze(0)


def _transposed_same_padding(kernel, stride, dilation):
    """padding='same' of a transposed convolution: per spatial dim, the (left, right) crop of the full output and
    the output_padding that make the output exactly input * stride long.

    This is TensorFlow's / Keras' conv_transpose with padding='SAME', i.e. the input-gradient of a stride-s
    convolution with 'SAME' padding of an input input*s long. With extent = dilation*(kernel-1)+1, that
    convolution pads total = max(extent - s, 0) positions: left = total // 2 before the input and
    right = total - left after it (an odd total puts the extra position at the end, as torch's conv
    padding='same' does). Its adjoint crops the full transposed output ((input-1)*s + extent long) by `left` at
    the start and `right` at the end. When extent < s nothing is cropped: the full output is s - extent short of
    input*s, and the missing positions at the end are ones no input reaches (zeros, plus bias), which is
    output_padding = s - extent (< s, so torch's output_padding rule holds).
    """
    left, right, output_padding = [], [], []
    for k, s, d in zip(kernel, stride, dilation):
        extent = d * (k - 1) + 1
        total = max(extent - s, 0)
        left.append(total // 2)
        right.append(total - total // 2)
        output_padding.append(max(s - extent, 0))
    return left, right, output_padding


def _conv_transpose_padding_mode(fn, y, weight, bias, stride, left, right, output_padding, dilation, groups,
                                 padding_mode):
    """conv_transpose with padding_mode 'reflect', 'replicate' or 'circular': the exact adjoint of
        conv(F.pad(x, pads, mode=padding_mode), weight, stride=stride, padding=0, dilation=dilation, groups=groups)
    (pads = `left` before and `right` after, per spatial dim), so that it stays the input-gradient of torch's
    Conv with the same padding_mode: the full transposed convolution (padding 0), then the adjoint of F.pad, which
    adds each padded position back onto the input position F.pad copied it from (and the bias, once, in the same
    pass).
    """
    dims = len(left)
    if any(p < 0 for p in left + right):
        raise RuntimeError(f"{fn}: negative padding is not supported, but got padding={left}")
    # (input, weight and the geometry are checked by the op; the bias, which it does not see here, below)
    full = ops.conv_transpose(y, weight, None, stride, [0] * dims, output_padding, dilation, groups)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{fn}(): argument 'bias' must be Tensor, not {type(bias).__name__}")
        out_channels = weight.shape[1] * groups
        if bias.dim() != 1 or bias.shape[0] != out_channels:
            raise RuntimeError(f"{fn}: expected bias to be 1-dimensional with {out_channels} elements, but got bias "
                               f"of size {list(bias.shape)}")
        if bias.dtype != y.dtype:
            raise RuntimeError(f"{fn}: input type ({y.dtype}) and bias type ({bias.dtype}) should be the same")
        if bias.device != y.device:
            raise RuntimeError(f"{fn}: expected bias to be on the same device as input ({y.device}), but got bias "
                               f"on {bias.device}")
    for j in range(dims):
        size = full.shape[2 + j] - left[j] - right[j]  # the output size: the size of the conv's input x
        if size < 1:
            raise RuntimeError(f"{fn}: given input size per channel {list(y.shape[2:])}, the calculated output "
                               f"size per channel is {size} at spatial dim {j}: output size is too small "
                               f"(padding {left[j]} is too large)")
        # what F.pad(x, mode=padding_mode) itself requires of the conv's input x
        if padding_mode == "reflect" and max(left[j], right[j]) >= size:
            raise RuntimeError(f"{fn}: padding_mode='reflect' needs padding smaller than the output size (the "
                               f"input size of the equivalent F.pad(mode='reflect')), but got padding "
                               f"({left[j]}, {right[j]}) for output size {size} at spatial dim {j}")
        if padding_mode == "circular" and max(left[j], right[j]) > size:
            raise RuntimeError(f"{fn}: padding_mode='circular' needs padding at most the output size (F.pad "
                               f"(mode='circular') of the equivalent conv would wrap around more than once), but "
                               f"got padding ({left[j]}, {right[j]}) for output size {size} at spatial dim {j}")
    return _PadAdjoint.apply(full, bias, tuple(left), tuple(right), padding_mode)


def _f_pad_list(left, right):
    """Per-dim (left, right) -> F.pad's argument, last spatial dim first."""
    return [p for lr in zip(reversed(left), reversed(right)) for p in lr]


def _pad_adjoint(z, bias, left, right, mode):
    """The adjoint of F.pad(x, pads, mode=mode) over the spatial dims of `z` (left[j] + L_j + right[j] long), plus
    the bias: the L interior positions, with each padded position's value added onto the position of x that
    F.pad copied into it.

    One pass makes the output (interior + bias); then each pad block (a face, edge or corner strip: the 3**dims - 1
    combinations of head / interior / tail per dim) is flipped (reflect) or summed (replicate) and added onto its
    source positions, in place, in a fixed order: deterministic, no scatter or index_add. Overlapping targets
    (pads nearly as long as the output) simply add up.
    """
    dims = len(left)
    sizes = [z.shape[2 + j] - left[j] - right[j] for j in range(dims)]
    inner = z
    for j in range(dims):
        inner = inner.narrow(2 + j, left[j], sizes[j])
    if bias is not None:  # (under autocast `z` is in the autocast dtype, as the op would cast the bias)
        out = inner + bias.to(z.dtype).view([-1] + [1] * dims)
    else:
        out = inner.clone(memory_format=torch.contiguous_format)
    # per dim: (start in z, length, kind) of the interior and of each non-empty pad
    parts = [[(left[j], sizes[j], "inner")] + ([(0, left[j], "head")] if left[j] else [])
             + ([(left[j] + sizes[j], right[j], "tail")] if right[j] else []) for j in range(dims)]
    for block in itertools.product(*parts):
        if all(kind == "inner" for _, _, kind in block):
            continue
        values, target = z, out
        for j, (start, length, kind) in enumerate(block):
            d, size = 2 + j, sizes[j]
            values = values.narrow(d, start, length)
            if kind == "inner":
                continue
            if mode == "circular":  # F.pad puts x[L-left:] before x and x[:right] after it
                target = target.narrow(d, size - length, length) if kind == "head" else target.narrow(d, 0, length)
            elif mode == "reflect":  # head[i] = x[left - i], tail[i] = x[L - 2 - i]
                values = values.flip(d)
                target = target.narrow(d, 1, length) if kind == "head" else target.narrow(d, size - 1 - length,
                                                                                           length)
            else:  # replicate: every head position is x[0], every tail position x[L-1]
                values = values.sum(d, keepdim=True)
                target = target.narrow(d, 0, 1) if kind == "head" else target.narrow(d, size - 1, 1)
        target.add_(values)
    return out


class _PadAdjoint(torch.autograd.Function):
    """_pad_adjoint as an autograd function: its gradient is F.pad(mode) (a gather: one pass, deterministic), whose
    gradient is _pad_adjoint again (_Pad below), so derivatives of any order stay deterministic and cheap."""
    generate_vmap_rule = True

    @staticmethod
    def forward(z, bias, left, right, mode):
        return _pad_adjoint(z, bias, left, right, mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, bias, ctx.left, ctx.right, ctx.mode = inputs
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        grad_z = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_z = _Pad.apply(grad, ctx.left, ctx.right, ctx.mode)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad.sum([0] + list(range(2, grad.dim())))
        return grad_z, grad_bias, None, None, None


class _Pad(torch.autograd.Function):
    """F.pad(mode) with _pad_adjoint as its gradient (instead of torch's pad backward, which is not deterministic
    on CUDA)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, left, right, mode):
        return F.pad(x, _f_pad_list(left, right), mode=mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.left, ctx.right, ctx.mode = inputs

    @staticmethod
    def backward(ctx, grad):
        return _PadAdjoint.apply(grad, None, ctx.left, ctx.right, ctx.mode), None, None, None


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


def conv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     padding_mode="zeros"):
    """Like torch.nn.functional.conv_transpose1d; also padding='same' / 'valid' and a keyword-only padding_mode
    ('zeros', 'reflect', 'replicate', 'circular'), described in the module docstring."""
    return _conv_transpose(1, "conv_transpose1d", input, weight, bias, stride, padding, output_padding, groups,
                           dilation, padding_mode)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     padding_mode="zeros"):
    """Like torch.nn.functional.conv_transpose2d; also padding='same' / 'valid' and a keyword-only padding_mode
    ('zeros', 'reflect', 'replicate', 'circular'), described in the module docstring."""
    return _conv_transpose(2, "conv_transpose2d", input, weight, bias, stride, padding, output_padding, groups,
                           dilation, padding_mode)


def conv_transpose3d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     padding_mode="zeros"):
    """Like torch.nn.functional.conv_transpose3d; also padding='same' / 'valid' and a keyword-only padding_mode
    ('zeros', 'reflect', 'replicate', 'circular'), described in the module docstring."""
    return _conv_transpose(3, "conv_transpose3d", input, weight, bias, stride, padding, output_padding, groups,
                           dilation, padding_mode)


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Like torch.nn.functional.conv1d (padding may be 'same' or 'valid')."""
    return _conv(1, "conv1d", input, weight, bias, stride, padding, dilation, groups)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Like torch.nn.functional.conv2d (padding may be 'same' or 'valid')."""
    return _conv(2, "conv2d", input, weight, bias, stride, padding, dilation, groups)


def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Like torch.nn.functional.conv3d (padding may be 'same' or 'valid')."""
    return _conv(3, "conv3d", input, weight, bias, stride, padding, dilation, groups)
