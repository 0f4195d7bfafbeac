"""The pipeline spec's reference page (`docs/pipelines.md`), generated from the pydantic models
that validate it: every field with its YAML name, type, default, bounds and description. `make
docs` writes it; a test fails when the checked-in page differs from what the models say.

    python -m nmm.spec.reference > docs/pipelines.md
"""

from __future__ import annotations

import enum
import types
import typing
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from nmm.spec.models import PipelineSpec

INTRO = """# Pipeline reference

A pipeline is one YAML document, `kind: NMMPipeline` (`apiVersion: nmm.dev/v1alpha1`): the same
document `nmm run` runs locally and the operator runs on a cluster (`nmm crd` prints the CRD
generated from the same models). Every field below, its type, its default and what it means.
Unknown fields are errors everywhere, and every error names the field's path.

This page is generated from `nmm.spec` (`make docs`); edit the models' descriptions, not the page.
The example pipelines in `workflows/` use most of it.
"""


def _is_model(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _strip(tp):
    """The type without Annotated metadata and None; whether None was allowed."""
    optional = False
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            optional = optional or len(args) < len(get_args(tp))
            if len(args) != 1:
                return tp, optional
            tp = args[0]
        else:
            return tp, optional


def _type_name(tp) -> str:
    tp, optional = _strip(tp)
    origin = get_origin(tp)
    if origin is Literal:
        text = " \\| ".join(f"`{a}`" for a in get_args(tp))
    elif origin in (Union, types.UnionType):
        text = " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    elif origin in (list, tuple):
        text = f"list of {_type_name(get_args(tp)[0])}"
    elif origin is dict:
        key, value = get_args(tp)
        text = f"map of {_type_name(key)} to {_type_name(value)}"
    elif _is_model(tp):
        text = f"[{tp.__name__}](#{tp.__name__.lower()})"
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        text = " \\| ".join(f"`{m.value}`" for m in tp)
    elif tp is Any:
        text = "any"
    else:
        text = {str: "string", int: "integer", float: "number", bool: "boolean"}.get(
            tp, getattr(tp, "__name__", str(tp))
        )
    return text + (" or null" if optional else "")


def _bounds(field: FieldInfo) -> str:
    """`>= 1, <= 64`, a pattern, … from the field's constraints (also those of an Annotated type
    inside an optional one)."""
    metadata, todo = list(field.metadata), [field.annotation]
    while todo:
        tp = todo.pop()
        if get_origin(tp) is Annotated:
            metadata += list(get_args(tp)[1:])
            todo.append(get_args(tp)[0])
        elif get_origin(tp) in (Union, types.UnionType):
            todo += list(get_args(tp))
    out = []
    for m in metadata:
        for attr, word in (
            ("ge", ">="),
            ("gt", ">"),
            ("le", "<="),
            ("lt", "<"),
            ("min_length", "length >="),
            ("max_length", "length <="),
        ):
            if getattr(m, attr, None) is not None:
                out.append(f"{word} {getattr(m, attr)}")
        if getattr(m, "pattern", None):
            out.append(f"pattern `{m.pattern}`".replace("|", "\\|"))
    return ", ".join(dict.fromkeys(out))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return ""
    if isinstance(value, BaseModel):
        return "(its defaults)"
    if value in ({}, []):
        return "empty"
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{value}`" if value is not None else "null"


def _one_line(text: str | None) -> str:
    """One table cell: on one line, a pipe escaped, `<key>` shown rather than read as HTML."""
    return " ".join((text or "").split()).replace("|", "\\|").replace("<", "&lt;")


def _models(root: type[BaseModel]) -> list[type[BaseModel]]:
    """Every model reachable from `root`, in the order a reader meets them (depth first)."""
    seen: list[type[BaseModel]] = []

    def visit(model):
        if model in seen:
            return
        seen.append(model)
        hints = typing.get_type_hints(model, include_extras=True)
        for name in model.model_fields:
            for tp in _flatten(hints.get(name)):
                if _is_model(tp):
                    visit(tp)

    visit(root)
    return seen


def _flatten(tp) -> list:
    out, todo = [], [tp]
    while todo:
        t = todo.pop()
        args = get_args(t)
        if args and get_origin(t) is not Literal:
            todo.extend(args)
        else:
            out.append(t)
    return out


def markdown(root: type[BaseModel] = PipelineSpec) -> str:
    parts = [INTRO]
    for model in _models(root):
        hints = typing.get_type_hints(model, include_extras=True)
        doc = _one_line(model.__doc__) if model.__doc__ and model.__doc__ != BaseModel.__doc__ else ""
        parts.append(f"\n## {model.__name__}\n")
        if doc:
            parts.append(f"\n{doc}\n")
        parts.append("\n| field | type | default | bounds | meaning |\n|---|---|---|---|---|\n")
        for name, field in model.model_fields.items():
            key = field.alias or name
            parts.append(
                f"| `{key}` | {_type_name(hints[name])} | {_default(field)} | {_bounds(field)} | "
                f"{_one_line(field.description)} |\n"
            )
    return "".join(parts)


if __name__ == "__main__":
    print(markdown(), end="")
