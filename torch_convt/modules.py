"""Drop-in modules: subclasses of the torch.nn convolution classes that override forward only.

Constructor, attributes, initialisation, state_dict, repr and constructor errors are torch.nn's own; only
the computation is torch_convt's.
"""
import torch.nn as nn
import torch.nn.functional as F

from . import functional as TF

__all__ = ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Conv1d", "Conv2d", "Conv3d"]


def _conv_transpose_forward(module, input, output_size, dims, fn):
    if module.padding_mode != "zeros":
        raise ValueError(f'Only "zeros" padding mode is supported for {module.__class__.__name__}')
    output_padding = module._output_padding(input, output_size, module.stride, module.padding, module.kernel_size,
                                            dims, module.dilation)
    return fn(input, module.weight, module.bias, module.stride, module.padding, output_padding, module.groups,
              module.dilation)


def _conv_forward(module, input, fn):
    if module.padding_mode != "zeros":
        padded = F.pad(input, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return fn(padded, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
    return fn(input, module.weight, module.bias, module.stride, module.padding, module.dilation, module.groups)


class ConvTranspose1d(nn.ConvTranspose1d):
    __doc__ = nn.ConvTranspose1d.__doc__

    def forward(self, input, output_size=None):
        return _conv_transpose_forward(self, input, output_size, 1, TF.conv_transpose1d)


class ConvTranspose2d(nn.ConvTranspose2d):
    __doc__ = nn.ConvTranspose2d.__doc__

    def forward(self, input, output_size=None):
        return _conv_transpose_forward(self, input, output_size, 2, TF.conv_transpose2d)


class ConvTranspose3d(nn.ConvTranspose3d):
    __doc__ = nn.ConvTranspose3d.__doc__

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
