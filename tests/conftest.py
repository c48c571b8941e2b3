import os

import numpy as np
import pytest
from hypothesis import settings

os.environ.setdefault("TRITON_HOME", os.path.join(os.environ.get("TMPDIR", "/tmp"), "fusec-triton-home"))

# A fixed, modest example budget keeps the default run fast and repeatable; `--hypothesis-profile=long`
# gives the longer runs quoted in the docs.
settings.register_profile("default", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("long", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def pytest_collection_modifyitems(config, items):
    try:
        import jax
        has_gpu = any(d.platform == "gpu" for d in jax.devices())
    except Exception:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
