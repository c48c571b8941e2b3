"""Every CLI command on every example, checking what it prints or writes, not only its exit status."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

import fusec
from fusec.cli import main
from fusec.ir import parse_module, verify_module
from tests.test_examples import EXAMPLES, example_args, load_example


@pytest.fixture(params=EXAMPLES, ids=lambda p: p.stem)
def example(request):
    """(``FILE.py:FUNCTION``, the module, the Lowered program the CLI shows)."""
    module = load_example(request.param)
    name = module.EXAMPLE_FUNCTION
    args = example_args(module)
    lowered = fusec.jit(getattr(module, name), backend="pallas", interpret=True).lower(*args)
    return f"{request.param}:{name}", module, lowered


def test_dump_shows_kernel_ops_after_fusion(example, capsys) -> None:
    target, _, lowered = example
    assert main(["dump", target, "--stage", "all"]) == 0
    chunks = {c.split("\n", 1)[0]: c.split("\n", 1)[1] for c in capsys.readouterr().out.split("// ----- after ")[1:]}
    assert list(chunks) == list(dict.fromkeys(lowered.stages))
    assert " = kernel " not in chunks["cse"] and " = kernel " in chunks["fuse"]
    fused = parse_module(chunks["fuse"])
    verify_module(fused)
    assert sum(op.opcode == "kernel" for op in fused.entry.ops) == len(lowered.program.kernels) > 0


def test_inspect_json_matches_the_kernels(example, capsys) -> None:
    target, _, lowered = example
    assert main(["inspect", target, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    ops = [op for op in lowered.program.module.entry.ops if op.opcode == "kernel"]
    assert [k["name"] for k in data["kernels"]] == [str(op.attr("callee")) for op in ops]
    for k, op in zip(data["kernels"], ops):
        assert [k["bytes_read"], k["bytes_written"], k["flops"], k["grid"]] == [
            op.attr("bytes_read"), op.attr("bytes_written"), op.attr("flops"), list(op.attr("grid"))]
        assert k["primitives"] and k["modeled_time_s"] > 0
    assert data["bytes_fused"] < data["bytes_op_by_op"]
    assert 0 < data["num_fused_eqns"] <= data["num_eqns"]


def test_source_prints_every_kernel(example, capsys) -> None:
    target, _, lowered = example
    assert main(["source", target]) == 0
    out = capsys.readouterr().out
    for name in lowered.program.kernels:
        assert f"# ----- kernel {name}\n" in out
    assert out.count("pl.pallas_call(") == len(lowered.program.kernels)


@pytest.mark.parametrize("suffix", [".svg", ".html", ".dot"])
def test_graph_names_every_kernel(example, suffix, tmp_path, capsys) -> None:
    target, _, lowered = example
    out = tmp_path / f"graph{suffix}"
    assert main(["graph", target, "-o", str(out)]) == 0
    assert f"wrote {out}: {len(lowered.program.kernels)} kernel(s)" in capsys.readouterr().out
    text = out.read_text()
    if suffix == ".svg":
        root = ET.fromstring(text)  # well-formed XML
        ids = {g.get("id") for g in root.iter("{http://www.w3.org/2000/svg}g")}
        assert set(lowered.program.kernels) <= ids
    elif suffix == ".html":
        assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
        svg = text[text.index("<svg"):text.index("</svg>") + len("</svg>")]
        ET.fromstring(svg)
        assert "jaxpr equations:" in text  # the report under the picture
    else:
        assert text.startswith("digraph ") and text.rstrip().endswith("}")
        assert text.count("subgraph ") == len(lowered.program.kernels)
    for name in lowered.program.kernels:
        assert name in text
