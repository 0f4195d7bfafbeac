"""The pipeline spec: pydantic models of `NMMPipeline` and their parser. No I/O."""

from nmm.spec.models import (
    API_VERSION,
    KIND,
    SUITES,
    Gate,
    NamespaceConflict,
    PipelineSpec,
    parse_gate,
)
from nmm.spec.names import split_step, step_name
from nmm.spec.parse import SpecError, parse_pipeline, parse_pipeline_document

__all__ = [
    "API_VERSION",
    "KIND",
    "NamespaceConflict",
    "SUITES",
    "Gate",
    "PipelineSpec",
    "SpecError",
    "parse_gate",
    "parse_pipeline",
    "parse_pipeline_document",
    "split_step",
    "step_name",
]
