"""Saving and loading parameter pytrees with ``QuantizedArray`` leaves, as safetensors files.

``save(path, tree)`` writes the safetensors layout with NumPy alone: an 8-byte little-endian header
length, a JSON header naming every tensor (dtype, shape, byte range), then the raw bytes. Every
array in the tree (a ``QuantizedArray``'s planes, scales and zero-points included) is one tensor,
named by its path; the tree itself (dicts, lists, tuples, None, scalars, dtypes, and dataclasses
such as ``QuantizedArray`` and its ``Format`` with every field) is JSON in the header's
``__metadata__["fusec.tree"]``, so other safetensors readers still see every tensor. ``load``
rebuilds the tree bit for bit: JAX arrays come back as JAX arrays, NumPy arrays as NumPy arrays.
A file that safetensors wrote without that entry loads as a flat ``{name: array}`` dict.

Classes are looked up by name only in fusec's own modules, or among the ``classes`` given to
``load``, so a file never chooses what code runs. Any other pytree node (a namedtuple, a custom
registered class, a Flax ``State``: convert it with ``nnx.to_pure_dict`` first) is an error naming
its path.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import struct
import sys
import tempfile
from collections.abc import Iterable
from typing import Any

import jax
import ml_dtypes
import numpy as np

TREE_KEY = "fusec.tree"
VERSION = 1
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
           "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit
_BIG_ENDIAN = sys.byteorder == "big"


class _Writer:
    """Walks a tree into a JSON description, collecting its arrays as named tensors."""

    def __init__(self) -> None:
        self.tensors: dict[str, np.ndarray] = {}

    def node(self, x: Any, path: str) -> Any:
        if x is None:
            return {"t": "none"}
        if isinstance(x, (bool, int, float, str)) and type(x) in (bool, int, float, str):
            return {"t": "scalar", "v": x}
        if isinstance(x, np.dtype):
            return {"t": "dtype", "v": x.name}
        if isinstance(x, (np.ndarray, np.generic, jax.Array)):
            return self.array(x, path)
        if type(x) is dict:
            if not all(type(k) in (str, int) for k in x):
                raise ValueError(f"{path or 'the tree'}: dict keys must be str or int to be saved, got "
                                 f"{sorted({type(k).__name__ for k in x})}")
            return {"t": "dict", "items": [[k, self.node(v, f"{path}[{k!r}]")] for k, v in x.items()]}
        if type(x) in (list, tuple):
            return {"t": type(x).__name__, "items": [self.node(v, f"{path}[{i}]") for i, v in enumerate(x)]}
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            fields = dataclasses.fields(x)
            if any(not f.init for f in fields):
                raise ValueError(f"{path or 'the tree'}: {type(x).__qualname__} has fields its constructor does "
                                 "not take, so it cannot be rebuilt on load")
            cls = type(x)
            return {"t": "dataclass", "cls": f"{cls.__module__}:{cls.__qualname__}",
                    "fields": {f.name: self.node(getattr(x, f.name), f"{path}.{f.name}") for f in fields}}
        raise ValueError(f"{path or 'the tree'}: cannot save a {type(x).__module__}.{type(x).__qualname__} "
                         "(saved are dicts, lists, tuples, None, arrays, scalars, dtypes and dataclasses such as "
                         "QuantizedArray; convert other containers, e.g. Flax state with nnx.to_pure_dict)")

    def array(self, x: Any, path: str) -> dict[str, Any]:
        arr = np.asarray(x)
        if arr.dtype not in _NAMES:
            raise ValueError(f"{path or 'the tree'}: safetensors has no dtype for {arr.dtype}")
        name = path or "<root>"
        while name in self.tensors:  # paths are unique; this only guards odd keys like "a]['b"
            name += "'"
        self.tensors[name] = arr
        return {"t": "array", "name": name, "jax": isinstance(x, jax.Array), "scalar": isinstance(x, np.generic)}


def save(path: str | os.PathLike[str], tree: Any) -> None:
    """Writes ``tree`` to ``path`` as a safetensors file (replacing it only once fully written)."""
    writer = _Writer()
    description = writer.node(tree, "")
    header: dict[str, Any] = {"__metadata__": {TREE_KEY: json.dumps({"version": VERSION, "tree": description})}}
    offset = 0
    blobs = []
    for name, arr in writer.tensors.items():
        data = (arr.byteswap() if _BIG_ENDIAN else arr).tobytes()  # safetensors is little-endian, C order
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fusec-save-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for data in blobs:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _header(path: str, blob: bytes) -> tuple[dict[str, Any], int]:
    if len(blob) < 8:
        raise ValueError(f"{path}: not a safetensors file ({len(blob)} bytes, shorter than its 8-byte header size)")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > min(_MAX_HEADER, len(blob) - 8):
        raise ValueError(f"{path}: truncated or not a safetensors file (header of {size} bytes, file of {len(blob)})")
    try:
        header = json.loads(blob[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + size


def _tensors(path: str, blob: bytes, header: dict[str, Any], start: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            begin, stop = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt entry for tensor {name!r}: {info!r}") from None
        if min(shape, default=0) < 0 or stop - begin != int(np.prod(shape)) * dtype.itemsize or begin < 0:
            raise ValueError(f"{path}: tensor {name!r} has {stop - begin} bytes for shape {list(shape)} {dtype}")
        if start + stop > len(blob):
            raise ValueError(f"{path}: truncated: tensor {name!r} ends at byte {start + stop}, the file at {len(blob)}")
        arr = np.frombuffer(blob, dtype, int(np.prod(shape)), start + begin).reshape(shape)
        out[name] = arr.byteswap() if _BIG_ENDIAN else arr.copy()  # a copy: free of the file's buffer
        spans.append((begin, stop, name))
    end = 0
    for begin, stop, name in sorted(spans):  # safetensors' tensors tile the data with no gap or overlap
        if begin != end:
            raise ValueError(f"{path}: corrupt: tensor {name!r} starts at data byte {begin}, not {end}")
        end = stop
    if start + end != len(blob):
        raise ValueError(f"{path}: {len(blob) - start - end} bytes after the last tensor: corrupt or not one file")
    return out


class _Reader:
    def __init__(self, path: str, tensors: dict[str, np.ndarray], classes: dict[str, type]) -> None:
        self.path, self.tensors, self.classes = path, tensors, classes

    def node(self, d: Any) -> Any:
        try:
            kind = d["t"]
        except (TypeError, KeyError):
            raise ValueError(f"{self.path}: corrupt tree description near {str(d)[:80]!r}") from None
        if kind == "none":
            return None
        if kind in ("scalar", "dtype"):
            return d["v"] if kind == "scalar" else np.dtype(d["v"])
        if kind == "array":
            arr = self.tensors.get(d["name"])
            if arr is None:
                raise ValueError(f"{self.path}: the tree names tensor {d['name']!r}, which the file lacks")
            return jax.numpy.asarray(arr) if d["jax"] else arr[()] if d.get("scalar") else arr
        if kind == "dict":
            return {k: self.node(v) for k, v in d["items"]}
        if kind in ("list", "tuple"):
            items = [self.node(v) for v in d["items"]]
            return items if kind == "list" else tuple(items)
        if kind == "dataclass":
            return self.cls(d["cls"])(**{k: self.node(v) for k, v in d["fields"].items()})
        raise ValueError(f"{self.path}: unknown node kind {kind!r} in the tree description")

    def cls(self, name: str) -> type:
        if name in self.classes:
            return self.classes[name]
        module, _, qualname = name.partition(":")
        if module.split(".")[0] == "fusec":  # only fusec's own classes are looked up by name
            obj: Any = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, type) and dataclasses.is_dataclass(obj):
                return obj
        raise ValueError(f"{self.path}: holds a {name}, which load only builds when given it: "
                         f"load(path, classes=[{qualname or name}])")


def load(path: str | os.PathLike[str], classes: Iterable[type] = ()) -> Any:
    """The tree :func:`save` wrote to ``path`` (or a plain safetensors file's ``{name: array}``).
    ``classes``: dataclasses of your own that the tree holds."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        blob = f.read()
    header, start = _header(path, blob)
    tensors = _tensors(path, blob, header, start)
    meta = header.get("__metadata__") or {}
    if TREE_KEY not in meta:
        return {name: jax.numpy.asarray(arr) for name, arr in tensors.items()}
    try:
        description = json.loads(meta[TREE_KEY])
        version, tree = description["version"], description["tree"]
    except (TypeError, KeyError, json.JSONDecodeError):
        raise ValueError(f"{path}: corrupt fusec tree description in the header") from None
    if version != VERSION:
        raise ValueError(f"{path}: written by a fusec with tree format {version}; this one reads {VERSION}")
    reader = _Reader(path, tensors, {f"{c.__module__}:{c.__qualname__}": c for c in classes})
    try:
        out = reader.node(tree)
    except (TypeError, KeyError) as e:
        raise ValueError(f"{path}: corrupt tree description ({type(e).__name__}: {e})") from None
    return out
