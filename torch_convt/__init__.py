"""torch_convt: drop-in, from-scratch transposed convolutions for PyTorch.

    import torch_convt
    model = torch_convt.convert(model)            # swap every nn.ConvTranspose1d/2d/3d for ours, in place
    layer = torch_convt.ConvTranspose3d(16, 33, 3, stride=2)   # or build layers directly
    y = torch_convt.functional.conv_transpose3d(x, weight, bias, stride=2)

The compute lives in three C++ operators (torch.ops.torch_convt.conv_transpose / conv / conv_weight_grad)
whose gradients are written with each other; see README.md.
"""
import glob as _glob
import os as _os

import torch as _torch

__version__ = "0.1.0"


def _load_library():
    here = _os.path.dirname(_os.path.abspath(__file__))
    candidates = sorted(_glob.glob(_os.path.join(here, "_C*.so")) + _glob.glob(_os.path.join(here, "_C*.pyd")))
    hint = (
        "Build it from the repository root with\n"
        "    MAX_JOBS=2 pip install --no-build-isolation -e .\n"
        "(needs torch installed first, a C++17 compiler and ninja; see README.md)."
    )
    if not candidates:
        raise ImportError(f"torch_convt: the compiled operator library (torch_convt/_C.so) was not found. {hint}")
    try:
        _torch.ops.load_library(candidates[0])
    except OSError as e:  # e.g. built against another torch version
        raise ImportError(
            f"torch_convt: the compiled operator library {candidates[0]} failed to load ({e}). It must be built "
            f"against the torch installed now ({_torch.__version__}). {hint}"
        ) from e


_load_library()

from . import _C  # noqa: E402
from . import ops  # noqa: E402  (registers fake kernels and autograd)
from . import functional  # noqa: E402
from .convert import convert  # noqa: E402
from .modules import Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d  # noqa: E402


def empty_cache() -> int:
    """Releases the memory torch_convt keeps for reuse (CPU). An output of 1 MiB or more leaves its memory, when it
    is freed, to the next output that fits (at most 4 blocks, 1 GiB in all by default), so that a layer called again
    does not pay for fresh pages, which the OS zeroes on first touch: a third of a large up-sampling layer's time.
    Float32 layers computed by Winograd keep their transformed weights for later calls with the same weights (at most
    64 MiB per calling thread; a copy of the weights is compared byte for byte), which this releases for the calling
    thread. Like torch.cuda.empty_cache(), this returns idle memory to the system (and says how many bytes); outputs
    in use are not affected."""
    return _C.empty_cache()


def set_cache_limit(nbytes: int) -> int:
    """Sets the most memory torch_convt keeps for reuse (see empty_cache; 0 keeps none) and returns the previous
    limit (of outputs' memory). What is kept beyond the new limit is released at once; transformed weights are kept
    up to the limit or 64 MiB per thread, whichever is less (with 0, none from the next call on)."""
    return _C.set_cache_limit(int(nbytes))


def set_amx(on: bool) -> bool:
    """bfloat16 layers run their GEMMs on the CPU's AMX tile unit where it has one (Intel Sapphire Rapids and later,
    on Linux), else on its AVX512-BF16 dot products where it has those (AMD Zen 4 and later, Intel Cooper Lake): the
    products of bfloat16 values are exact and summed in float, as on the FMA units, in another order, and float
    subnormals are flushed to zero (as torch.nn's bfloat16 convolutions on those units do). set_amx(False) computes
    them on the FMA units instead, set_amx(True) goes back; returns whether either unit was in use before."""
    return _C.set_amx(bool(on))


def set_winograd(on: bool) -> bool:
    """float32 layers at stride 1 with 3x3 or 3x3x3 kernels (conv and conv_transpose, so also the input gradients of
    such layers; dilated ones by their sub-lattices) compute by Winograd F(2, 3), and transposed layers at stride 2
    with kernel 4 padding 1 or kernel 3 padding 0 or 1 (and so the input gradients of such convolutions) by F(2, 2) on
    their even and odd output points, convolutions at stride 2 with kernel 4 (GAN discriminators, and the input
    gradients of kernel-4 transposed layers) by F(2, 2) on the two sub-lattices of their input, and kernel 2 at stride 1
    by F(2, 2), and 1d transposed layers at stride s by kernel 2s (vocoders' up-samplers: HiFi-GAN's, MelGAN's) by
    F(3, 2) on triples of each phase's points (0.67 of the multiply-adds; 384 input channels a group or more), on CPUs
    with AVX-512 or AVX2 + FMA, where they have 16 channels a group or more and enough points to pay for transforming
    the weights: 0.30 of the multiply-adds of direct summation for 3x3x3 kernels (0.44 for 3x3), 0.42 for kernel 4 at
    stride 2 in 3d (0.56 in 2d), 0.58 for the kernel-3 transposed one, with errors of the same size (a 32-channel 3d
    layer: 3e-7 of the largest output, direct summation 5e-7, both against float64), deterministic as every other
    path, and non-finite inputs handled as direct summation does. bfloat16 and float16 layers of these kinds (dense
    rows; not dilated, not strided convolutions; bfloat16 only on CPUs without AMX) compute the same way on their
    values widened to float32, the output rounded once. set_winograd(False) computes them by direct summation instead,
    set_winograd(True) goes back; returns whether Winograd was on before."""
    return _C.set_winograd(bool(on))


__all__ = [
    "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Conv1d", "Conv2d", "Conv3d",
    "convert", "empty_cache", "functional", "ops", "set_amx", "set_cache_limit", "set_winograd",
]
