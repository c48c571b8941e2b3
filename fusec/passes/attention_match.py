"""Finding softmax(f(Q K^T)) V in a graph-level function, where f is any chain of elementwise ops
(scales, masks, biases, soft-caps) and layout ops (reshapes, transposes) on the scores.

Every value of the pattern is described in the scores' canonical space by labels
(:mod:`fusec.passes.attention_labels`). The side operands of the chain (what the scores are
combined with) are splat constants, iotas along the query or key axis and elementwise ops of them
(a causal or sliding-window mask), or inputs read by their labels (a padding mask, a bias). Q, K
and V are followed back, and O forward, through layout ops, to the arrays the kernel reads and
writes. The same matcher runs on the function the ``recognize-attention`` pass builds, so
``to-tile`` sees exactly what was recognised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fusec.ir import DType, Function, Op, Value
from fusec.passes.attention_labels import (
    ONE,
    Label,
    Labels,
    Operand,
    batch_labels,
    broadcast_source_labels,
    lab,
    merge_split,
    relabel_reshape,
    seq_kinds,
)
from fusec.passes.fusion_rules import TARGET, types_ok

_LAYOUT = ("reshape", "transpose", "convert", "stop_gradient")


@dataclass
class AttentionMatch:
    """One recognised attention: its two dots, the score chain, the softmax input and the arrays
    the kernel reads (``q``, ``k``, ``v``, then side ``inputs``) and writes (``out``)."""

    qk: Op
    pv: Op
    q: Operand
    k: Operand
    v: Operand
    out: Operand
    chain: list[Op]
    x: Value
    labels: dict[str, Labels]
    # (side value, its labels) -> "const" | "iota" | "op" | "input": one value may serve with two
    # labellings (an iota broadcast along the queries and along the keys).
    sides: dict[tuple[str, Labels], str]
    inputs: list[Operand]
    ops: list[Op]  # every op of the pattern, in function order
    batch: int
    tq: int
    tk: int
    head_dim: int
    value_dim: int
    tail: list[Op]  # transposes and reshapes of the PV dot's result that the kernel's store does
    attrs: dict[str, object] = field(default_factory=dict)


class _Matcher:
    def __init__(self, func: Function) -> None:
        self.func = func
        self.producer = {r.name: op for op in func.ops for r in op.results}
        self.users: dict[str, list[Op]] = {}
        for op in func.ops:
            for v in {v.name for v in op.operands}:
                self.users.setdefault(v, []).append(op)
        self.returned = {v.name for v in func.returns}
        self.params = {p.name for p in func.params}

    def only_user(self, v: Value) -> Op | None:
        users = self.users.get(v.name, [])
        if v.name in self.returned or len(users) != 1:
            return None
        return users[0]

    def match(self, qk: Op) -> AttentionMatch | None:
        lhs, rhs = qk.operands
        r = qk.result.type.rank
        if r < 2 or str(lhs.type.elem) not in TARGET.dot_dtypes:
            return None
        bshape = qk.result.type.shape[:-2]
        tq, tk = qk.result.type.shape[-2:]
        head_dim = lhs.type.shape[-2] if qk.attr("lhs_t") else lhs.type.shape[-1]
        blabels = batch_labels(bshape)
        q_roles = blabels + ((("d", 1, head_dim), ("q", 1, tq)) if qk.attr("lhs_t") else
                             (("q", 1, tq), ("d", 1, head_dim)))
        k_roles = blabels + ((("k", 1, tk), ("d", 1, head_dim)) if qk.attr("rhs_t") else
                             (("d", 1, head_dim), ("k", 1, tk)))
        self.labels: dict[str, Labels] = {qk.result.name: blabels + (lab("q", tq), lab("k", tk))}
        self.sides: dict[tuple[str, Labels], str] = {}
        self.inputs: list[Operand] = []
        self.pattern: set[int] = {id(qk)}
        self.tq, self.tk = tq, tk
        chain: list[Op] = []
        c = qk.result
        while True:  # the score chain, up to the softmax's max
            users = self.users.get(c.name, [])
            if c.name in self.returned or not users:
                return None
            if len(users) == 2:
                break
            op = users[0]
            if len(users) != 1 or not self.chain_op(op, c):
                return None
            chain.append(op)
            self.pattern.add(id(op))
            c = op.result
        x = c
        p = self.softmax(x)
        if p is None:
            return None
        while True:  # the probabilities' layout ops, up to the PV dot
            op = self.only_user(p)
            if op is None:
                return None
            if op.opcode == "dot":
                break
            if op.opcode not in _LAYOUT or not types_ok(op) or not self.relabel(op, p):
                return None
            self.pattern.add(id(op))
            p = op.result
        pv = op
        found = self.pv_roles(pv, p, blabels)
        if found is None:
            return None
        v_op, v_roles, out_roles = found
        if str(v_op.type.elem) not in TARGET.dot_dtypes or not types_ok(pv):
            return None
        self.pattern.add(id(pv))
        value_dim = next(rl[2] for rl in out_roles if rl[0] == "d")
        q_op, k_op, v_op = (self.walk_back(Operand(x, roles), hd) for x, roles, hd in
                            ((lhs, q_roles, head_dim), (rhs, k_roles, head_dim), (v_op, v_roles, value_dim)))
        out, tail = self.walk_forward(Operand(pv.result, out_roles))
        ops = [o for o in self.func.ops if id(o) in self.pattern]
        m = AttentionMatch(qk, pv, q_op, k_op, v_op,
                           out, chain, x, self.labels, self.sides, self.inputs, ops,
                           math.prod(bshape), tq, tk, head_dim, value_dim, tail)
        m.attrs = self.describe(m)
        return m

    def walk_back(self, operand: Operand, hd: int) -> Operand:
        """The array the kernel reads for a dot operand: through the transposes, reshapes,
        broadcasts and head slices that made it (a GQA repeat of key/value heads, a [B, T, H, D]
        layout, a fused QKV projection), as long as its query, key and head-dim axes stay whole."""
        while True:
            op = self.producer.get(operand.value.name)
            if op is None or op.opcode not in ("transpose", "reshape", "broadcast", "slice"):
                return operand
            roles, offset = operand.roles, operand.offset
            if any(r[2] == 1 and r != ONE for r in roles):
                return operand  # a size-1 sequence or head axis has no label to carry back
            src = op.operands[0]
            new: Labels | None = roles
            if op.opcode == "transpose":
                perm = op.attr("perm")
                new = tuple(roles[perm.index(d)] for d in range(len(perm)))
            elif op.opcode == "reshape":
                new = merge_split(roles, src.type.shape, operand.value.type.shape)
                if new is None and not any(r[0] == "m" for r in roles):
                    new = relabel_reshape(roles, src.type.shape)
            elif op.opcode == "broadcast":
                new = broadcast_source_labels(op, roles)
            else:  # a slice of whole heads along a merged heads axis
                for d, (lo, hi, step) in enumerate(zip(op.attr("start"), op.attr("limit"), op.attr("strides"))):
                    if (lo, hi, step) == (0, src.type.shape[d], 1):
                        continue
                    if roles[d][0] != "m" or step != 1 or lo % hd:
                        return operand
                    offset += lo // hd
            if new is None or seq_kinds(new) != seq_kinds(roles):
                return operand
            self.pattern.add(id(op))
            operand = Operand(src, new, offset)

    def walk_forward(self, operand: Operand) -> tuple[Operand, list[Op]]:
        """The array the kernel writes: through the transposes and reshapes that alone read the
        PV dot's result (heads merged back into the model width)."""
        tail: list[Op] = []
        while True:
            op = self.only_user(operand.value)
            roles = operand.roles
            if op is None or op.opcode not in ("transpose", "reshape") or \
                    any(r[2] == 1 and r != ONE for r in roles):
                return operand, tail
            new: Labels | None
            if op.opcode == "transpose":
                new = tuple(roles[p] for p in op.attr("perm"))
            else:
                new = merge_split(roles, op.result.type.shape, operand.value.type.shape)
                if new is None and not any(r[0] == "m" for r in roles):
                    new = relabel_reshape(roles, op.result.type.shape)
            if new is None or seq_kinds(new) != seq_kinds(roles):
                return operand, tail
            self.pattern.add(id(op))
            tail.append(op)
            operand = Operand(op.result, new)

    def relabel(self, op: Op, v: Value) -> bool:
        labels = self.labels[v.name]
        if op.opcode == "reshape":
            new = relabel_reshape(labels, op.result.type.shape)
        elif op.opcode == "transpose":
            new = tuple(labels[p] for p in op.attr("perm"))
        else:
            new = labels
        if new is None:
            return False
        self.labels[op.result.name] = new
        return True

    def chain_op(self, op: Op, c: Value) -> bool:
        """Whether ``op`` continues the score chain at ``c`` (recording its side operands)."""
        if op.opcode in _LAYOUT:
            return types_ok(op) and self.relabel(op, c)
        if op.opcode not in TARGET.elementwise or op.opcode == "stop_gradient" or not types_ok(op):
            return False  # what a kernel cannot compute stays outside, and the pattern with it
        if [v.name for v in op.operands].count(c.name) != 1 or op.result.type.shape != c.type.shape:
            return False
        labels = self.labels[c.name]
        if not all(self.side(v, labels if v.type.shape else ()) for v in op.operands if v.name != c.name):
            return False
        self.labels[op.result.name] = labels
        return True

    def side(self, v: Value, labels: Labels) -> bool:
        """Classifies a side operand of the chain (and what it is made of) with ``labels``."""
        if (v.name, labels) in self.sides:
            return True
        if v.name in self.labels:  # a score value itself
            return False
        op = self.producer.get(v.name)
        kind = "input"
        if op is not None and op.opcode == "constant" and not isinstance(op.attr("value"), tuple):
            kind = "const"
        elif op is not None and op.opcode == "iota":
            if labels[int(op.attr("dimension"))][0] not in ("q", "k", "1"):
                return False
            kind = "iota"
        elif op is not None and op.opcode == "broadcast":
            kind = "op"
            if not self.side(op.operands[0], broadcast_source_labels(op, labels)):
                return False
        elif op is not None and op.opcode in TARGET.elementwise and types_ok(op) and \
                all(u.type.shape in ((), v.type.shape) for u in op.operands):
            kind = "op"
            if not all(self.side(u, labels if u.type.shape else ()) for u in op.operands):
                return False
        if kind == "input":
            if not (isinstance(v.type.elem, DType) and v.type.elem.name in TARGET.dtypes):
                return False
            seq = [r[0] for r in labels if r[0] in ("q", "k")]
            if seq not in ([], ["q"], ["k"], ["q", "k"]):
                return False  # a tile with the key axis first would need a transpose
            if Operand(v, labels) not in self.inputs:
                self.inputs.append(Operand(v, labels))
        else:
            self.pattern.add(id(op))
        self.sides[(v.name, labels)] = kind
        return True

    def softmax(self, x: Value) -> Value | None:
        """The probabilities when ``x``'s two users start a softmax over its key axis."""
        labels = self.labels[x.name]
        users = self.users[x.name]
        red = next((u for u in users if u.opcode == "reduce" and u.attr("kind") == "max"), None)
        sub = next((u for u in users if u.opcode == "sub" and u.operands[0].name == x.name), None)
        if red is None or sub is None or len(set(id(u) for u in users)) != 2:
            return None
        axes = tuple(red.attr("axes"))
        if len(axes) != 1 or labels[axes[0]][0] not in (("k",) if self.tk > 1 else ("k", "1")):
            return None
        (ka,) = axes
        rest = tuple(d for d in range(x.type.rank) if d != ka)
        # max -> [max(-inf, .)] -> [stop_gradient] -> broadcast -> [stop_gradient] -> sub's rhs
        v, seen = red.result, [red]
        while True:
            op = self.only_user(v)
            if op is None:
                return None
            if op is sub:
                break
            if op.opcode == "stop_gradient" or (op.opcode == "broadcast" and op.attr("dims") == rest):
                pass
            elif op.opcode == "max" and self.neg_inf(next(u for u in op.operands if u.name != v.name)):
                pass
            else:
                return None
            seen.append(op)
            v = op.result
        if sub.operands[1].name != v.name or sub.operands[1].type != x.type:
            return None
        exp = self.only_user(sub.result)
        if exp is None or exp.opcode != "exp":
            return None
        e_users = self.users.get(exp.result.name, [])
        total = next((u for u in e_users if u.opcode == "reduce" and u.attr("kind") == "sum"
                      and tuple(u.attr("axes")) == axes), None)
        div = next((u for u in e_users if u.opcode == "div" and u.operands[0].name == exp.result.name), None)
        if total is None or div is None or len(e_users) != 2 or exp.result.name in self.returned:
            return None
        v, path = total.result, [total]
        while True:
            op = self.only_user(v)
            if op is None:
                return None
            if op is div:
                break
            if not (op.opcode == "stop_gradient" or (op.opcode == "broadcast" and op.attr("dims") == rest)):
                return None
            path.append(op)
            v = op.result
        if div.operands[1].name != v.name:
            return None
        self.pattern.update(id(o) for o in (*seen, sub, exp, *path, div))
        self.pattern.update(id(self.producer[u.name]) for o in seen for u in o.operands
                            if u.name in self.producer and self.producer[u.name].opcode == "constant")
        self.labels[div.result.name] = labels
        self.ka = ka
        return div.result

    def neg_inf(self, v: Value) -> bool:
        op = self.producer.get(v.name)
        return op is not None and op.opcode == "constant" and op.attr("value") == float("-inf")

    def pv_roles(self, pv: Op, p: Value, blabels: Labels) -> tuple[Value, Labels, Labels] | None:
        """V, V's roles and O's roles when ``pv`` contracts the probabilities over their key axis."""
        labels = self.labels[p.name]
        if [v.name for v in pv.operands].count(p.name) != 1 or p.type.rank != pv.result.type.rank:
            return None
        i = 0 if pv.operands[0].name == p.name else 1
        other = pv.operands[1 - i]
        r = p.type.rank
        batch = labels[:-2]
        if any(lb[0] not in ("b", "1") for lb in batch) or \
                sorted(lb for lb in batch if lb != ONE) != sorted(lb for lb in blabels if lb != ONE):
            return None
        transposed = bool(pv.attr("lhs_t" if i == 0 else "rhs_t"))
        # Positions (within the last two axes) of the probabilities' contracted and kept axes.
        k_pos = (0 if transposed else 1) if i == 0 else (1 if transposed else 0)
        kq, kk = labels[r - 2 + (1 - k_pos)], labels[r - 2 + k_pos]

        def fits(lb: Label, kind: str, n: int) -> bool:
            return lb[0] == kind or (lb == ONE and n == 1)

        if not (fits(kk, "k", self.tk) and fits(kq, "q", self.tq)):
            return None
        o_transposed = bool(pv.attr("rhs_t" if i == 0 else "lhs_t"))
        dv = other.type.shape[-2 if o_transposed == (i == 0) else -1]
        t_roles = (("k", 1, self.tk), ("d", 1, dv))
        v_roles = batch + (t_roles if (i == 0) != o_transposed else t_roles[::-1])
        out_roles = batch + ((("q", 1, self.tq), ("d", 1, dv)) if i == 0 else (("d", 1, dv), ("q", 1, self.tq)))
        return other, v_roles, out_roles

    def describe(self, m: AttentionMatch) -> dict[str, object]:
        """Attributes for reports: a causal (iota) mask, the splat scale, an input bias or mask."""
        scale = 1.0
        for op in m.chain:
            consts = [self.producer[v.name] for v in op.operands
                      if self.sides.get((v.name, self.labels[op.result.name] if v.type.shape else ())) == "const"]
            if op.opcode in ("mul", "div") and len(consts) == 1 and isinstance(consts[0].attr("value"), float):
                value = float(consts[0].attr("value"))
                scale = scale * value if op.opcode == "mul" else (scale / value if value else scale)
        causal = {labels[int(self.producer[v].attr("dimension"))][0]
                  for (v, labels), kind in self.sides.items() if kind == "iota"} >= {"q", "k"}
        kv_heads = math.prod(r[2] for r in m.k.roles if r[0] == "b")
        return {"causal": causal, "scale": scale, "has_bias": bool(m.inputs),
                "gqa_group": m.batch // kv_heads if kv_heads and m.batch % kv_heads == 0 else 1}


def match_attention(func: Function, qk: Op) -> AttentionMatch | None:
    """The attention whose QK dot is ``qk``, or None."""
    if qk.opcode != "dot":
        return None
    return _Matcher(func).match(qk)


def find_attentions(func: Function) -> list[AttentionMatch]:
    """Every attention in ``func`` (none sharing an op with another)."""
    found: list[AttentionMatch] = []
    taken: set[int] = set()
    matcher = _Matcher(func)
    for op in func.ops:
        if op.opcode != "dot" or id(op) in taken:
            continue
        m = matcher.match(op)
        # Score values have one user each, so two attentions meet only at a dot (shared constants
        # and masks are copied into each kernel).
        if m is not None and id(m.pv) not in taken:
            found.append(m)
            taken.update((id(m.qk), id(m.pv)))
    return found
