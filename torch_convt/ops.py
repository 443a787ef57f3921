"""Fake (meta) kernels and autograd for the three torch_convt operators.

The ops are closed under differentiation (X big, Y small, W weight; see csrc/common/index_math.h):
    conv_transpose(Y, W) -> X     d/dY = conv(gX, W)                 d/dW = conv_weight_grad(gX, Y)
    conv(X, W) -> Y               d/dX = conv_transpose(gY, W)       d/dW = conv_weight_grad(X, gY)
    conv_weight_grad(X, Y) -> dW  d/dX = conv_transpose(Y, g)        d/dY = conv(X, g)
so double (and higher) backward works by construction. For complex tensors the adjoint conjugates the other
operand (torch's conjugate-Wirtinger convention).
"""
import torch

_ops = torch.ops.torch_convt

conv_transpose = _ops.conv_transpose
conv = _ops.conv
conv_weight_grad = _ops.conv_weight_grad


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


@torch.library.register_fake("torch_convt::conv_transpose")
def _conv_transpose_fake(input, weight, bias, stride, padding, output_padding, dilation, groups):
    _check_devices("torch_convt.conv_transpose", input, weight=weight, bias=bias)
    spatial = [conv_transpose_out_size(input.shape[2 + j], weight.shape[2 + j], stride[j], padding[j], dilation[j],
                                       output_padding[j]) for j in range(input.dim() - 2)]
    return input.new_empty([input.shape[0], weight.shape[1] * groups] + spatial)


@torch.library.register_fake("torch_convt::conv")
def _conv_fake(input, weight, bias, stride, padding, dilation, groups):
    _check_devices("torch_convt.conv", input, weight=weight, bias=bias)
    spatial = [conv_out_size(input.shape[2 + j], weight.shape[2 + j], stride[j], padding[j], dilation[j])
               for j in range(input.dim() - 2)]
    return input.new_empty([input.shape[0], weight.shape[0]] + spatial)


@torch.library.register_fake("torch_convt::conv_weight_grad")
def _conv_weight_grad_fake(input, grad_output, weight_size, stride, padding, dilation, groups):
    _check_devices("torch_convt.conv_weight_grad", input, grad_output=grad_output)
    return input.new_empty(weight_size)


# ---- autograd ----------------------------------------------------------------------------------------------
def _setup(ctx, inputs, output):
    # inputs[0], inputs[1] are the two tensors; the rest are the geometry (and bias for the forward ops).
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.args = inputs[2:]


def _conv_transpose_backward(ctx, grad):
    y, w = ctx.saved_tensors
    bias, stride, padding, output_padding, dilation, groups = ctx.args
    gy = gw = gb = None
    if ctx.needs_input_grad[0]:
        gy = _narrow_spatial(conv(grad, w.conj(), None, stride, padding, dilation, groups), y.shape[2:])
    if ctx.needs_input_grad[1]:
        gw = conv_weight_grad(grad, y.conj(), list(w.shape), stride, padding, dilation, groups)
    if bias is not None and ctx.needs_input_grad[2]:
        gb = _bias_grad(grad)
    return gy, gw, gb, None, None, None, None, None


def _conv_backward(ctx, grad):
    x, w = ctx.saved_tensors
    bias, stride, padding, dilation, groups = ctx.args
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        op = output_padding_for(x.shape[2:], grad.shape[2:], w.shape[2:], stride, padding, dilation)
        gx = conv_transpose(grad, w.conj(), None, stride, padding, op, dilation, groups)
    if ctx.needs_input_grad[1]:
        gw = conv_weight_grad(x.conj(), grad, list(w.shape), stride, padding, dilation, groups)
    if bias is not None and ctx.needs_input_grad[2]:
        gb = _bias_grad(grad)
    return gx, gw, gb, None, None, None, None


def _conv_weight_grad_backward(ctx, grad):
    x, y = ctx.saved_tensors
    weight_size, stride, padding, dilation, groups = ctx.args
    gx = gy = None
    if ctx.needs_input_grad[0]:
        op = output_padding_for(x.shape[2:], y.shape[2:], weight_size[2:], stride, padding, dilation)
        gx = conv_transpose(y.conj(), grad, None, stride, padding, op, dilation, groups)
    if ctx.needs_input_grad[1]:
        gy = _narrow_spatial(conv(x.conj(), grad, None, stride, padding, dilation, groups), y.shape[2:])
    return gx, gy, None, None, None, None, None


torch.library.register_autograd("torch_convt::conv_transpose", _conv_transpose_backward, setup_context=_setup)
torch.library.register_autograd("torch_convt::conv", _conv_backward, setup_context=_setup)
torch.library.register_autograd("torch_convt::conv_weight_grad", _conv_weight_grad_backward, setup_context=_setup)


# ---- torch.func.vmap ---------------------------------------------------------------------------------------
def _vmap_rule(op, n_tensors):
    """vmap of an op whose first `n_tensors` arguments are tensors (or None). A batched input alone folds the
    vmapped dim into the batch dim (one call); anything else (a batched weight, per-sample gradients) runs the
    op once per vmapped slice."""
    def rule(info, in_dims, *args):
        dims = in_dims[:n_tensors]
        tensors, rest = args[:n_tensors], args[n_tensors:]
        if dims[0] is not None and all(d is None for d in dims[1:]):
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
torch.library.register_vmap("torch_convt::conv_weight_grad", _vmap_rule(conv_weight_grad, 2))


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


for _op in (conv_transpose.default, conv.default, conv_weight_grad.default):
    for _device in ("cpu", "cuda"):
        _register_autocast(_op, _device)
