"""The default pass pipeline, as one explicit ordered list."""

from __future__ import annotations

from collections.abc import Sequence

from fusec.passes import Pass, parse_pipeline

DEFAULT_PIPELINE: tuple[str, ...] = ("inline", "canonicalize", "fold-constants", "cse", "dce")


def resolve_pipeline(passes: str | Sequence[str | Pass] | None) -> list[Pass]:
    """``None`` gives the default pipeline; otherwise a pipeline string or list (see parse_pipeline)."""
    return parse_pipeline(list(DEFAULT_PIPELINE) if passes is None else passes)
