"""Argo `{{…}}` parameter substitution and Kubernetes `$(VAR)` expansion."""

from __future__ import annotations

import re

_ARGO = re.compile(r"\{\{\s*([A-Za-z0-9_.\-]+)\s*\}\}")
_K8S = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)|\$\$")


class UnresolvedParameter(KeyError):
    """A `{{…}}` reference with no value in scope."""


def substitute(text: str, scope: dict[str, str]) -> str:
    """Replace every `{{name}}` with scope[name]; an unknown name is an error, as in Argo."""

    def repl(m: re.Match) -> str:
        key = m.group(1)
        if key not in scope:
            raise UnresolvedParameter(f"unresolved parameter {{{{{key}}}}}")
        return scope[key]

    return _ARGO.sub(repl, text)


def substitute_all(obj, scope: dict[str, str]):
    if isinstance(obj, str):
        return substitute(obj, scope)
    if isinstance(obj, list):
        return [substitute_all(x, scope) for x in obj]
    if isinstance(obj, dict):
        return {k: substitute_all(v, scope) for k, v in obj.items()}
    return obj


def expand_env_refs(text: str, env: dict[str, str]) -> str:
    """Kubernetes rules: `$(VAR)` expands when VAR is defined, stays as is otherwise; `$$` → `$`."""

    def repl(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _K8S.sub(repl, text)
