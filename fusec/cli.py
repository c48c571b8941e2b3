"""The ``fusec`` command.

    fusec check FILE.fir                      parse and verify a textual IR file
    fusec dump FILE.py:FUNCTION [--stage S]   print the IR of a Python function after a pass
    fusec inspect FILE.py:FUNCTION [--gpu G]  kernels, bytes, FLOPs, roofline estimate (--json);
                                 [--sass]   with --sass: each kernel's sm_90 SASS profile and modeled time
    fusec source FILE.py:FUNCTION [--kernel]  the generated Pallas source
    fusec graph FILE.py:FUNCTION -o OUT       a picture of the fused graph (.html, .svg or .dot)

Inputs for FUNCTION come from ``--args "x=f32[8,1024] w=bf16[1024,4096]"`` or, failing that, from an
``example_inputs()`` function in the same file returning the positional arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fusec.errors import FusecError, FusecSyntaxError


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def parse_args_spec(text: str) -> list[Any]:
    """``"x=f32[8,16] w=bf16[16]"`` -> ShapeDtypeStructs, in order (names are for the reader)."""
    import jax

    from fusec.ir import DType, parse_type

    out = []
    for item in text.split():
        _, _, type_text = item.rpartition("=")
        try:
            t = parse_type(type_text, "--args")
        except FusecSyntaxError as e:
            raise CliError(f"--args: {e.bare_message}") from None
        if not isinstance(t.elem, DType):
            raise CliError(f"--args: {type_text!r} is not a standard JAX dtype")
        out.append(jax.ShapeDtypeStruct(t.shape, t.elem.numpy_name))
    return out


def load_function(target: str) -> tuple[Any, Any]:
    """``FILE.py:FUNCTION`` -> (function, module)."""
    file_name, sep, func_name = target.rpartition(":")
    if not sep or not file_name or not func_name:
        raise CliError(f"expected FILE.py:FUNCTION, got {target!r}")
    path = Path(file_name)
    if not path.is_file():
        raise CliError(f"no such file: {file_name}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    fn = getattr(module, func_name, None)
    if fn is None:
        raise CliError(f"{file_name} has no function {func_name!r}")
    return fn, module


def _cmd_check(ns: argparse.Namespace) -> int:
    from fusec.ir import parse_module, verify_module

    path = Path(ns.file)
    if not path.is_file():
        raise CliError(f"no such file: {ns.file}")
    module = parse_module(path.read_text(), str(path))
    verify_module(module)
    n_ops = sum(len(f.ops) for f in module.functions)
    print(f"{path}: ok ({len(module.functions)} function(s), {n_ops} op(s))")
    return 0


def _cmd_dump(ns: argparse.Namespace) -> int:
    lowered = _lowered(ns)
    stages = lowered.stages if ns.stage == "all" else (ns.stage,)
    for stage in stages:
        try:
            text = lowered.as_text(stage)
        except ValueError as e:
            raise CliError(str(e)) from None
        if ns.stage == "all":
            print(f"// ----- after {stage}")
        print(text, end="")
    return 0


def _lowered(ns: argparse.Namespace) -> Any:
    import fusec

    fn, module = load_function(ns.target)
    if ns.args is not None:
        args = parse_args_spec(ns.args)
    elif hasattr(module, "example_inputs"):
        args = list(module.example_inputs())
    else:
        raise CliError(f"give --args, or define example_inputs() in {ns.target.rpartition(':')[0]}")
    options = {"backend": ns.backend}
    if ns.interpret:
        options["interpret"] = True
    try:
        return fusec.jit(getattr(fn, "__wrapped__", fn), **options).lower(*args)
    except (TypeError, ValueError) as e:  # the user's function rejected these inputs
        raise CliError(f"tracing {ns.target} failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _cmd_inspect(ns: argparse.Namespace) -> int:
    from fusec.report import build_report

    lowered = _lowered(ns)
    try:
        if ns.sass:
            profile = lowered.gpu_profile(90, ns.gpu)
            print(json.dumps(asdict(profile), indent=1, sort_keys=True) if ns.json else profile)
            return 0
        report = build_report(lowered, ns.gpu)
    except ValueError as e:
        raise CliError(str(e)) from None
    print(report.to_json() if ns.json else report)
    return 0


def _cmd_source(ns: argparse.Namespace) -> int:
    sources = _lowered(ns).kernel_sources
    if ns.kernel is not None:
        if ns.kernel not in sources:
            raise CliError(f"no kernel {ns.kernel!r}; kernels: {', '.join(sources) or 'none'}")
        sources = {ns.kernel: sources[ns.kernel]}
    for name, source in sources.items():
        print(f"# ----- kernel {name}\n{source}")
    return 0


def _cmd_graph(ns: argparse.Namespace) -> int:
    from fusec.picture import fused_graph, to_dot
    from fusec.picture_svg import to_html, to_svg
    from fusec.report import build_report

    out = Path(ns.output)
    if out.suffix not in (".html", ".svg", ".dot"):
        raise CliError(f"-o {ns.output}: the file name must end in .html, .svg or .dot")
    if not out.parent.is_dir():
        raise CliError(f"-o {ns.output}: no such directory: {out.parent}")
    lowered = _lowered(ns)
    graph = fused_graph(lowered.program.module)
    if out.suffix == ".dot":
        text = to_dot(graph)
    elif out.suffix == ".svg":
        text = to_svg(graph)
    else:
        text = to_html(graph, str(build_report(lowered, ns.gpu)))
    out.write_text(text)
    kernels = sum(n.kind == "kernel" for n in graph.nodes)
    print(f"wrote {out}: {kernels} kernel(s), {sum(n.kind == 'xla' for n in graph.nodes)} XLA op(s), "
          f"{len(graph.edges)} edge(s)")
    return 0


def _program_options(p: argparse.ArgumentParser, backend: str) -> None:
    p.add_argument("target", help="FILE.py:FUNCTION")
    p.add_argument("--args", default=None, help='argument types, e.g. "x=f32[8,1024] w=bf16[1024,4096]"')
    from fusec.codegen.backend import backend_names

    p.add_argument("--backend", default=backend, choices=list(backend_names()),
                   help="auto (Pallas kernels with a GPU, else the reference), xla, pallas or triton")
    p.add_argument("--interpret", action="store_true",
                   help="build kernels for an interpreter (Pallas interpret mode, the Triton interpreter)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusec", description="fusec: a kernel-fusion compiler for JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="parse and verify a textual IR file",
                           epilog="example: fusec check tests/golden/dce.fir")
    check.add_argument("file")
    check.set_defaults(run=_cmd_check)
    dump = sub.add_parser("dump", help="print a function's IR after a pass",
                          epilog='example: fusec dump examples/quickstart.py:mlp --stage all')
    _program_options(dump, "pallas")
    dump.add_argument("--stage", default="final", help="input, a pass name, final (default) or all")
    dump.set_defaults(run=_cmd_dump)
    inspect = sub.add_parser("inspect", help="kernels, bytes, FLOPs and a roofline estimate",
                             epilog="example: fusec inspect examples/quickstart.py:gpt2_block --gpu h100 --json")
    _program_options(inspect, "pallas")
    inspect.add_argument("--gpu", default="h100", help="a100, h100, h200, l4 or rtx4090")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--sass", action="store_true",
                         help="compile every kernel for sm_90, read its SASS and print the static profile "
                              "(occupancy, instruction mix, modeled time; --gpu h100 or h200)")
    inspect.set_defaults(run=_cmd_inspect)
    source = sub.add_parser("source", help="the generated kernel source",
                            epilog="example: fusec source examples/quickstart.py:gpt2_block --kernel gpt2_block.k0")
    _program_options(source, "pallas")
    source.add_argument("--kernel", default=None, help="one kernel's name (default: all)")
    source.set_defaults(run=_cmd_source)
    graph = sub.add_parser("graph", help="draw the fused graph: kernels as coloured boxes, edges labelled with bytes",
                           epilog="example: fusec graph examples/quickstart.py:gpt2_block -o gpt2.html")
    _program_options(graph, "pallas")
    graph.add_argument("-o", "--output", required=True, help="out.html (picture and report), out.svg or out.dot")
    graph.add_argument("--gpu", default="h100", help="GPU for the report under an HTML picture")
    graph.set_defaults(run=_cmd_graph)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return int(ns.run(ns))
    except (CliError, FusecError) as e:
        print(f"fusec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
