"""The one compiler: PipelineSpec + CompileSettings → Argo Workflow. Pure: no env, no I/O.

The Workflow is checked by round-tripping it through argo-workflows' typed models
(`IoArgoprojWorkflowV1alpha1Workflow`): a value of the wrong type fails here, not on a cluster.
"""

from __future__ import annotations

import json

import yaml

from nmm.compile.settings import CompileSettings
from nmm.compile.workflow import WF_GROUP, WF_PLURAL, WF_VERSION, build, spec_json
from nmm.spec import PipelineSpec


class _Raw:
    """What argo's ApiClient.deserialize expects: an object with `.data` (JSON text)."""

    def __init__(self, obj: dict):
        self.data = json.dumps(obj)


def typed_workflow(obj: dict):
    from argo_workflows.api_client import ApiClient
    from argo_workflows.configuration import Configuration
    from argo_workflows.model.io_argoproj_workflow_v1alpha1_workflow import (
        IoArgoprojWorkflowV1alpha1Workflow,
    )

    return ApiClient(Configuration()).deserialize(_Raw(obj), (IoArgoprojWorkflowV1alpha1Workflow,), True)


def compile_pipeline(spec: PipelineSpec, settings: CompileSettings) -> dict:
    """The Workflow as a dict, after the typed round-trip."""
    from argo_workflows.api_client import ApiClient

    typed = typed_workflow(build(spec, settings))
    out = ApiClient().sanitize_for_serialization(typed)
    # Fixed key order at the top (apiVersion, kind, metadata, spec) for readable YAML.
    return {k: out[k] for k in ("apiVersion", "kind", "metadata", "spec")}


def to_yaml(workflow: dict) -> str:
    return yaml.safe_dump(workflow, sort_keys=False, width=1 << 20)


__all__ = ["WF_GROUP", "WF_PLURAL", "WF_VERSION", "CompileSettings", "compile_pipeline", "spec_json", "to_yaml"]
