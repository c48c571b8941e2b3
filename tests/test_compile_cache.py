"""Compiled kernels are reused: identical kernels of repeated layers are one kernel (built once,
lowered once), and JAX's persistent compilation cache serves a second process everything."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fusec

REPO = Path(__file__).resolve().parent.parent


def _layers(h, ws):
    for w in ws:
        h = jax.nn.gelu(h @ w) + h
    return h


def test_repeated_layers_share_one_kernel() -> None:
    h = jnp.asarray(np.random.default_rng(0).standard_normal((8, 64)), jnp.float32)
    ws = [jnp.asarray(np.random.default_rng(i).standard_normal((64, 64)) * 0.1, jnp.float32) for i in (1, 2, 3)]
    fn = fusec.jit(_layers, backend="pallas", interpret=True)
    lowered = fn.lower(h, ws)
    kernels = lowered.program.kernels
    assert len(kernels) == 3 and len({id(spec) for spec in kernels.values()}) == 1
    cuda = lowered.lower_for("cuda").as_text()
    assert cuda.count("__gpu$xla.gpu.triton") == 1  # one Triton kernel, called from three places
    np.testing.assert_allclose(np.asarray(fn(h, ws)), np.asarray(jax.jit(_layers)(h, ws)), rtol=2e-5, atol=2e-5)


def test_kernels_differing_in_shape_or_op_are_not_shared() -> None:
    def f(x, y):
        return jnp.exp(x) + 1.0, jnp.exp(y) + 1.0, jnp.tanh(x) + 1.0

    fn = fusec.jit(f, backend="pallas", interpret=True)
    kernels = fn.lower(jnp.ones((8, 128)), jnp.ones((16, 128))).program.kernels
    assert len(kernels) >= 2  # x's and y's kernels differ in shape (x's exp and tanh may fuse)
    assert len({id(spec) for spec in kernels.values()}) == len(kernels)


_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import fusec
    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
    f = fusec.jit(lambda x, w: jax.nn.gelu(x @ w) + 1.0, backend="pallas", interpret=True)
    f(jnp.ones((8, 64)), jnp.ones((64, 64))).block_until_ready()
    print(sum(e.endswith("/cache_hits") for e in events), sum(e.endswith("/cache_misses") for e in events))
""")


def test_persistent_compilation_cache_serves_a_second_process(tmp_path: Path) -> None:
    def run() -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "cache")], capture_output=True,
                             text=True, check=True, cwd=REPO, timeout=300)
        hits, misses = out.stdout.split()[-2:]
        return int(hits), int(misses)

    hits, misses = run()
    assert hits == 0 and misses > 0
    assert run() == (misses, 0)  # everything the first process compiled, the second reads back


def test_timings_of_a_program_fusec_had_built_say_so() -> None:
    fn = fusec.jit(lambda x: jnp.tanh(x) * 2.0, backend="pallas", interpret=True)
    first = fn.lower(jnp.ones((8, 128))).timings
    assert first["trace"] > 0 and first["passes"] > 0 and first["codegen"] > 0
    again = fn.lower(jnp.ones((8, 128))).timings  # fusec's cache has the program: nothing is rebuilt
    assert again["trace"] == again["frontend"] == again["passes"] == again["codegen"] == 0.0
    assert again["emit"] > 0
