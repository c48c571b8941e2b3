"""What both kernel writers (Pallas and Triton source) keep while writing a tile program: an
identifier per IR value, unique across the kernel's scopes, and the lines written so far."""

from __future__ import annotations

from dataclasses import dataclass, field

from fusec.ir import Value


@dataclass
class SourceWriter:
    """Identifiers of a tile program's values, and the lines written so far."""

    lines: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # the current function's values
    used: set[str] = field(default_factory=set)  # every identifier written, in any scope
    consts: dict[str, int] = field(default_factory=dict)  # scalar integer constants, by value name
    indent: str = ""

    def name(self, v: Value) -> str:
        if v.name not in self.names:
            self.names[v.name] = self.fresh("v_" + "".join(ch if ch.isalnum() else "_" for ch in v.name))
        return self.names[v.name]

    def fresh(self, base: str) -> str:
        """An identifier not used yet in the kernel: ``base``, or ``base_1``, ``base_2``, ..."""
        ident, n = base, 0
        while ident in self.used:
            n += 1
            ident = f"{base}_{n}"
        self.used.add(ident)
        return ident

    def index_name(self, v: Value) -> str:
        """A scalar block index in source: its literal when it is a constant."""
        return str(self.consts[v.name]) if v.name in self.consts else self.name(v)

    def line(self, text: str) -> None:
        self.lines.append(self.indent + text)
