"""The fusec command: check and dump."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fusec.cli import main
from fusec.ir import parse_module, verify_module

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden"


def test_check_accepts_valid_ir(tmp_path: Path, capsys) -> None:
    text = (GOLDEN / "dce.fir").read_text().split("// EXPECT:")[1]
    path = tmp_path / "ok.fir"
    path.write_text(text)
    assert main(["check", str(path)]) == 0
    assert "ok (1 function(s), 3 op(s))" in capsys.readouterr().out


def test_check_reports_syntax_errors_with_position(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.fir"
    path.write_text("func @f(%a: f32[]) -> () {\n  %1 = add %a, %zz : f32[]\n  return\n}\n")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fusec: error: {path}:2:16: use of undefined value %zz"]


def test_check_reports_verifier_errors(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.fir"
    path.write_text("func @f(%a: f32[2]) -> () {\n  %1 = reshape %a {shape = [3]} : f32[3]\n  return\n}\n")
    assert main(["check", str(path)]) == 2
    assert "op 'reshape'" in capsys.readouterr().err


def test_dump_every_stage_of_the_quickstart(capsys) -> None:
    assert main(["dump", str(REPO / "examples" / "quickstart.py") + ":gpt2_block", "--stage", "all",
                 "--backend", "xla"]) == 0
    out = capsys.readouterr().out
    chunks = out.split("// ----- after ")[1:]
    assert [c.split("\n", 1)[0] for c in chunks] == ["input", "inline", "fold-input-transforms",
                                                       "canonicalize", "fold-constants", "cse", "dce"]
    for chunk in chunks:
        verify_module(parse_module(chunk.split("\n", 1)[1]))
    assert " dot " in chunks[-1]


def test_dump_tile_programs(capsys) -> None:
    assert main(["dump", str(REPO / "examples" / "quickstart.py") + ":layer_norm", "--backend", "pallas",
                 "--args", "x=f32[6,768] scale=f32[768] bias=f32[768]", "--stage", "to-tile"]) == 0
    module = parse_module(capsys.readouterr().out)
    verify_module(module)
    program = module.function("layer_norm.k0.tile")
    opcodes = [op.opcode for op in program.ops]
    assert {"program_id", "load", "element_index", "reduce", "store"} <= set(opcodes)
    loads = [op for op in program.ops if op.opcode == "load"]
    assert all(op.attr("masked") for op in loads)  # 768 columns in a 1024 block


def test_dump_with_args_spec(tmp_path: Path, capsys) -> None:
    src = tmp_path / "model.py"
    src.write_text("import jax.numpy as jnp\n\ndef f(x, w):\n    return jnp.tanh(x @ w)\n")
    assert main(["dump", f"{src}:f", "--args", "x=f32[2,8] w=i3g128[8,4]"]) == 2
    assert "'i3g128[8,4]' is not a standard JAX dtype" in capsys.readouterr().err
    assert main(["dump", f"{src}:f", "--args", "x=f32[2,8] w=f32[8,4]"]) == 0
    assert "dot %arg0, %arg1" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["dump", "missing.py:f"], "no such file: missing.py"),
    (["dump", "examples/quickstart.py:nope"], "has no function 'nope'"),
    (["dump", "examples/quickstart.py"], "expected FILE.py:FUNCTION"),
    (["dump", "examples/quickstart.py:gpt2_block", "--args", "x=f32[2,"], "--args: bad type 'f32[2,'"),
    (["dump", "examples/quickstart.py:gpt2_block", "--args", "x=f32[2,4]"], "missing 1 required positional"),
    (["dump", "examples/quickstart.py:gpt2_block", "--stage", "nope"], "no stage 'nope'"),
    (["check", "missing.fir"], "no such file: missing.fir"),
    (["graph", "examples/quickstart.py:gpt2_block", "-o", "out.png"], "must end in .html, .svg or .dot"),
    (["graph", "examples/quickstart.py:gpt2_block", "-o", "no/such/dir/g.svg"], "no such directory: no/such/dir"),
])
def test_user_errors_are_one_line_with_status_2(argv, message, capsys, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["check", "dump", "inspect", "source", "graph"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    out = subprocess.run([sys.executable, "-m", "fusec.cli", command, "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert f"example: fusec {command} " in out
