"""Model surgery: swap torch.nn convolutions for torch_convt's in place."""
import torch.nn as nn

from . import modules

_TRANSPOSED = {
    nn.ConvTranspose1d: modules.ConvTranspose1d,
    nn.ConvTranspose2d: modules.ConvTranspose2d,
    nn.ConvTranspose3d: modules.ConvTranspose3d,
}
_CONV = {nn.Conv1d: modules.Conv1d, nn.Conv2d: modules.Conv2d, nn.Conv3d: modules.Conv3d}


def convert(module: nn.Module, *, include_conv: bool = False) -> nn.Module:
    """Makes every torch.nn.ConvTranspose1d/2d/3d in `module` (and Conv1d/2d/3d if include_conv) compute with
    torch_convt, in place, and returns `module`.

    Only exact instances of those torch classes change: each becomes an instance of the torch_convt subclass
    (which overrides forward only), so it keeps the very same Parameter objects (optimizer state keeps working),
    buffers, hooks, training mode, device and dtype. Subclasses written by users are left alone.
    """
    mapping = dict(_TRANSPOSED)
    if include_conv:
        mapping.update(_CONV)
    for m in module.modules():
        ours = mapping.get(type(m))
        if ours is not None:
            m.__class__ = ours
    return module
