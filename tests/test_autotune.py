"""The autotuner (fake timers), its config space, and the persistent cache: round trips, keys,
corrupt files, concurrent writers, the shipped file and the environment variable."""

from __future__ import annotations

import json
import multiprocessing
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec import lowprec
from fusec.passes import tune_cache
from fusec.passes.tune_cache import MODEL_DEVICE, Entry, TuneKey, cache_path, lookup, store, write_entries
from fusec.passes.tune_space import TileConfig, candidates, check_config
from fusec.pipeline import DEFAULT_PIPELINE, KERNEL_PASSES
from fusec.runtime.autotune import store_result, tunable_kernels, tune


def _weight(k: int, n: int, dtype=jnp.bfloat16, bits: int = 4, group: int = 128):
    w = jnp.asarray(np.random.default_rng(k + n).standard_normal((k, n)) * 0.1, dtype)
    return lowprec.quantize({"w": w}, lowprec.QuantSpec(bits, group))["w"]


def _lower(m: int = 1, k: int = 256, n: int = 200, dtype=jnp.bfloat16, passes=None):
    fused = fusec.jit(lambda q, x: x @ q, backend="pallas", interpret=False, passes=passes)
    return fused.lower(_weight(k, n, dtype), jax.ShapeDtypeStruct((m, k), dtype))


def _matmul(lowered):
    return next(o for o in lowered.program.module.entry.ops if o.opcode == "kernel" and o.attr("kind") == "matmul")


@pytest.fixture
def kernel():
    (k,) = tunable_kernels(_lower().program.module)
    return k


@pytest.fixture
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "user" / "autotune.json"
    monkeypatch.setenv("FUSEC_AUTOTUNE_CACHE", str(path))
    return path


def test_tuner_picks_the_fake_timer_minimum(kernel) -> None:
    configs = kernel.candidates(8)
    assert len(configs) > 3 and configs[0] == kernel.default and len(set(configs)) == len(configs)
    rng = random.Random(0)
    times = {c: rng.uniform(1e-6, 1e-5) for c in configs}
    result = tune(kernel, configs, timer=times.__getitem__)
    assert result.best == min(times, key=times.__getitem__) and result.method == "gpu-timed"
    assert result.best_time_s == min(times.values())
    # With a model, only its top two are timed; the timer's choice among them wins.
    calls: list[TileConfig] = []
    model = {c: float(i) for i, c in enumerate(reversed(configs))}
    timer = lambda c: (calls.append(c), times[c])[1]  # noqa: E731
    pruned = tune(kernel, configs, timer=timer, model=model.__getitem__, top=2)
    assert set(calls) == set(configs[-2:]) and pruned.best == min(configs[-2:], key=times.__getitem__)
    calls.clear()
    broken_model = tune(kernel, configs, timer=timer, model=lambda c: 1 / 0, top=2)  # e.g. no sm_90 tools
    assert set(calls) == set(configs) and broken_model.best == min(times, key=times.__getitem__)
    calls.clear()
    with_default = tune(kernel, configs, timer=timer, model=model.__getitem__, top=2, baseline=configs[0])
    assert set(calls) == {configs[0], *configs[-2:]}
    assert with_default.best == min([configs[0], *configs[-2:]], key=times.__getitem__)


def test_model_only_path_ranks_by_modeled_time(kernel) -> None:
    configs = kernel.candidates(6)
    modeled = {c: 1e-6 * (1 + (hash(c.label) % 97)) for c in configs}
    result = tune(kernel, configs, model=modeled.__getitem__)
    assert result.method == "model" and not result.timed
    assert [t for _, t in result.modeled] == sorted(modeled.values())
    assert result.best == min(modeled, key=modeled.__getitem__)


def test_failing_candidates_lose_and_all_failing_is_an_error(kernel) -> None:
    configs = kernel.candidates(4)

    def timer(c: TileConfig) -> float:
        if c == configs[0]:
            raise RuntimeError("does not compile")
        return float("nan") if c == configs[1] else 1.0 + configs.index(c)

    result = tune(kernel, configs, timer=timer)
    assert result.best == configs[2] and {c for c, _ in result.errors} == set(configs[:2])
    with pytest.raises(RuntimeError, match="every candidate"):
        tune(kernel, configs, timer=lambda c: 1 / 0)
    with pytest.raises(ValueError, match="timer"):
        tune(kernel, configs)


def test_candidates_are_legal_and_configs_are_checked(kernel) -> None:
    for c in kernel.candidates(32):
        check_config(kernel.facts, c)
    with pytest.raises(ValueError, match="bk = 48 is not a power of two"):
        check_config(kernel.facts, TileConfig(16, 64, 48))
    with pytest.raises(ValueError, match="split = 3"):
        check_config(kernel.facts, TileConfig(16, 64, 64, 3))
    with pytest.raises(ValueError, match="split = 8 does not divide the 4 K steps"):
        check_config(kernel.facts, TileConfig(16, 64, 64, 8))
    with pytest.raises(ValueError, match="scale group"):
        check_config(kernel.facts, TileConfig(16, 64, 256))
    with pytest.raises(ValueError, match="block_m = 4"):
        check_config(kernel.facts, TileConfig(4, 64, 64))  # a bfloat16 weight multiplies on tensor cores
    with pytest.raises(ValueError, match="num_warps"):
        TileConfig(16, 64, 64, 1, 0)
    with pytest.raises(ValueError, match="of the form"):
        TileConfig.parse("m16n64")
    assert TileConfig.parse("m16n128k128s4w4p3") == TileConfig(16, 128, 128, 4, 4, 3)


@pytest.mark.parametrize("m,dtype,pick", [(1, jnp.float32, 0), (5, jnp.bfloat16, 1), (40, jnp.float32, 2)])
def test_tuned_configs_are_exact_in_interpret_mode(m: int, dtype, pick: int) -> None:
    """Candidates other than the default (FMA rows, split-K, GEMM blocks) give the reference's answer."""
    k, n = 256, 200
    (kern,) = tunable_kernels(_lower(m, k, n, dtype).program.module)
    others = kern.candidates(64)[1:]
    config = random.Random(m).choice(others)
    if pick == 0:
        assert kern.default.block_m == 1  # the FMA path is among the candidates it varies
    passes = ",".join([*DEFAULT_PIPELINE, *KERNEL_PASSES, f"tile{{target=gpu,config={config.label}}}",
                       "fold-views", "dce", "to-tile"])
    q, x = _weight(k, n, dtype), jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), dtype)
    fused = fusec.jit(lambda q, x: x @ q, backend="pallas", interpret=True, passes=passes)
    op = _matmul(fused.lower(q, x))
    assert op.attr("tuned") == "option" and tuple(op.attr("block"))[-1] == config.block_n
    want = np.asarray(x.astype(jnp.float32) @ lowprec.dequantize(q).astype(jnp.float32))
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(fused(q, x).astype(jnp.float32)), want, rtol=tol, atol=tol)


def test_tile_pass_rejects_a_config_that_does_not_fit() -> None:
    passes = ",".join([*DEFAULT_PIPELINE, *KERNEL_PASSES, "tile{target=gpu,config=m16n64k64s8w4p3}", "to-tile"])
    with pytest.raises(ValueError, match=r"tile: config m16n64k64s8w4p3 for kernel .*split = 8"):
        _lower(passes=passes)


def test_cache_round_trip_changes_the_generated_kernel(kernel, user_cache: Path) -> None:
    best = TileConfig(16, 64, 64, 2, 8, 4)
    assert best != kernel.default and best in kernel.candidates(64)
    result = tune(kernel, [kernel.default, best], timer={kernel.default: 2.0, best: 1.0}.__getitem__)
    key = store_result(result)
    assert user_cache.exists() and lookup(key) == (Entry(best, "gpu-timed", 1.0), "cache")
    op = _matmul(_lower())
    assert op.attr("tuned") == "cache:gpu-timed" and op.attr("split") == best.split
    assert tuple(op.attr("block")) == (best.block_m, best.block_n) and op.attr("num_stages") == best.num_stages
    assert "tuned" not in _matmul(_lower(k=512)).attr_dict  # another shape: not this entry


def test_key_changes_with_device_versions_and_shapes(kernel, user_cache: Path) -> None:
    key = kernel.key("NVIDIA H200")
    assert key.text() != kernel.key("NVIDIA H100").text() != kernel.key().text()
    other_versions = TuneKey(key.fingerprint, key.shapes, key.dtypes, key.device, (("jax", "0.11.2"),))
    other_shapes = TuneKey(key.fingerprint, ((1, 2),), key.dtypes, key.device, key.versions)
    assert len({key.text(), other_versions.text(), other_shapes.text()}) == 3
    store(key, Entry(kernel.default, "gpu-timed", 1e-6))
    assert lookup(key) is not None and lookup(kernel.key("NVIDIA H100")) is None
    assert lookup(other_versions) is None and lookup(other_shapes) is None
    # A device with no timed entry falls back to the static model's entry in the same cache.
    store(kernel.key(), Entry(kernel.default, "model", 2e-6))
    assert lookup(kernel.key("NVIDIA H100")) == (Entry(kernel.default, "model", 2e-6), "cache")
    assert kernel.key().device == MODEL_DEVICE


@pytest.mark.parametrize("text", ["\x00garbage\xff{", '{"schema": "fusec-autotune/1", "entries": {"a": ', "[1, 2]",
                                  '{"schema": "other", "entries": {}}'])
def test_corrupt_cache_warns_falls_back_and_is_rewritten(kernel, user_cache: Path, text: str) -> None:
    user_cache.parent.mkdir(parents=True)
    user_cache.write_text(text, errors="surrogateescape")
    with pytest.warns(UserWarning, match="corrupt"):
        assert lookup(kernel.key()) is None
    op = _matmul(_lower())  # tiling still works (the warning came once, for this version of the file)
    assert "tuned" not in op.attr_dict
    store(kernel.key(), Entry(kernel.default, "model", 1e-6))
    data = json.loads(user_cache.read_text())
    assert data["schema"] == tune_cache.SCHEMA and list(data["entries"]) == [kernel.key().text()]


def test_bad_entries_are_skipped_with_a_warning(kernel, user_cache: Path) -> None:
    good = TileConfig(16, 64, 64, 2, 4, 3)
    bad_fit = TileConfig(16, 64, 64, 8, 4, 3)  # legal in form, but split 8 does not divide 4 K steps
    user_cache.parent.mkdir(parents=True)
    user_cache.write_text(json.dumps({"schema": tune_cache.SCHEMA, "entries": {
        "x": {"config": {"block_m": 16}, "method": "model"}, kernel.key().text(): Entry(bad_fit, "model").as_json()}}))
    with pytest.warns(UserWarning, match="bad entry"):
        found = lookup(kernel.key())
    assert found == (Entry(bad_fit, "model"), "cache")
    with pytest.warns(UserWarning, match="ignored: .*split = 8"):
        assert "tuned" not in _matmul(_lower()).attr_dict
    store(kernel.key(), Entry(good, "model"))  # the rewrite drops the entry that does not parse
    assert list(json.loads(user_cache.read_text())["entries"]) == [kernel.key().text()]
    assert _matmul(_lower()).attr("tuned") == "cache:model"


def _writer(path: str, worker: int, count: int) -> None:
    for i in range(count):
        key = TuneKey(f"fp{worker}-{i}", ((worker, i),), ("f32",), "dev", ())
        store(key, Entry(TileConfig(16, 16 << (i % 3), 32), "model", float(i)), Path(path))


@pytest.mark.filterwarnings("ignore:os.fork")  # the children run pure Python (no JAX)
def test_concurrent_writers_keep_every_entry(tmp_path: Path) -> None:
    path = tmp_path / "shared.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 10)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    data = json.loads(path.read_text())
    assert len(data["entries"]) == 40
    for w in range(4):
        for i in range(10):
            key = TuneKey(f"fp{w}-{i}", ((w, i),), ("f32",), "dev", ())
            assert lookup(key, path, shipped=None) == (Entry(TileConfig(16, 16 << (i % 3), 32), "model", float(i)),
                                                       "cache")
    assert not list(tmp_path.glob("*.tmp"))


def test_shipped_file_is_consulted_after_the_user_cache(kernel, tmp_path: Path, user_cache: Path) -> None:
    shipped = tmp_path / "shipped.json"
    config = kernel.candidates(4)[1]
    write_entries(shipped, {kernel.key().text(exact=False): Entry(config, "model", 1e-6).as_json()}, note="test")
    other_device = kernel.key("NVIDIA B200")  # shipped entries match any device and version
    assert lookup(other_device, shipped=shipped) == (Entry(config, "model", 1e-6), "shipped")
    store(other_device, Entry(kernel.default, "gpu-timed", 5e-7))
    assert lookup(other_device, shipped=shipped)[1] == "cache"


def test_package_ships_model_picked_entries() -> None:
    data = json.loads(tune_cache.SHIPPED.read_text())
    assert data["schema"] == tune_cache.SCHEMA and "not GPU-timed" in data["note"] and data["entries"]
    for raw in data["entries"].values():
        entry = Entry.from_json(raw)
        assert entry.method == "model" and entry.time_s > 0
    # The benchmark's M = 1, 4096 x 4096 GEMV takes its shipped config (lowering only: no arrays).
    from bench.sass_report import weight_struct

    q = weight_struct(4096, 4096)
    fused = fusec.jit(lambda q, x: x @ q, backend="pallas", interpret=False)
    lowered = fused.lower(q, jax.ShapeDtypeStruct((1, 4096), jnp.bfloat16))
    op = _matmul(lowered)
    (kern,) = tunable_kernels(lowered.program.module)
    entry, _ = lookup(kern.key(), shipped=tune_cache.SHIPPED)
    assert op.attr("tuned") == "shipped:model" and op.attr("split") == entry.config.split
    assert tuple(op.attr("block")) == (entry.config.block_m, entry.config.block_n)
    # The kernel report names the config and where it came from.
    from fusec.report import build_report

    report = build_report(lowered)
    assert report.kernels[0].gpu_config == f"{entry.config.label} (shipped:model)"
    assert f"gpu tiles {entry.config.label} (shipped:model)" in str(report)


def test_env_var_and_default_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSEC_AUTOTUNE_CACHE", str(tmp_path / "mine.json"))
    assert cache_path() == tmp_path / "mine.json"
    key = TuneKey("fp", ((1,),), ("f32",))
    store(key, Entry(TileConfig(16, 16, 16), "model"))
    assert (tmp_path / "mine.json").exists() and lookup(key, shipped=None) is not None
    monkeypatch.delenv("FUSEC_AUTOTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_path() == tmp_path / "xdg" / "fusec" / "autotune.json"
    assert lookup(key, shipped=None) is None


def test_tune_function_ranks_by_the_static_model(tmp_path: Path) -> None:
    """No GPU: two candidates compiled for sm_90 and modeled; the winner is stored and then used."""
    from fusec.tune import tune_function
    from tests.test_sass import _tools_or_skip

    _tools_or_skip()
    path = tmp_path / "tuned.json"
    q, x = _weight(256, 256), jax.ShapeDtypeStruct((1, 256), jnp.bfloat16)
    (result,) = tune_function(lambda q, x: x @ q, q, x, method="model", limit=2, path=path)
    assert result.method == "model" and len(result.modeled) == 2 and not result.errors
    assert result.modeled[0][1] <= result.modeled[1][1] and result.best == result.modeled[0][0]
    found = lookup(result.kernel.key(), path, shipped=None)
    assert found == (Entry(result.best, "model", result.modeled[0][1]), "cache")


def test_candidates_respect_the_limit(kernel) -> None:
    assert len(candidates(kernel.facts, kernel.default, 3)) == 3
