import os

import numpy as np
import pytest
from hypothesis import settings

os.environ.setdefault("TRITON_HOME", os.path.join(os.environ.get("TMPDIR", "/tmp"), "fusec-triton-home"))
# Tests never read or write the user's autotune cache (only the shipped file, as users get it).
os.environ["FUSEC_AUTOTUNE_CACHE"] = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                  f"fusec-autotune-test-{os.getpid()}", "autotune.json")

# A fixed, modest example budget keeps the default run fast and repeatable; `HYPOTHESIS_PROFILE=long`
# gives the longer runs quoted in the docs, and the smoke subset a small one.
settings.register_profile("default", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("smoke", max_examples=8, deadline=None, derandomize=True)
settings.register_profile("long", max_examples=2000, deadline=None)

# The smoke subset (`pytest -m smoke`): per module, the first case of each of its first
# SMOKE_PER_MODULE test functions (or of the functions a module names in a `SMOKE` tuple), plus
# anything marked @pytest.mark.smoke; never a slow test. It runs with small example budgets.
SMOKE_PER_MODULE = int(os.environ.get("FUSEC_SMOKE_PER_MODULE", "2"))
SMOKE_BUDGETS = {"HYPOTHESIS_PROFILE": "smoke", "FUSEC_DIFF_EXAMPLES": "12", "FUSEC_SPECIAL_EXAMPLES": "8",
                 "FUSEC_TRITON_DIFF_EXAMPLES": "12"}


def pytest_configure(config: pytest.Config) -> None:
    # Runs before any test module is imported, so their @settings see the smoke budgets.
    if "smoke" in (config.option.markexpr or ""):
        for name, value in SMOKE_BUDGETS.items():
            os.environ.setdefault(name, value)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def smoke_items(items: list[pytest.Item]) -> list[pytest.Item]:
    """The items the smoke subset adds automatically: per module, the first case of each of its
    first SMOKE_PER_MODULE test functions that are not slow, or of those its ``SMOKE`` names."""
    chosen: list[pytest.Item] = []
    functions: dict[str, set[str]] = {}
    for item in items:
        if "slow" in item.keywords:
            continue
        seen = functions.setdefault(str(item.path), set())
        name = getattr(item, "originalname", item.name)
        named = getattr(item.module, "SMOKE", None) if isinstance(item, pytest.Function) else None
        if named is not None:
            if name in named and name not in seen:
                seen.add(name)
                chosen.append(item)
        elif len(seen) < SMOKE_PER_MODULE and name not in seen:
            seen.add(name)
            chosen.append(item)
    return chosen


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in smoke_items(items):
        item.add_marker(pytest.mark.smoke)
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
