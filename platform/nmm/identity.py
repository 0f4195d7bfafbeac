"""Who a run is: the identity under which its outputs are stored, tracked and reused.

A pipeline's name alone is not an identity: the same name lives in many namespaces, and a
pipeline deleted and recreated (with another spec) gets the same run names again. So every run is
(namespace, pipeline, owner UID, run id): on a cluster the owner is the NMMPipeline object (its
UID changes when it is recreated), for a Workflow submitted on its own or run by `nmm run` the
Workflow itself. Outputs are reused only under the same identity, and then only when their
cache key matches too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Names, UIDs and Argo placeholders ({{workflow.uid}}); nothing that needs quoting in a key or
# in an MLflow search filter.
_PART = re.compile(r"^[A-Za-z0-9._{}-]{1,253}$")


@dataclass(frozen=True)
class RunIdentity:
    namespace: str
    pipeline: str
    owner_uid: str
    run_id: str

    def __post_init__(self) -> None:
        for name in ("namespace", "pipeline", "owner_uid", "run_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _PART.match(value) or value in (".", ".."):
                raise ValueError(
                    f"--{name.replace('_', '-')}: expected a name of letters, digits, '.', '_', '-' "
                    f"(at most 253), got {str(value)[:80]!r}"
                )

    @property
    def key(self) -> str:
        """One string for the whole identity (MLflow tags, registry matching)."""
        return f"{self.namespace}/{self.pipeline}/{self.owner_uid}/{self.run_id}"

    @property
    def experiment(self) -> str:
        """The MLflow experiment: one per pipeline name and namespace (its runs are told apart
        by owner UID and run id)."""
        return f"{self.namespace}/{self.pipeline}"
