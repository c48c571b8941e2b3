"""Pass-level logs through absl.logging (fusec/pipeline.py): one line per pass with its name, time
and op count, under FUSEC_VERBOSITY=1 or absl's verbosity 1; silent by default."""

from __future__ import annotations

import logging as std_logging
import re

import jax
import jax.numpy as jnp
import pytest
from absl import logging

import fusec
from fusec.pipeline import resolve_pipeline

LINE = re.compile(r"fusec (\S+): (\S+) +([\d.]+) ms +(\d+) ops +(\d+) kernels")


def _compile_and_read(caplog: pytest.LogCaptureFixture) -> list[tuple[str, ...]]:
    caplog.clear()
    fusec.jit(lambda x: jax.nn.softmax(x) * 2.0, backend="pallas")(jnp.ones((4, 8)))
    return [m.groups() for r in caplog.records if r.name == "absl" and (m := LINE.fullmatch(r.getMessage()))]


def test_each_pass_is_logged_with_time_and_op_count(monkeypatch, caplog) -> None:
    monkeypatch.setenv("FUSEC_VERBOSITY", "1")
    caplog.set_level(std_logging.WARNING, logger="absl")
    lines = _compile_and_read(caplog)
    passes = [p.name for p in resolve_pipeline(None, "pallas")]
    assert [stage for _, stage, *_ in lines] == ["frontend", *passes, "codegen"]
    assert all(program == "<lambda>" and float(ms) >= 0 and int(ops) > 0 for program, _, ms, ops, _ in lines)
    kernels = {stage: int(k) for _, stage, _, _, k in lines}
    assert kernels["fuse"] == 1 and kernels["frontend"] == 0


def test_absl_verbosity_turns_them_on_at_vlog_1(monkeypatch, caplog) -> None:
    monkeypatch.delenv("FUSEC_VERBOSITY", raising=False)
    old = logging.get_verbosity()
    logging.set_verbosity(1)
    try:
        caplog.set_level(std_logging.DEBUG, logger="absl")
        lines = _compile_and_read(caplog)
    finally:
        logging.set_verbosity(old)
    assert lines and lines[0][1] == "frontend"


def test_silent_by_default(monkeypatch, caplog) -> None:
    monkeypatch.delenv("FUSEC_VERBOSITY", raising=False)
    assert logging.get_verbosity() < 1
    caplog.set_level(std_logging.WARNING, logger="absl")
    assert _compile_and_read(caplog) == []
