"""Evaluate Argo `when` expressions after substitution (the govaluate subset Argo users write):
comparisons (== != < > <= >=) of numbers or bare/quoted strings, joined by && and ||, with !."""

from __future__ import annotations

import re

_CMP = re.compile(r"^\s*(.*?)\s*(==|!=|<=|>=|<|>)\s*(.*?)\s*$")


class WhenError(ValueError):
    """The expression is not one this engine understands."""


def _value(tok: str):
    tok = tok.strip()
    if len(tok) >= 2 and tok[0] == tok[-1] and tok[0] in "'\"":
        return tok[1:-1]
    try:
        return float(tok)
    except ValueError:
        return tok


def _compare(expr: str) -> bool:
    expr = expr.strip()
    if expr.startswith("!"):
        return not _compare(expr[1:])
    if expr in ("true", "false"):
        return expr == "true"
    m = _CMP.match(expr)
    if not m:
        raise WhenError(f"cannot evaluate when-expression {expr!r}")
    a, op, b = _value(m.group(1)), m.group(2), _value(m.group(3))
    if op in ("==", "!="):
        return (a == b) == (op == "==")
    if not (isinstance(a, float) and isinstance(b, float)):
        raise WhenError(f"{op} needs numbers, got {m.group(1)!r} and {m.group(3)!r}")
    return {"<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op]


def evaluate(expr: str) -> bool:
    return any(all(_compare(term) for term in clause.split("&&")) for clause in expr.split("||"))
