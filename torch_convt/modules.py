"""Drop-in modules: subclasses of the torch.nn convolution classes that override forward only.

Constructor, attributes, initialisation, state_dict, repr and constructor errors are torch.nn's own; only
the computation is torch_convt's. The ConvTranspose classes also override __init__, only to accept what torch.nn's
ConvTranspose constructor rejects: padding_mode 'reflect' / 'replicate' / 'circular' and padding 'same' / 'valid'
(see torch_convt.functional); they are stored in the attributes torch's Conv uses (`padding_mode`, a string
`padding`), so repr shows them as torch's Conv repr does, and the state_dict is unchanged.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as TF
from . import ops

__all__ = ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Conv1d", "Conv2d", "Conv3d"]

_PADDING_STRINGS = {"same", "valid"}


def _init_padding(module, padding, padding_mode):
    """After torch's constructor ran with padding 0 (for a string) and padding_mode 'zeros': checks and stores the
    padding string and padding_mode (ValueError for bad values, as torch's Conv constructor raises)."""
    if isinstance(padding, str):
        if padding not in _PADDING_STRINGS:
            raise ValueError(f"Invalid padding string {padding!r}, should be one of {_PADDING_STRINGS}")
        if padding == "same" and any(module.output_padding):
            raise ValueError(f"padding='same' fixes the output size to input * stride, so output_padding must be 0, "
                             f"but got output_padding={module.output_padding}")
        module.padding = padding
        if padding == "same":  # the equivalent conv's F.pad amounts, as torch's Conv stores them
            left, right, _ = TF._transposed_same_padding(module.kernel_size, module.stride, module.dilation)
            module._reversed_padding_repeated_twice = TF._f_pad_list(left, right)
        else:
            module._reversed_padding_repeated_twice = [0, 0] * len(module.kernel_size)
    if padding_mode not in TF.PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {TF.PADDING_MODES}, but got padding_mode='{padding_mode}'")
    module.padding_mode = padding_mode


def _same_output_size(module, input, output_size, dims):
    """padding='same': the only output size is input * stride; another requested output_size is a ValueError."""
    batched = input.dim() == dims + 2
    sizes = list(output_size)
    if len(sizes) == dims + (2 if batched else 1):
        sizes = sizes[-dims:]
    expected = [input.shape[-dims + j] * module.stride[j] for j in range(dims)]
    if len(sizes) != dims or sizes != expected:
        raise ValueError(f"requested an output size of {list(output_size)}, but with padding='same' the output size "
                         f"is input * stride = {expected} (for an input of {list(input.shape[-dims:])})")


def _plain_geometry(module, dims, fn):
    """The op's geometry lists of a module with numeric padding and padding_mode 'zeros', kept on the module while its
    attributes stay the same (tuple) objects (they are validated once, by the functional layer's argument checks);
    None for string padding or another padding_mode, which take the functional path."""
    key = (module.stride, module.padding, module.output_padding, module.dilation, module.groups, module.padding_mode,
           module.out_channels)
    cached = module.__dict__.get("_torch_convt_geometry")
    if cached is not None and len(cached[0]) == len(key) and all(a is b for a, b in zip(cached[0], key)):
        return cached[1]
    geometry = None
    if module.padding_mode == "zeros" and not isinstance(module.padding, str) and module.out_channels > 0:
        geometry = (TF._expand("stride", fn, module.stride, dims), TF._expand("padding", fn, module.padding, dims),
                    TF._expand("output_padding", fn, module.output_padding, dims),
                    TF._expand("dilation", fn, module.dilation, dims), module.groups)
        if any(len(v) != dims for v in geometry[:4]):
            geometry = None  # (a wrong length: the functional path reports it)
    if all(type(v) is tuple for v in key[:4]):  # (immutable: identity stands for the values)
        module.__dict__["_torch_convt_geometry"] = (key, geometry)
    return geometry


def _conv_transpose_forward(module, input, output_size, dims, fn):
    if output_size is None:
        # the common call (numeric padding, 'zeros', a batched input): straight to the op with the module's geometry,
        # checked once (a small layer's call: -3 us)
        geometry = _plain_geometry(module, dims, fn.__name__)
        if geometry is not None and isinstance(input, torch.Tensor) and input.dim() == dims + 2:
            return ops.conv_transpose(input, module.weight, module.bias, *geometry)
    padding = module.padding
    if padding == "same":
        if output_size is not None:
            _same_output_size(module, input, output_size, dims)
        output_padding = module.output_padding  # (0: checked by the constructor and, again, by fn)
    else:
        if padding == "valid":
            padding = (0,) * dims
        output_padding = module.output_padding if output_size is None else module._output_padding(
            input, output_size, module.stride, padding, module.kernel_size, dims, module.dilation)
    return fn(input, module.weight, module.bias, module.stride, padding, output_padding, module.groups,
              module.dilation, padding_mode=module.padding_mode)


def _conv_forward(module, input, fn):
    if module.padding_mode != "zeros":
        padded = F.pad(input, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return fn(padded, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
    return fn(input, module.weight, module.bias, module.stride, module.padding, module.dilation, module.groups)


class ConvTranspose1d(nn.ConvTranspose1d):
    __doc__ = nn.ConvTranspose1d.__doc__

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, padding_mode="zeros", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0 if isinstance(padding, str) else padding,
                         output_padding, groups, bias, dilation, "zeros", device, dtype)
        _init_padding(self, padding, padding_mode)

    def forward(self, input, output_size=None):
        return _conv_transpose_forward(self, input, output_size, 1, TF.conv_transpose1d)


class ConvTranspose2d(nn.ConvTranspose2d):
    __doc__ = nn.ConvTranspose2d.__doc__

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, padding_mode="zeros", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0 if isinstance(padding, str) else padding,
                         output_padding, groups, bias, dilation, "zeros", device, dtype)
        _init_padding(self, padding, padding_mode)

    def forward(self, input, output_size=None):
        return _conv_transpose_forward(self, input, output_size, 2, TF.conv_transpose2d)


class ConvTranspose3d(nn.ConvTranspose3d):
    __doc__ = nn.ConvTranspose3d.__doc__

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, padding_mode="zeros", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0 if isinstance(padding, str) else padding,
                         output_padding, groups, bias, dilation, "zeros", device, dtype)
        _init_padding(self, padding, padding_mode)

    def forward(self, input, output_size=None):
        return _conv_transpose_forward(self, input, output_size, 3, TF.conv_transpose3d)


class Conv1d(nn.Conv1d):
    __doc__ = nn.Conv1d.__doc__

    def forward(self, input):
        return _conv_forward(self, input, TF.conv1d)


class Conv2d(nn.Conv2d):
    __doc__ = nn.Conv2d.__doc__

    def forward(self, input):
        return _conv_forward(self, input, TF.conv2d)


class Conv3d(nn.Conv3d):
    __doc__ = nn.Conv3d.__doc__

    def forward(self, input):
        return _conv_forward(self, input, TF.conv3d)
