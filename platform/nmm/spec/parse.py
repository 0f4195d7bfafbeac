"""Text → `PipelineSpec`, with every problem reported as `<field path>: <what was expected>`.

No I/O: callers read the file (at most `MAX_SPEC_BYTES` + 1 bytes of it) and hand over its text.
Hostile documents are refused before they cost anything: aliases (the "billion laughs" bomb),
nesting deeper than `MAX_DEPTH`, numbers longer than `MAX_NUMBER_CHARS`.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

import yaml
from pydantic import ValidationError

from nmm.spec.models import PipelineSpec

MAX_SPEC_BYTES = 1024 * 1024
MAX_DEPTH = 32  # the deepest field of a valid spec sits at depth 7
MAX_NUMBER_CHARS = 40  # far beyond any valid value; Python refuses ints over 4,300 digits anyway
_RELATIVE_PATH = re.compile(r"^([A-Za-z][A-Za-z0-9_.\[\]-]*): (.*)$", re.S)


class SpecError(ValueError):
    """A pipeline spec that cannot be accepted; `problems` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one), aliases,
    deep nesting and huge numbers, each before building anything from them."""

    _depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None,
                None,
                "aliases (*name) are not allowed in a pipeline; write the value out",
                self.peek_event().start_mark,
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _bounded_number(kind: str):
    parent = getattr(yaml.SafeLoader, f"construct_yaml_{kind}")

    def construct(loader: _StrictLoader, node: yaml.ScalarNode):
        if len(node.value) > MAX_NUMBER_CHARS:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"number of {len(node.value)} characters; at most {MAX_NUMBER_CHARS} allowed",
                node.start_mark,
            )
        return parent(loader, node)

    return construct


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _bounded_number("int"))
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _bounded_number("float"))


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):  # `{{}}`: a mapping as a key; `key in seen` would raise TypeError
            raise yaml.constructor.ConstructorError(
                None, None, f"a mapping key must be a scalar, found a {type(key).__name__}", key_node.start_mark
            )
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")


def format_loc(loc: tuple) -> str:
    """A field path: `spec.training.phases[0].steps`. A key that is not a plain name (an unknown
    key of any text: newlines, quotes, a megabyte) is shown quoted and cut, so a problem stays one
    bounded line."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(str(part)):
            out += ("." if out else "") + str(part)
        else:
            text = repr(str(part))
            out += f"[{text[:40]}{'…' if len(text) > 40 else ''}]"
    return out or "<document>"


def _describe(err: dict) -> tuple[str, str]:
    """One pydantic error → (field path, message)."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # Literal/union errors append the member tag to the loc; keep the field path only.
    loc = tuple(
        p
        for p in loc
        if not (isinstance(p, str) and ("[" in p or p in {"constrained-int", "int", "float", "str", "none"}))
    )
    path = format_loc(loc)
    kind = err["type"]
    msg = err["msg"]
    if kind == "extra_forbidden":
        return path, "unknown field (not part of the NMMPipeline schema)"
    if kind == "missing":
        return path, "required field is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        rel = _RELATIVE_PATH.match(msg)
        if rel:
            path = f"{path}.{rel.group(1)}" if path != "<document>" else rel.group(1)
            msg = rel.group(2)
        return path, msg
    got = err.get("input")
    if got is not None and not isinstance(got, (dict, list)):
        text = repr(got)
        msg = f"{msg[0].lower()}{msg[1:]} (got {text[:60]}{'…' if len(text) > 60 else ''})"
    else:
        msg = f"{msg[0].lower()}{msg[1:]}"
    if msg.startswith("input should be "):
        msg = "expected " + msg[len("input should be ") :]
    elif msg.startswith("string should match pattern"):
        msg = "expected a string matching" + msg[len("string should match") :]
    return path, msg


def errors_of(exc: ValidationError) -> list[str]:
    lines, seen = [], set()
    for err in exc.errors(include_url=False):
        path, msg = _describe(err)
        line = f"{path}: {msg}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return lines


def check_shape(doc: Any) -> str | None:
    """What makes a decoded document (YAML, JSON, an API object) too hostile to validate: nesting
    deeper than MAX_DEPTH, an int of more than MAX_NUMBER_CHARS digits. None when it is fine.
    Iterative, so a deep document cannot exhaust the stack here."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"<document>: nested deeper than {MAX_DEPTH} levels"
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * MAX_NUMBER_CHARS:
            return f"<document>: a number with more than {MAX_NUMBER_CHARS} digits"
    return None


def parse_json(text: str, source: str) -> PipelineSpec:
    """The spec as JSON (a stage's --spec): the same checks as YAML."""
    import json

    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, or an int over Python's digit limit
        raise SpecError(source, [f"<document>: invalid JSON: {str(exc)[:200]}"]) from None
    return parse_pipeline_document(doc, source)


def parse_pipeline_document(doc: Any, source: str = "<spec>") -> PipelineSpec:
    if not isinstance(doc, dict):
        raise SpecError(source, [f"<document>: expected a mapping (an NMMPipeline), got {type(doc).__name__}"])
    hostile = check_shape(doc)
    if hostile:
        raise SpecError(source, [hostile])
    try:
        return PipelineSpec.model_validate(doc)
    except ValidationError as exc:
        raise SpecError(source, errors_of(exc)) from None


def parse_pipeline(text: str, source: str = "<spec>") -> PipelineSpec:
    """Parse and validate a pipeline YAML text. Raises `SpecError`."""
    if len(text.encode("utf-8", "replace")) > MAX_SPEC_BYTES:
        raise SpecError(source, [f"<document>: expected at most {MAX_SPEC_BYTES} bytes of YAML"])
    try:
        docs = list(yaml.load_all(text, Loader=_StrictLoader))
    except RecursionError:  # not reached with MAX_DEPTH, kept as the last line of defence
        raise SpecError(source, [f"<document>: nested deeper than {MAX_DEPTH} levels"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<document>"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(source, [f"{where}: invalid YAML: {problem}"]) from None
    docs = [d for d in docs if d is not None]
    if len(docs) != 1:
        raise SpecError(source, [f"<document>: expected exactly one YAML document, got {len(docs)}"])
    return parse_pipeline_document(docs[0], source)
