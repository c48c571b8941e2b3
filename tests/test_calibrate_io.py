"""Saving and loading quantized pytrees, calibrate's progress bar, its bad-input errors, and the
fast nearest-code lookup calibration relies on (exactly ``Format.encode``)."""

from __future__ import annotations

import functools
import importlib
import io
import json
import struct
from collections import namedtuple
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec import lowprec
from fusec.lowprec.nearest import nearest

calibrate_module = importlib.import_module("fusec.lowprec.calibrate")  # the package exports a function by that name


def _mlp(params, x):
    return jax.nn.relu(x @ params["l0"]["w"] + params["l0"]["b"]) @ params["l1"]["w"].T


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"l0": {"w": jnp.asarray(rng.standard_normal((64, 128)) * 0.2, jnp.float32),
                   "b": jnp.asarray(rng.standard_normal(128) * 0.1, jnp.float32)},
            "l1": {"w": jnp.asarray(rng.standard_normal((32, 128)) * 0.2, jnp.float32)}}


def _batches(n: int = 2, rows: int = 48) -> list[tuple[jax.Array]]:
    rng = np.random.default_rng(1)
    mix = rng.standard_normal((64, 64)) * np.linspace(0.2, 2.0, 64)
    return [(jnp.asarray(rng.standard_normal((rows, 64)) @ mix, jnp.float32),) for _ in range(n)]


def _same(a: Any, b: Any) -> None:
    """Bitwise equal trees: same structure, node types, metadata, and leaf bytes and dtypes."""
    la, ta = jax.tree.flatten(a, is_leaf=lambda x: x is None)
    lb, tb = jax.tree.flatten(b, is_leaf=lambda x: x is None)
    assert ta == tb  # includes every QuantizedArray's format, group, shape, dtype and contract
    for x, y in zip(la, lb):
        assert type(x) is type(y)
        if isinstance(x, (np.ndarray, jax.Array, np.generic)):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        else:
            assert x == y or (isinstance(x, float) and np.isnan(x) and np.isnan(y))


@pytest.fixture(scope="module")
def calibrated() -> dict:
    # Mixed widths, learned tables, a transposed (axis 1) weight: the calibrate output to round-trip.
    return lowprec.calibrate(_mlp, _params(), _batches(n=1), budget=4.0, group=32, fmt="lut")


def test_a_calibrated_tree_round_trips_bitwise_and_runs_the_same(calibrated: dict, tmp_path) -> None:
    path = tmp_path / "q.safetensors"
    lowprec.save(path, calibrated)
    back = lowprec.load(path)
    _same(calibrated, back)
    assert {back[k]["w"].fmt.bits for k in ("l0", "l1")} == {calibrated[k]["w"].fmt.bits for k in ("l0", "l1")}
    assert back["l1"]["w"].contract == (1,) and back["l0"]["w"].fmt.lut == calibrated["l0"]["w"].fmt.lut
    x = _batches(n=1)[0][0][:8]
    run = fusec.jit(_mlp, backend="pallas", interpret=True)
    np.testing.assert_array_equal(np.asarray(run(back, x)), np.asarray(run(calibrated, x)))


def test_every_format_layout_and_container_round_trips(tmp_path) -> None:
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    conv = jnp.asarray(rng.standard_normal((4, 16, 24)), jnp.bfloat16)  # leading axes contracted
    specs = [lowprec.QuantSpec(3, 32, "uint", scale_dtype="f16"), lowprec.QuantSpec(4, None, "nf", scale_dtype="f32"),
             lowprec.QuantSpec(4, 16, "fp", layout="e2m1"), lowprec.QuantSpec(7, 32, "int", axis=1),
             lowprec.QuantSpec(2, 32, "lut", lut=(-1.0, -0.25, 0.5, 1.0))]
    tree = {"q": [lowprec.quantize(w, s) for s in specs],
            "conv": lowprec.quantize({"c": conv}, lowprec.QuantSpec(5, 32), axes={"['c']": (0, 1)})["c"],
            "misc": (None, 3, 2.5, float("nan"), "text", True, np.float32(1.5), np.arange(3, dtype=np.int64)),
            "nested": {"empty": [], "t": (), "bf": jnp.asarray([1.5, -0.0, np.inf], jnp.bfloat16)},
            "dtype": np.dtype("float16")}
    lowprec.save(tmp_path / "t.safetensors", tree)
    back = lowprec.load(tmp_path / "t.safetensors")
    _same(tree, back)
    assert back["dtype"] == np.dtype("float16") and back["q"][1].scales.dtype == jnp.float32


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weight", "signs"], meta_fields=["block"])
@dataclass(frozen=True)
class Rotated:
    """A user node with an extra static field, as a rotation wrapper around a weight might be."""

    weight: Any
    signs: Any
    block: int = 0


def test_user_dataclasses_load_only_when_named(tmp_path) -> None:
    q = lowprec.quantize(jnp.ones((32, 8)), lowprec.QuantSpec(4, 32))
    tree = {"r": Rotated(q, np.array([1, -1], np.int8), block=32)}
    path = tmp_path / "r.safetensors"
    lowprec.save(path, tree)
    with pytest.raises(ValueError, match=r"r\.safetensors.*Rotated.*classes="):
        lowprec.load(path)
    back = lowprec.load(path, classes=[Rotated])
    _same(tree, back)
    assert back["r"].block == 32


def test_unsupported_nodes_are_named_and_write_nothing(tmp_path) -> None:
    path = tmp_path / "x.safetensors"
    lowprec.save(path, {"ok": jnp.ones(2)})
    before = path.read_bytes()
    point = namedtuple("point", "x y")
    for tree, what in [({"a": [point(1, 2)]}, r"\['a'\]\[0\]: cannot save a .*point"),
                       ({"c": np.ones(2, np.complex64)}, r"\['c'\]: safetensors has no dtype for complex64"),
                       ({(1, 2): 3}, "dict keys must be str or int")]:
        with pytest.raises(ValueError, match=what):
            lowprec.save(path, tree)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_corrupt_and_truncated_files_name_the_file(calibrated: dict, tmp_path) -> None:
    path = tmp_path / "q.safetensors"
    lowprec.save(path, calibrated)
    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + size])
    bad_entry = dict(header, **{"['l0']['b']": {"dtype": "F32", "shape": [999], "data_offsets": [0, 4]}})
    cases = {"empty": (b"", "shorter than its 8-byte header"),
             "cut": (blob[:-5], "truncated"),
             "cut_header": (blob[:8 + size // 2], "truncated or not a safetensors file"),
             "garbage": (struct.pack("<Q", 4) + b"{{{{", "corrupt safetensors header"),
             "tail": (blob + b"xx", "bytes after the last tensor"),
             "entry": (_with_header(bad_entry, blob[8 + size:]), r"has 4 bytes for shape \[999\]"),
             "tree": (_with_header(dict(header, __metadata__={"fusec.tree": "{"}), blob[8 + size:]),
                      "corrupt fusec tree description")}
    for name, (data, what) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}\\.safetensors: .*{what}"):
            lowprec.load(p)


def _with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_progress_shows_phase_count_elapsed_and_eta(tty: bool) -> None:
    stream = _Stream(tty)
    lowprec.calibrate(_mlp, _params(), _batches(n=1), budget=4.0, group=32, widths=(3, 4, 5), progress=stream)
    text = stream.getvalue()
    for phase in ("sensitivity", "model effect", "quantize"):
        assert f"calibrate: {phase} [" in text and "2/2 elapsed" in text
    assert "ETA" in text and "statistics: X^T X of 2 matrices from 1 batches" in text
    lines = text.split("\n")[:-1]
    if tty:  # one line per phase, rewritten in place: each update starts with a carriage return
        assert len(lines) == 4 and all(line.startswith("\r") for line in lines)
        assert text.count("\r") > len(lines) and text.count("\x1b[K") == text.count("\r")
    else:
        assert "\r" not in text and all(line.startswith("calibrate: ") for line in lines)


def test_bad_input_is_named_before_anything_is_quantized(monkeypatch) -> None:
    def never(*args: Any, **kw: Any) -> None:
        raise AssertionError("a weight was quantized before the input was checked")

    monkeypatch.setattr(calibrate_module, "_one", never)
    params, batches = _params(), _batches()
    nan = [(batches[0][0].at[3, 5].set(jnp.nan),)]
    cases = [(dict(batches=[]), "at least one calibration batch"),
             (dict(batches=None), "batches must be an iterable"),
             (dict(batches=[(jnp.ones((4, 63)),)]), "calibration batch 0: apply_fn"),
             (dict(batches=nan), "non-finite inputs"),
             (dict(budget=0.99), "budget must be an average of 1 to 8 bits"),
             (dict(budget=8.01), "budget must be an average of 1 to 8 bits"),
             (dict(budget=True), "bits and budget are numbers of bits"),
             (dict(bits=4, where=lambda p, leaf: "nope" in p), "no matrix to quantize"),
             (dict(bits=4, group=48), "not a whole number of 48-row groups")]
    for kw, what in cases:
        kw = {"batches": batches, **kw}
        if "bits" not in kw and "budget" not in kw:
            kw["bits"] = 4
        with pytest.raises(ValueError, match=what):
            lowprec.calibrate(_mlp, params, **kw)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params))  # the input is untouched


@pytest.mark.parametrize("fmt", [lowprec.Format("nf", b) for b in (2, 3, 4, 6, 8)] + [
    lowprec.fp_format("e2m1"), lowprec.fp_format("e4m3"), lowprec.fp_format("e5m2"), lowprec.Format("int", 3),
    lowprec.Format("lut", 3, lut=(-1.0, -0.5, -0.5, 0.0, 0.1, 0.1 + 1e-12, 0.7, 1.0)),
    lowprec.Format("lut", 1, lut=(0.5, 0.5))], ids=str)
def test_nearest_codes_are_exactly_encode(fmt: lowprec.Format) -> None:
    rng = np.random.default_rng(5)
    t = fmt.finite_values
    mids = (t[1:] + t[:-1]) / 2
    x = np.concatenate([rng.standard_normal(20000) * fmt.max_abs * 0.6, rng.uniform(-3, 3, 20000) * fmt.max_abs, t,
                        mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf),
                        [np.inf, -np.inf, np.nan, 0.0, -0.0, 1e300, -1e300, 5e-324]])
    codes, values = nearest(x, fmt)
    np.testing.assert_array_equal(codes, fmt.encode(x))
    np.testing.assert_array_equal(values, fmt.table[codes])
