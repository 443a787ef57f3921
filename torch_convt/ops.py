"""Fake (meta) kernels, autograd (reverse and forward mode, torch.func), vmap and autocast rules for the three
torch_convt operators.

The ops are closed under differentiation (X big, Y small, W weight; see csrc/common/index_math.h):
    conv_transpose(Y, W) -> X     d/dY = conv(gX, W)                 d/dW = conv_weight_grad(gX, Y)
    conv(X, W) -> Y               d/dX = conv_transpose(gY, W)       d/dW = conv_weight_grad(X, gY)
    conv_weight_grad(X, Y) -> dW  d/dX = conv_transpose(Y, g)        d/dY = conv(X, g)
so double (and higher) backward works by construction. For complex tensors the adjoint conjugates the other
operand (torch's conjugate-Wirtinger convention).
"""
import functools

import torch
from torch._prims_common import suggest_memory_format

from . import _C

_ops = torch.ops.torch_convt

_conv_transpose_op = _ops.conv_transpose.default
_conv_op = _ops.conv.default
_conv_weight_grad_op = _ops.conv_weight_grad.default


# ---- sizes -------------------------------------------------------------------------------------------------
def conv_out_size(big, kernel, stride, padding, dilation):
    return (big + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose_out_size(small, kernel, stride, padding, dilation, output_padding):
    return (small - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def output_padding_for(big_sizes, small_sizes, kernel, stride, padding, dilation):
    """The output_padding that makes conv_transpose of a `small_sizes` tensor exactly `big_sizes` long."""
    return [b - conv_transpose_out_size(s, k, st, p, d, 0)
            for b, s, k, st, p, d in zip(big_sizes, small_sizes, kernel, stride, padding, dilation)]


def _narrow_spatial(t, sizes):
    """Crops trailing positions: with output_padding >= stride, conv of the big tensor is longer than the
    small one (the extra positions read only output padding)."""
    for j, n in enumerate(sizes):
        if t.shape[2 + j] != n:
            t = t.narrow(2 + j, 0, n)
    return t


def _bias_grad(grad):
    return grad.sum(dim=[0] + list(range(2, grad.dim())))


# ---- fake kernels ------------------------------------------------------------------------------------------
# These also serve the Meta dispatch key, which wins over CPU/CUDA when any argument is a meta tensor: the
# device check makes a real input with a meta weight an error (as in the C++ kernels) instead of garbage.
def _check_devices(op, input, **others):
    for name, t in others.items():
        if t is not None:
            torch._check(t.device == input.device, lambda: f"{op}: expected {name} to be on the same device as "
                         f"input ({input.device}), but got {name} on {t.device}")


@functools.lru_cache(maxsize=None)  # (a property of the CPU and the torch build: asked once, as the C++ side does)
def _mkldnn_supports(name):
    op = getattr(torch.ops.mkldnn, name, None)
    try:
        return bool(op()) if op is not None else False
    except RuntimeError:
        return False


def _channels_last_3d_kept(input, weight, stride, dilation, output_padding, groups):
    """Whether torch.nn takes its oneDNN backend for a 3d layer (use_mkldnn), whose output keeps channels_last; its
    slow 3d kernels write contiguous outputs. As the CPU kernels' output_format decides it."""
    if not torch._C._get_mkldnn_enabled() or any(o >= s for o, s in zip(output_padding, stride)):
        return False
    if input.dtype == torch.bfloat16 and _mkldnn_supports("_is_mkldnn_bf16_supported"):
        return True
    if input.dtype == torch.float16 and _mkldnn_supports("_is_mkldnn_fp16_supported"):
        return True
    if input.dtype != torch.float32:
        return False
    n, kw, kh = input.shape[0], weight.shape[-1], weight.shape[-2]
    return ((any(s != 1 for s in stride) or any(d != 1 for d in dilation) or n >= 16 or kw != 1 or kh != 1
             or torch.get_num_threads() > 1)
            and (groups > 1 or (kw > 3 and kh > 3) or n > 1
                 or n * input.shape[1] * input.shape[2] * input.shape[3] > 20480))


def _empty_output(input, weight, shape, stride, dilation, output_padding, groups):
    """The output in the memory format the CPU kernels (and torch.nn) give it: channels_last when the input or the
    weight is, for 2d layers, and for 3d layers where torch.nn would take oneDNN; contiguous otherwise."""
    out = input.new_empty(shape)
    if input.device.type != "cpu":
        return out  # the CUDA kernels write contiguous outputs
    for fmt in ((torch.channels_last,) if input.dim() == 4 else (torch.channels_last_3d,) if input.dim() == 5 else ()):
        if fmt in (suggest_memory_format(input), suggest_memory_format(weight)) and (
                input.dim() == 4 or _channels_last_3d_kept(input, weight, stride, dilation, output_padding, groups)):
            return out.contiguous(memory_format=fmt)
    return out


@torch.library.register_fake("torch_convt::conv_transpose")
def _conv_transpose_fake(input, weight, bias, stride, padding, output_padding, dilation, groups):
    _check_devices("torch_convt.conv_transpose", input, weight=weight, bias=bias)
    spatial = [conv_transpose_out_size(input.shape[2 + j], weight.shape[2 + j], stride[j], padding[j], dilation[j],
                                       output_padding[j]) for j in range(input.dim() - 2)]
    return _empty_output(input, weight, [input.shape[0], weight.shape[1] * groups] + spatial, stride, dilation,
                         output_padding, groups)


@torch.library.register_fake("torch_convt::conv")
def _conv_fake(input, weight, bias, stride, padding, dilation, groups):
    _check_devices("torch_convt.conv", input, weight=weight, bias=bias)
    spatial = [conv_out_size(input.shape[2 + j], weight.shape[2 + j], stride[j], padding[j], dilation[j])
               for j in range(input.dim() - 2)]
    return _empty_output(input, weight, [input.shape[0], weight.shape[0]] + spatial, stride, dilation, [], groups)


@torch.library.register_fake("torch_convt::conv_weight_grad")
def _conv_weight_grad_fake(input, grad_output, weight_size, stride, padding, dilation, groups):
    _check_devices("torch_convt.conv_weight_grad", input, grad_output=grad_output)
    return input.new_empty(weight_size)


# ---- autograd (reverse and forward mode) and torch.func ----------------------------------------------------
# Each op's Autograd kernel (registered below) applies an autograd.Function with setup_context, backward and
# jvp. torch.library.register_autograd is not enough: the Function it generates has no setup_context, so
# torch.func.grad / vjp / jacrev refuse it, and no jvp, and it only runs when an input requires grad, so
# forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) silently got a zero tangent. vmap goes
# through the batching rules registered with torch.library.register_vmap.
def _setup(ctx, inputs, output):
    # inputs[0], inputs[1] are the two tensors; the rest are the geometry (after the bias, for the forward ops:
    # backward needs only whether it requires grad, ctx.needs_input_grad[2]).
    ctx.save_for_backward(inputs[0], inputs[1])
    if _forward_ad_active():  # (only a jvp reads them: 2 us of a small layer's training step otherwise)
        ctx.save_for_forward(inputs[0], inputs[1])
    ctx.args = inputs[2:]
    ctx.output_shape = output.shape


def _empty_batch_grads(needs, first, second):
    """The gradients of an empty batch (any geometry, which the ops may not take back): zeros."""
    return [t.new_zeros(t.shape) if need else None for t, need in zip((first, second), needs)]


def _conv_transpose_backward(ctx, grad):
    y, w = ctx.saved_tensors
    _, stride, padding, output_padding, dilation, groups = ctx.args
    gy = gw = gb = None
    if y.shape[0] == 0:
        gy, gw = _empty_batch_grads(ctx.needs_input_grad, y, w)
        return gy, gw, _bias_grad(grad) if ctx.needs_input_grad[2] else None, None, None, None, None, None
    if ctx.needs_input_grad[0]:
        gy = _narrow_spatial(conv(grad, w.conj(), None, stride, padding, dilation, groups), y.shape[2:])
    if ctx.needs_input_grad[1]:
        gw = conv_weight_grad(grad, y.conj(), list(w.shape), stride, padding, dilation, groups)
    if ctx.needs_input_grad[2]:
        gb = _bias_grad(grad)
    return gy, gw, gb, None, None, None, None, None


def _conv_backward(ctx, grad):
    x, w = ctx.saved_tensors
    _, stride, padding, dilation, groups = ctx.args
    gx = gw = gb = None
    if x.shape[0] == 0:
        gx, gw = _empty_batch_grads(ctx.needs_input_grad, x, w)
        return gx, gw, _bias_grad(grad) if ctx.needs_input_grad[2] else None, None, None, None, None
    if ctx.needs_input_grad[0]:
        op = output_padding_for(x.shape[2:], grad.shape[2:], w.shape[2:], stride, padding, dilation)
        gx = conv_transpose(grad, w.conj(), None, stride, padding, op, dilation, groups)
    if ctx.needs_input_grad[1]:
        gw = conv_weight_grad(x.conj(), grad, list(w.shape), stride, padding, dilation, groups)
    if ctx.needs_input_grad[2]:
        gb = _bias_grad(grad)
    return gx, gw, gb, None, None, None, None


def _conv_weight_grad_backward(ctx, grad):
    x, y = ctx.saved_tensors
    weight_size, stride, padding, dilation, groups = ctx.args
    gx = gy = None
    if x.shape[0] == 0:
        return (*_empty_batch_grads(ctx.needs_input_grad, x, y), None, None, None, None, None)
    if ctx.needs_input_grad[0]:
        op = output_padding_for(x.shape[2:], y.shape[2:], weight_size[2:], stride, padding, dilation)
        gx = conv_transpose(y.conj(), grad, None, stride, padding, op, dilation, groups)
    if ctx.needs_input_grad[1]:
        gy = _narrow_spatial(conv(x.conj(), grad, None, stride, padding, dilation, groups), y.shape[2:])
    return gx, gy, None, None, None, None, None


# Forward mode: each op is linear in each tensor argument (bilinear, no conjugation), so its tangent is the op
# applied to one tangent and the other primal, summed over the arguments that have a tangent (None: no tangent).
def _tangent(terms, bias_tangent, output_shape):
    terms = [t for t in terms if t is not None]
    if bias_tangent is not None:
        bias_term = bias_tangent.reshape([1, -1] + [1] * (len(output_shape) - 2))
        terms.append(bias_term if terms else bias_term.expand(output_shape).contiguous())
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def _conv_transpose_jvp(ctx, ty, tw, tb, *_):
    y, w = ctx.saved_tensors
    _, stride, padding, output_padding, dilation, groups = ctx.args
    geometry = (stride, padding, output_padding, dilation, groups)
    return _tangent([conv_transpose(ty, w, None, *geometry) if ty is not None else None,
                     conv_transpose(y, tw, None, *geometry) if tw is not None else None], tb, ctx.output_shape)


def _conv_jvp(ctx, tx, tw, tb, *_):
    x, w = ctx.saved_tensors
    _, stride, padding, dilation, groups = ctx.args
    geometry = (stride, padding, dilation, groups)
    return _tangent([conv(tx, w, None, *geometry) if tx is not None else None,
                     conv(x, tw, None, *geometry) if tw is not None else None], tb, ctx.output_shape)


def _conv_weight_grad_jvp(ctx, tx, ty, *_):
    x, y = ctx.saved_tensors
    geometry = ctx.args  # weight_size, stride, padding, dilation, groups
    return _tangent([conv_weight_grad(tx, y, *geometry) if tx is not None else None,
                     conv_weight_grad(x, ty, *geometry) if ty is not None else None], None, ctx.output_shape)


# ---- the autograd kernels ----------------------------------------------------------------------------------
_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_has_torch_function = torch._C._has_torch_function
_tracing_state = torch._C._get_tracing_state
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain_types(args):
    """Whether the tensor arguments are plain tensors: fake, functional and other tensor subclasses take torch.ops,
    which keeps symbolic sizes symbolic under tracing and lets __torch_function__ overrides see the op."""
    third = args[2]
    return (type(args[0]) in _PLAIN and type(args[1]) in _PLAIN
            and (type(third) in _PLAIN or not isinstance(third, torch.Tensor)))


def _direct(args):
    """Whether a call below autograd may take torch_convt._C's entry instead of torch.ops: plain tensors, no
    __torch_function__ mode and no tracer."""
    return _plain_types(args) and not _has_torch_function(args) and _tracing_state() is None


def _below_autograd(op, direct, args):
    # Straight to the backend (or fake / tracing) kernel. Without the guard, a call from forward() while
    # forward-mode AD is active would come back to the autograd kernel and recurse.
    if torch._C._are_functorch_transforms_active():
        # apply() turned grad and forward grad off for this torch.func level; the levels below, which the op
        # reaches through the dispatcher, must see them on (as torch.func does for autograd.Functions).
        with torch.enable_grad(), torch.autograd.forward_ad._set_fwd_grad_enabled(True), \
                torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    if _direct(args):
        return direct(*args)  # (torch_convt._C's entry: the same, without torch.ops' argument parsing)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


class _ConvTransposeFunction(torch.autograd.Function):
    """torch.ops.torch_convt.conv_transpose with its reverse (backward) and forward (jvp) rules."""
    @staticmethod
    def forward(*args):
        return _below_autograd(_conv_transpose_op, _C.conv_transpose, args)

    setup_context = staticmethod(_setup)
    backward = staticmethod(_conv_transpose_backward)
    jvp = staticmethod(_conv_transpose_jvp)


class _ConvFunction(torch.autograd.Function):
    """torch.ops.torch_convt.conv with its reverse (backward) and forward (jvp) rules."""
    @staticmethod
    def forward(*args):
        return _below_autograd(_conv_op, _C.conv, args)

    setup_context = staticmethod(_setup)
    backward = staticmethod(_conv_backward)
    jvp = staticmethod(_conv_jvp)


class _ConvWeightGradFunction(torch.autograd.Function):
    """torch.ops.torch_convt.conv_weight_grad with its reverse (backward) and forward (jvp) rules."""
    @staticmethod
    def forward(*args):
        return _below_autograd(_conv_weight_grad_op, _C.conv_weight_grad, args)

    setup_context = staticmethod(_setup)
    backward = staticmethod(_conv_weight_grad_backward)
    jvp = staticmethod(_conv_weight_grad_jvp)


def _forward_ad_active():
    # torch.autograd.forward_ad.dual_level (which torch.func.jvp and jacfwd enter too) makes this >= 0.
    return torch.autograd.forward_ad._current_level >= 0


def _needs_graph(args):
    """Whether a call with these arguments must record autograd (a tensor requires grad under grad mode, or
    forward AD is active)."""
    return (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)) or _forward_ad_active()


_autograd_lib = torch.library.Library("torch_convt", "IMPL")


def _register_autograd_kernel(op, function):
    apply_at_this_level = super(torch.autograd.Function, function).apply

    def autograd_kernel(keyset, *args):
        if _needs_graph(args):
            # The single-level apply underneath Function.apply: inside a torch.func grad/jvp level the dispatcher
            # hands us that level's wrapper tensors and, like ATen's autograd kernels, we record the node at this
            # level only (lower levels see the op again when forward() calls it). Function.apply would re-enter
            # torch.func from the top instead, which only works before the dispatcher.
            if not torch._C._are_functorch_transforms_active():
                return apply_at_this_level(*args)
            with torch._functorch.utils.enable_single_level_autograd_function():
                return apply_at_this_level(*args)
        # nothing to differentiate: straight to the backend kernel, no graph node (calling the op again below
        # autograd costs less than a Python redispatch, which matters to small layers; under torch.func the
        # dispatch must continue from this level, so it redispatches)
        with torch._C._AutoDispatchBelowAutograd():
            if not torch._C._are_functorch_transforms_active():
                return op(*args)
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    _autograd_lib.impl(op._schema.name.split("::")[1], autograd_kernel, "Autograd", with_keyset=True)


_register_autograd_kernel(_conv_transpose_op, _ConvTransposeFunction)
_register_autograd_kernel(_conv_op, _ConvFunction)
_register_autograd_kernel(_conv_weight_grad_op, _ConvWeightGradFunction)


# ---- entry points ------------------------------------------------------------------------------------------
# The functional API and the backward / jvp rules call the ops through these. A call through torch.ops costs a
# dispatcher round trip to the op's Python autograd kernel below and a second argument parse (15-50 us, more than a
# small layer computes), so where nothing but autograd stands between the caller and the backend kernel, the
# entry point does autograd's part itself:
# - nothing to differentiate: straight below autograd (autocast, not an autograd key, still applies there);
# - a graph to record: the autograd.Function's single-level apply, as the autograd kernel would, unless autocast,
#   the tracer or a __torch_function__ override (subclass or mode) must see the op first.
# Those, torch.func transforms and torch.compile tracing take the op through the dispatcher.
# - nothing to differentiate, plain tensors and nothing above the dispatcher to see the op (_direct):
#   torch_convt._C's entry, which converts the arguments itself and calls the op from below autograd (an op call
#   of a small layer: 11 -> 6 us; torch.ops parses arguments in generic code);
# - a graph to record, the same conditions, and no forward-mode AD: torch_convt._C's graph entry, which records
#   the C++ API's autograd node (csrc/api/cpp_api.cpp: the same backward, written with the three ops' C++ nodes,
#   so double backward stays in C++). Recording and freeing a Python autograd.Function node cost 11 us more (an
#   8-channel 8 x 8 layer's training step: 75 -> 64 us). The Python Functions remain for forward-mode AD (their
#   jvp), torch.func and the autograd kernels (calls through torch.ops).
def _plain(args):
    return not (torch._C._has_torch_function(args) or torch.is_autocast_enabled("cpu")
                or torch.is_autocast_enabled("cuda") or torch._C._get_tracing_state() is not None)


def _entry(op, function, direct, graph):
    apply = super(torch.autograd.Function, function).apply

    def call(*args):
        if _is_compiling() or _functorch_active():
            return op(*args)
        if not _needs_graph(args):
            if _direct(args):
                return direct(*args)
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args)
        if not _plain(args):
            return op(*args)
        if _plain_types(args) and not _forward_ad_active():  # (_plain checked the rest of _direct)
            return graph(*args)
        return apply(*args)
    call.__name__ = call.__qualname__ = op._schema.name.split("::")[1]
    call.__doc__ = f"torch.ops.{op._schema.name.replace('::', '.')} (see the module docstring)"
    return call


conv_transpose = _entry(_conv_transpose_op, _ConvTransposeFunction, _C.conv_transpose, _C.conv_transpose_graph)
conv = _entry(_conv_op, _ConvFunction, _C.conv, _C.conv_graph)
conv_weight_grad = _entry(_conv_weight_grad_op, _ConvWeightGradFunction, _C.conv_weight_grad,
                          _C.conv_weight_grad_graph)


# ---- torch.func.vmap ---------------------------------------------------------------------------------------
def _vmap_rule(op, n_tensors, fold_into_batch=True):
    """vmap of an op whose first `n_tensors` arguments are tensors (or None). With `fold_into_batch`, a batched
    input alone folds the vmapped dim into the batch dim (one call); anything else (a batched weight,
    per-sample gradients) runs the op once per vmapped slice. conv_weight_grad sums over the batch dim (its
    two tensors are paired sample by sample), so it cannot fold."""
    def rule(info, in_dims, *args):
        dims = in_dims[:n_tensors]
        tensors, rest = args[:n_tensors], args[n_tensors:]
        if fold_into_batch and dims[0] is not None and all(d is None for d in dims[1:]):
            x = tensors[0].movedim(dims[0], 0)
            out = op(x.flatten(0, 1), *tensors[1:], *rest)
            return out.unflatten(0, (x.shape[0], x.shape[1])), 0
        moved = [t.movedim(d, 0) if d is not None else t for t, d in zip(tensors, dims)]
        outs = [op(*[t[b] if d is not None else t for t, d in zip(moved, dims)], *rest)
                for b in range(info.batch_size)]
        return torch.stack(outs), 0
    return rule


torch.library.register_vmap("torch_convt::conv_transpose", _vmap_rule(conv_transpose, 3))
torch.library.register_vmap("torch_convt::conv", _vmap_rule(conv, 3))
torch.library.register_vmap("torch_convt::conv_weight_grad",
                            _vmap_rule(conv_weight_grad, 2, fold_into_batch=False))


# ---- autocast ----------------------------------------------------------------------------------------------
# torch runs its convolutions in the autocast dtype (lower-precision list); so do ours: floating tensors of the
# autocast device other than float64 are cast to torch.get_autocast_dtype(device) before the op runs.
_autocast_lib = torch.library.Library("torch_convt", "IMPL")


def _register_autocast(op, device_type):
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)

    def cast(args):
        dtype = torch.get_autocast_dtype(device_type)
        return [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64
                and a.device.type == device_type else a for a in args]

    def run(*args):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*cast(args))

    if op.has_kernel_for_dispatch_key(key):
        op.py_kernels.pop(key, None)
    op.py_impl(key)(run)  # for tracing (torch.compile, make_fx)
    _autocast_lib.impl(op._schema.name.split("::")[1], lambda _keyset, *args: run(*args), key_name,
                       with_keyset=True)


for _op in (_conv_transpose_op, _conv_op, _conv_weight_grad_op):
    for _device in ("cpu", "cuda"):
        _register_autocast(_op, _device)
