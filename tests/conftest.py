"""Shared pytest configuration for the torch_convt test suite.

* seeds torch / random / numpy before every test so failures are reproducible,
* pins torch to 2 intra-op threads (the CI machine has 2 cores),
* registers the hypothesis profile used by test_properties.py.
"""
import os
import random
import sys

import numpy as np
import pytest
import torch

# helpers.py lives next to this file; make it importable no matter how pytest was invoked.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(2)

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
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield
