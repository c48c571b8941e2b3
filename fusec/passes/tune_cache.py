"""The persistent autotuning cache: tuned tile configs in a JSON file, and the shipped ones.

Keys are a kernel's tuning fingerprint (:func:`fusec.passes.tune_space.tuning_fingerprint`), its
operand and result shapes and dtypes, the device it was tuned for and the versions of fusec, jax,
jaxlib and triton. The user's file is ``$FUSEC_AUTOTUNE_CACHE`` (default
``$XDG_CACHE_HOME/fusec/autotune.json``, ``~/.cache/fusec/autotune.json``). Writers take an
``fcntl`` lock on a side file, merge their entries into what is on disk and replace the file
atomically (a temporary file and ``os.replace``), so concurrent processes lose no entries and
readers never see half a file. A file that is not valid JSON of this schema is ignored with a
warning and rewritten by the next store; an entry that does not parse is skipped with a warning.

The package ships ``fusec/data/autotune_shipped.json``, consulted after the user's file and matched
on kernel, shapes and dtypes only (it cannot name every version), its configs checked against the
kernel like any other. Pure Python: tiling reads it without importing JAX.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.metadata
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusec.ir import Function
from fusec.passes.tune_space import TileConfig

SCHEMA = "fusec-autotune/1"
ENV = "FUSEC_AUTOTUNE_CACHE"
MODEL_DEVICE = "sm_90 (static model)"  # the device of entries picked by the static model
SHIPPED = Path(__file__).resolve().parent.parent / "data" / "autotune_shipped.json"
VERSIONED = ("fusec", "jax", "jaxlib", "triton")


def cache_path() -> Path:
    """The user's cache file: ``$FUSEC_AUTOTUNE_CACHE``, else under the user cache directory."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fusec" / "autotune.json"


@functools.lru_cache(maxsize=1)
def versions() -> tuple[tuple[str, str], ...]:
    """(package, version) of the packages whose code a tuned config was measured with."""
    out = []
    for name in VERSIONED:
        try:
            out.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            out.append((name, "none"))
    return tuple(out)


@dataclass(frozen=True)
class TuneKey:
    """What a tuned config is valid for."""

    fingerprint: str
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    device: str = MODEL_DEVICE
    versions: tuple[tuple[str, str], ...] = ()

    def text(self, exact: bool = True) -> str:
        """The key as stable JSON text; without ``exact``, only kernel, shapes and dtypes (the
        shipped file's key)."""
        data: dict[str, Any] = {"fingerprint": self.fingerprint, "shapes": [list(s) for s in self.shapes],
                                "dtypes": list(self.dtypes)}
        if exact:
            data |= {"device": self.device, "versions": dict(self.versions)}
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


def kernel_key(callee: Function, fingerprint: str, device: str = "") -> TuneKey:
    """The key of a kernel (its callee's parameter and result shapes and dtypes) on ``device`` (""
    is the static model's sm_90), with this process's versions."""
    values = (*callee.params, *callee.returns)
    return TuneKey(fingerprint, tuple(tuple(v.type.shape) for v in values), tuple(str(v.type.elem) for v in values),
                   device or MODEL_DEVICE, versions())


@dataclass(frozen=True)
class Entry:
    """A tuned config: how it was chosen ("gpu-timed" or "model") and its time in seconds."""

    config: TileConfig
    method: str
    time_s: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"config": self.config.as_dict(), "method": self.method, "time_s": self.time_s}

    @staticmethod
    def from_json(data: Any) -> Entry:
        if not isinstance(data, dict) or not isinstance(data.get("method"), str):
            raise ValueError(f"an entry is an object with 'config' and 'method', got {data!r}")
        t = data.get("time_s")
        if t is not None and not isinstance(t, int | float):
            raise ValueError(f"an entry's time_s is a number or null, got {t!r}")
        return Entry(TileConfig.from_dict(data.get("config")), data["method"], t)


def _parse(text: str, path: Path) -> dict[str, Any]:
    """The raw entries of a cache file's text (ValueError if it is not this schema)."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("entries"), dict):
        raise ValueError(f"not a {SCHEMA} file (an object with 'schema' and 'entries')")
    return data["entries"]


_warned: set[tuple[str, int, int]] = set()


def read_raw(path: Path) -> dict[str, Any]:
    """The raw entries of the file at ``path``: {} if it is missing, or (with a warning, once per
    version of the file) if it is corrupt."""
    try:
        text = path.read_text()
        stat = path.stat()
    except FileNotFoundError:
        return {}
    except OSError as e:
        warnings.warn(f"fusec autotune cache {path} is unreadable ({e}); ignoring it", stacklevel=2)
        return {}
    try:
        return _parse(text, path)
    except (ValueError, UnicodeDecodeError) as e:
        stamp = (str(path), stat.st_mtime_ns, stat.st_size)
        if stamp not in _warned:
            _warned.add(stamp)
            warnings.warn(f"fusec autotune cache {path} is corrupt ({e}); ignoring it (the next store rewrites it)",
                          stacklevel=2)
        return {}


@functools.lru_cache(maxsize=64)
def _entries(path: str, mtime_ns: int, size: int, inode: int) -> dict[str, Entry]:
    """Parsed entries of one version of a file (re-read when it changes)."""
    out = {}
    for key, raw in read_raw(Path(path)).items():
        try:
            out[key] = Entry.from_json(raw)
        except (ValueError, TypeError) as e:
            warnings.warn(f"fusec autotune cache {path}: skipping a bad entry ({e})", stacklevel=2)
    return out


def entries(path: Path) -> dict[str, Entry]:
    try:
        stat = path.stat()
    except OSError:
        return {}
    return _entries(str(path), stat.st_mtime_ns, stat.st_size, stat.st_ino)


def _parses(raw: Any) -> bool:
    try:
        Entry.from_json(raw)
        return True
    except (ValueError, TypeError):
        return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_entries(path: Path, new: dict[str, dict[str, Any]], note: str | None = None) -> None:
    """Merges raw ``new`` entries into the file under its lock (dropping entries that do not
    parse), then replaces it atomically."""
    with _locked(path):
        merged = {k: v for k, v in (read_raw(path) | new).items() if _parses(v)}
        data: dict[str, Any] = {"schema": SCHEMA}
        if note:
            data["note"] = note
        data["entries"] = dict(sorted(merged.items()))
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def store(key: TuneKey, entry: Entry, path: Path | None = None) -> None:
    """Records ``entry`` for ``key`` in the user's cache (or ``path``)."""
    write_entries(path or cache_path(), {key.text(): entry.as_json()})


def lookup(key: TuneKey, path: Path | None = None, shipped: Path | None = SHIPPED) -> tuple[Entry, str] | None:
    """The entry for ``key`` and where it came from: the user's cache ("cache"; the static model's
    entry there when none was timed on ``key.device``), else the shipped file ("shipped"), else None."""
    cache = entries(path or cache_path())
    for k in (key, TuneKey(key.fingerprint, key.shapes, key.dtypes, MODEL_DEVICE, key.versions)):
        if k.text() in cache:
            return cache[k.text()], "cache"
    if shipped is not None and key.text(exact=False) in (ship := entries(shipped)):
        return ship[key.text(exact=False)], "shipped"
    return None
