"""The base of every spec model: camelCase aliases, unknown fields rejected, frozen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class Model(BaseModel):
    """Base: camelCase aliases, unknown fields rejected, names usable from Python too."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)
