"""Parses the textual IR (see printer.py) back into a :class:`Module`."""

from __future__ import annotations

import functools
import json
import math
import re
from importlib import resources
from typing import Any

import lark

from fusec.errors import FusecSyntaxError
from fusec.ir.function import NAN, NEG_NAN, Function, Module, Op, Value
from fusec.ir.types import TensorType, parse_elem_type


@functools.cache
def _parser() -> lark.Lark:
    grammar = resources.files("fusec.ir").joinpath("grammar.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _error(message: str, where: Any, source_name: str) -> FusecSyntaxError:
    where = getattr(where, "meta", where)
    return FusecSyntaxError(message, getattr(where, "line", 1) or 1, getattr(where, "column", 1) or 1, source_name)


def parse_type(token: lark.Token | str, source_name: str = "<ir>") -> TensorType:
    """Parses a tensor type such as ``f32[8,16]``."""
    text = str(token)
    elem_text, _, dims = text[:-1].rpartition("[")
    try:
        if not text.endswith("]") or not elem_text or not re.fullmatch(r"\s*(\d+\s*(,\s*\d+\s*)*)?", dims):
            raise ValueError("expected ELEMENT[DIM,...], e.g. f32[8,16]")
        shape = tuple(int(d) for d in dims.replace(" ", "").split(",") if d)
        return TensorType(parse_elem_type(elem_text), shape)
    except ValueError as e:
        raise _error(f"bad type {text!r}: {e}", token, source_name) from None


def _attr_value(tree: Any) -> Any:
    kind = tree.data
    if kind == "int":
        return int(tree.children[0])
    if kind == "float":
        return float(tree.children[0])
    if kind == "string":
        return json.loads(str(tree.children[0]))
    if kind == "list":
        return tuple(_attr_value(c) for c in tree.children if c is not None)
    return {"inf": math.inf, "neg_inf": -math.inf, "nan": NAN, "neg_nan": NEG_NAN, "true": True, "false": False}[kind]


class _FunctionReader:
    def __init__(self, source_name: str) -> None:
        self.source_name = source_name
        self.values: dict[str, Value] = {}

    def define(self, token: lark.Token, type_: TensorType) -> Value:
        name = str(token)[1:]
        if name in self.values:
            raise _error(f"value %{name} is defined twice", token, self.source_name)
        value = Value(name, type_)
        self.values[name] = value
        return value

    def use(self, token: lark.Token) -> Value:
        name = str(token)[1:]
        if name not in self.values:
            raise _error(f"use of undefined value %{name}", token, self.source_name)
        return self.values[name]

    def op(self, tree: lark.Tree) -> Op:
        children = tree.children
        i = children.index(next(c for c in children if isinstance(c, lark.Token) and c.type == "OPCODE"))
        result_tokens = [c for c in children[:i] if c is not None]
        rest = children[i + 1:]
        operand_tokens = [c for c in rest if isinstance(c, lark.Token) and c.type == "VALUE"]
        type_tokens = [c for c in rest if isinstance(c, lark.Token) and c.type == "TYPE"]
        attr_trees = [c for c in rest if isinstance(c, lark.Tree) and c.data == "attrs"]
        operands = [self.use(t) for t in operand_tokens]
        if len(type_tokens) != len(result_tokens):
            raise _error(f"op {children[i]} declares {len(result_tokens)} result(s) but {len(type_tokens)} type(s)",
                         children[i], self.source_name)
        attrs: dict[str, Any] = {}
        for attr in (a for t in attr_trees for a in t.children if a is not None):
            key = str(attr.children[0])
            if key in attrs:
                raise _error(f"attribute {key} is given twice", attr.children[0], self.source_name)
            attrs[key] = _attr_value(attr.children[1])
        results = [self.define(tok, parse_type(ty, self.source_name)) for tok, ty in zip(result_tokens, type_tokens)]
        return Op.make(str(children[i]), operands, results, **attrs)

    def function(self, tree: lark.Tree) -> Function:
        name_token, *children = tree.children
        params = [self.define(p.children[0], parse_type(p.children[1], self.source_name))
                  for p in children if isinstance(p, lark.Tree) and p.data == "param"]
        result_types = [parse_type(t, self.source_name) for t in children
                        if isinstance(t, lark.Token) and t.type == "TYPE"]
        ops = [self.op(c) for c in children if isinstance(c, lark.Tree) and c.data == "op"]
        ret = next(c for c in children if isinstance(c, lark.Tree) and c.data == "ret")
        returns = [self.use(t) for t in ret.children if t is not None]
        declared = [v.type for v in returns]
        if declared != result_types:
            raise _error(f"@{str(name_token)[1:]} returns ({', '.join(map(str, declared))}) but declares "
                         f"({', '.join(map(str, result_types))})", ret, self.source_name)
        return Function(str(name_token)[1:], tuple(params), tuple(ops), tuple(returns))


def parse_module(text: str, source_name: str = "<ir>") -> Module:
    """Parses IR text; errors are :class:`FusecSyntaxError` with line and column."""
    try:
        tree = _parser().parse(text)
    except lark.exceptions.UnexpectedInput as e:
        found = ""
        if isinstance(e, lark.exceptions.UnexpectedToken):
            found = f"unexpected {e.token!r}" if e.token.type != "$END" else "unexpected end of input"
        elif isinstance(e, lark.exceptions.UnexpectedCharacters):
            found = f"unexpected character {text[e.pos_in_stream]!r}" if e.pos_in_stream < len(text) else ""
        raise FusecSyntaxError(found or "syntax error", e.line if e.line > 0 else 1,
                               e.column if e.column > 0 else 1, source_name) from None
    functions = [_FunctionReader(source_name).function(f) for f in tree.children]
    if not functions:
        raise FusecSyntaxError("no function in module", 1, 1, source_name)
    seen: set[str] = set()
    for f, tree_f in zip(functions, tree.children):
        if f.name in seen:
            raise _error(f"function @{f.name} is defined twice", tree_f.children[0], source_name)
        seen.add(f.name)
    return Module(tuple(functions))
