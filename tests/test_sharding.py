"""Sharded programs on 8 CPU devices (tests/sharding_checks.py, in a subprocess) and fusec.jit's
jax.jit keywords (in this process, on one device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec

CHECKS = Path(__file__).resolve().parent / "sharding_checks.py"


# Two processes of three cases each, side by side (each case compiles for about 5 s on one core).
GROUPS = (("dp_jit", "tp_jit", "dp_jit_unpartitioned"), ("dp_shard_map", "tp_shard_map", "constraints"))



@pytest.fixture(scope="module")
def sharded() -> dict[str, Any]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env.pop("FUSEC_PARTITION_KERNELS", None)
    procs = [subprocess.Popen([sys.executable, str(CHECKS), *group], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for group in GROUPS]
    out: dict[str, Any] = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-4000:]
        out |= json.loads(stdout.strip().splitlines()[-1])
    return out


def _case(sharded: dict[str, Any], name: str) -> dict[str, Any]:
    result = sharded[name]
    assert "exception" not in result, result.get("exception")
    print(name, {k: v for k, v in result.items() if k not in ("kernels", "program_kernels")})
    assert result["error"] < 1e-5
    assert result["sharding"] == result["jax_sharding"]
    # Each shard runs fusec's kernels, and no more collectives than jax.jit's program has.
    assert result["kernels"], "the compiled HLO runs no fusec kernel"
    for op in ("all_gather", "all_reduce"):
        assert result["fusec"][op] <= result["jax"][op], (op, result["fusec"], result["jax"])
    return result


def _per_shard(result: dict[str, Any]) -> set[str]:
    return {k.removesuffix("_shard") for k in result["kernels"] if k.endswith("_shard")}


def test_data_parallel_under_jit_shardings(sharded: dict[str, Any]) -> None:
    result = _case(sharded, "dp_jit")
    assert sharded["devices"] == 8 and not result["fallbacks"]
    # Every kernel runs rebuilt for its shard of the batch (the causal mask is computed inside the
    # attention kernel, which splits along the batch factor of its merged batch-heads axis).
    assert len(_per_shard(result)) == len(result["program_kernels"])


def test_tensor_parallel_mlp_under_jit_shardings(sharded: dict[str, Any]) -> None:
    result = _case(sharded, "tp_jit")
    # The column-split fc matmul and the row-split projection (its K split: per-shard kernels plus
    # one all-reduce, as jax.jit has) run per shard; attention stays replicated, as in jax.jit.
    assert _per_shard(result) == {"k_gpt2_block_k4", "k_gpt2_block_k5"}
    assert result["fusec"]["all_reduce"] == result["jax"]["all_reduce"] == 1


def test_data_parallel_under_shard_map_with_check_vma(sharded: dict[str, Any]) -> None:
    _case(sharded, "dp_shard_map")


def test_tensor_parallel_under_shard_map_with_check_vma(sharded: dict[str, Any]) -> None:
    result = _case(sharded, "tp_shard_map")
    assert result["fusec"]["all_reduce"] == 1


def test_nested_jit_shardings_and_constraints_are_compiled(sharded: dict[str, Any]) -> None:
    result = _case(sharded, "constraints")
    assert not result["fallbacks"]
    assert len(_per_shard(result)) >= len(result["program_kernels"]) - 1


def test_partitioning_can_be_turned_off(sharded: dict[str, Any]) -> None:
    result = sharded["dp_jit_unpartitioned"]
    assert result["error"] < 1e-5 and result["sharding"] == result["jax_sharding"]
    assert not _per_shard(result)  # the partitioner saw the kernels' own code
    print("FUSEC_PARTITION_KERNELS=0:", result["fusec"], "jax.jit:", result["jax"])


def test_sharding_constraint_op_in_the_ir() -> None:
    mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    inner = jax.jit(lambda x: jnp.tanh(x) * 2, in_shardings=s, out_shardings=s)
    f = lambda x: inner(jax.lax.with_sharding_constraint(x + 1, s))  # noqa: E731
    x = jnp.linspace(0, 1, 32).reshape(8, 4)
    lowered = fusec.jit(f).lower(x)
    assert not lowered.fallbacks
    assert lowered.as_text().count("sharding_constraint") == 3  # the constraint, jit's in and out
    np.testing.assert_allclose(fusec.jit(f)(x), jax.jit(f)(x), rtol=1e-6)


# -- jax.jit's keywords ------------------------------------------------------------------------
def test_jit_keywords_are_honoured() -> None:
    x, unused = jnp.arange(4.0), jnp.ones(3)
    f = lambda x, y: x * 2  # noqa: E731
    kept = fusec.jit(f, keep_unused=True).lower(x, unused).compile().as_text()
    assert "f32[3]" in kept.split("ENTRY")[1].split("\n")[0]  # the unused argument stays a parameter
    # inline=True as jax.jit does it: jax 0.10 inlines the call at trace time, 0.11 and 0.12 mark it.
    def calls(fn: Any) -> list[tuple[str, str]]:
        eqns = jax.make_jaxpr(fn)(x, unused).eqns
        return [(e.primitive.name, str(e.params.get("inline"))) for e in eqns if e.primitive.name in ("jit", "pjit")]

    assert calls(fusec.jit(f, inline=True)) == calls(jax.jit(f, inline=True)) != calls(jax.jit(f))
    cpu = jax.devices("cpu")[0]
    with warnings.catch_warnings():  # jax.jit's backend= is deprecated in favour of device_put
        warnings.simplefilter("ignore", DeprecationWarning)
        assert fusec.jit(f, jax_backend="cpu")(x, unused).devices() == {cpu}
    one = jax.sharding.SingleDeviceSharding(cpu)
    out = fusec.jit(f, in_shardings=(one, one), out_shardings=one, compiler_options={})(x, unused)
    assert out.sharding == one
    donated = fusec.jit(lambda x: x + 1, donate_argnums=0).lower(x)._jax_traced.lower().as_text()
    assert "jax.buffer_donor" in donated or "tf.aliasing_output" in donated
    np.testing.assert_array_equal(fusec.jit(lambda x, n: x * n, static_argnames="n")(x, n=3), x * 3)


def test_unknown_keywords_are_rejected_by_name() -> None:
    with pytest.raises(TypeError, match="'no_such_option'"):
        fusec.jit(lambda x: x, no_such_option=1)
    if "abstracted_axes" not in fusec.api.jax_jit_keywords():  # gone from jax.jit in this JAX
        with pytest.raises(TypeError, match="'abstracted_axes'"):
            fusec.jit(lambda x: x, abstracted_axes=("n",))
    with pytest.raises(ValueError, match="backend must be one of"):
        fusec.jit(lambda x: x, backend="cpu")  # fusec's codegen backend; the platform is jax_backend=
