"""Errors fusec raises. Every fusec-specific error derives from :class:`FusecError`."""

from __future__ import annotations


class FusecError(Exception):
    """Base class of fusec's own errors."""


class VerifyError(FusecError):
    """Malformed IR: the message names the op and the operand at fault."""


class FusecSyntaxError(FusecError):
    """IR text that does not parse; carries the 1-based line and column."""

    def __init__(self, message: str, line: int, column: int, source_name: str = "<ir>") -> None:
        super().__init__(f"{source_name}:{line}:{column}: {message}")
        self.line = line
        self.column = column
        self.source_name = source_name
        self.bare_message = message


class Unsupported(FusecError):
    """A feature fusec does not provide (yet), e.g. a backend that is not built."""
