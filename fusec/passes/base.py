"""Pass infrastructure: passes are frozen dataclasses with a kebab-case ``name``; a pipeline is an
ordered list of them, written as text like ``"inline,fold-constants,cse,dce"`` or
``"fuse{max-ops=32}"``. The manager can verify and record the module after every pass."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fusec.ir import Module, verify_module


class Pass:
    """Base of all passes: subclasses are frozen dataclasses whose fields are the options."""

    name: ClassVar[str] = ""

    def run(self, module: Module) -> Module:
        raise NotImplementedError

    def __str__(self) -> str:
        opts = [f"{f.name.replace('_', '-')}={getattr(self, f.name)}" for f in dataclasses.fields(self)]  # type: ignore[arg-type]
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: makes the pass available by its ``name`` in pipeline strings."""
    if not cls.name or cls.name in PASSES:
        raise ValueError(f"pass name {cls.name!r} is empty or taken")
    PASSES[cls.name] = cls
    return cls


_ITEM = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(?:\{([^}]*)\})?\s*(?:,|$)")


def _coerce(text: str, kind: Any) -> Any:
    if kind in (bool, "bool"):
        text = text.lower()  # str(pass) prints Python's True/False
        if text not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {text!r}")
        return text in ("true", "1")
    if kind in (int, "int"):
        return int(text)
    if kind in (float, "float"):
        return float(text)
    return text


def parse_pipeline(spec: str | Sequence[str | Pass]) -> list[Pass]:
    """Parses ``"a,b{opt=1}"`` or a list of names/Pass objects into pass instances."""
    if not isinstance(spec, str):
        out: list[Pass] = []
        for item in spec:
            out.extend([item] if isinstance(item, Pass) else parse_pipeline(item))
        return out
    passes: list[Pass] = []
    pos = 0
    spec = spec.strip()
    while pos < len(spec):
        m = _ITEM.match(spec, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"bad pass pipeline {spec!r} at character {pos}")
        name, opts = m.group(1), m.group(2)
        if name not in PASSES:
            raise ValueError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
        cls = PASSES[name]
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {}
        for item in filter(None, (o.strip() for o in (opts or "").split(","))):
            key, _, value = item.partition("=")
            attr = key.strip().replace("-", "_")
            if attr not in fields:
                raise ValueError(f"pass {name!r} has no option {key.strip()!r}")
            try:
                kwargs[attr] = _coerce(value.strip(), fields[attr].type)
            except ValueError as e:
                raise ValueError(f"pass {name!r} option {key.strip()!r}: {e}") from None
        passes.append(cls(**kwargs))
        pos = m.end()
    return passes


@dataclass
class PassManager:
    """Runs passes in order. ``verify`` checks the IR after each; ``on_stage(name, module)`` sees
    the input (stage ``"input"``) and the module after every pass."""

    passes: list[Pass]
    verify: bool = True
    on_stage: Callable[[str, Module], None] | None = None
    stages: list[tuple[str, Module]] = field(default_factory=list)

    def run(self, module: Module) -> Module:
        if self.verify:
            verify_module(module)
        self._record("input", module)
        for p in self.passes:
            module = p.run(module)
            if self.verify:
                verify_module(module)
            self._record(p.name, module)
        return module

    def _record(self, name: str, module: Module) -> None:
        self.stages.append((name, module))
        if self.on_stage is not None:
            self.on_stage(name, module)
