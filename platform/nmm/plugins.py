"""What every registry of nmm shares (recipes, data source kinds, serving backends): looking an
entry up by name with an error that names the field and what it offers, and importing an
implementation named "module:attribute" only when it is used."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def entry(registry: Mapping[str, T], name: str, field: str) -> T:
    """`registry[name]`, or ValueError naming `field` and the registered names."""
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"{field}: expected one of {sorted(registry)}, got {name!r}") from None


def resolve(target: str):
    """The object a "module:attribute" names (its module imported now); the attribute may be a
    dotted path ("module:Class.method")."""
    module, attribute = target.split(":")
    return functools.reduce(getattr, attribute.split("."), importlib.import_module(module))
