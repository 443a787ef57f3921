"""Shared pytest configuration for the torch_convt test suite.

* seeds torch / random / numpy before every test so failures are reproducible,
* pins torch to 2 intra-op threads (the CI machine has 2 cores),
* registers the hypothesis profile used by test_properties.py (derandomized: the same examples every run;
  TORCH_CONVT_FUZZ_EXAMPLES=N runs N examples per fuzz test, TORCH_CONVT_FUZZ_SEED=S another fixed set),
* provides the ``device`` fixture ("cpu", "cuda"): the CUDA variant of every device-generic test always exists
  (stable test ids) and is skipped with the reason "no CUDA device" when torch sees no GPU. The same list is
  importable as ``helpers.DEVICES`` for ``@pytest.mark.parametrize("device", DEVICES)`` where a fixture does
  not fit (hypothesis tests); ``helpers.CUDA_ONLY`` has the CUDA entry alone,
* turns TF32 off on CUDA, so that torch's float32 reference is accurate to ~1e-6 relative.
"""
import os
import random
import sys

import numpy as np
import pytest
import torch

# helpers.py lives next to this file; make it importable no matter how pytest was invoked.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import CUDA_AVAILABLE, CUDA_ONLY, DEVICES  # noqa: E402,F401  (re-exported for the test files)

torch.set_num_threads(2)


def _disable_tf32():
    # torch's CUDA float32 convolutions (cuDNN) and matmuls may use TF32 (10-bit mantissa) by default; the parity
    # tests compare float32 at 1e-5 relative, so the reference must be computed in true float32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


if CUDA_AVAILABLE:
    _disable_tf32()

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "torch_convt",
        derandomize=True,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                               HealthCheck.data_too_large],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "torch_convt"))
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass


def pytest_configure(config):
    # torch (and torch_convt, which mirrors it) warn about the asymmetric zero pad of padding='same' with an
    # even dilated kernel; many tests use that configuration on purpose.
    config.addinivalue_line("filterwarnings",
                            "ignore:Using padding='same' with even kernel lengths:UserWarning")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)  # (seeds the CUDA generators too)
    random.seed(0)
    np.random.seed(0)
    if CUDA_AVAILABLE:
        _disable_tf32()  # again, in case a test switched it back on
    yield


@pytest.fixture(params=DEVICES)
def device(request):
    """The device ("cpu" or "cuda") a device-generic test runs on. After a CUDA test, synchronize so that an
    asynchronous kernel error is reported by the test that caused it."""
    yield request.param
    if request.param == "cuda":
        torch.cuda.synchronize()
