"""Backend `kserve`: one `serving.kserve.io/v1beta1` InferenceService (serverless), its predictor
a custom container running `nmm serve`; a canary is the new predictor with `canaryTrafficPercent`
(KServe keeps the previous revision serving the rest), and the analysis reads the previous and
latest revisions at their tag-routing URLs. The chart's ClusterServingRuntime describes the same
container for users who write InferenceServices by hand."""

from __future__ import annotations

from nmm.compile.serving import LABEL_SERVICE, LABEL_VERSION, ServedVersion, labels, pod_spec
from nmm.compile.settings import CompileSettings
from nmm.spec.serving import ServiceSpec

ISVC_GROUP, ISVC_VERSION, ISVC_PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"


def inference_service(
    name: str, namespace: str, spec: ServiceSpec, served: ServedVersion, canary_weight: int | None, s: CompileSettings
) -> dict:
    """The InferenceService serving `served`; with `canary_weight`, it is the canary and takes
    that percent (the previous revision the rest). Its pods carry the service and the version as
    labels: the analysis reads every one of them."""
    version = served.version
    predictor = {
        "minReplicas": spec.replicas,
        "maxReplicas": spec.replicas,
        "labels": {LABEL_SERVICE: name, LABEL_VERSION: str(version)},
    } | pod_spec(spec, served, s, "kserve-container")
    if canary_weight is not None:
        predictor["canaryTrafficPercent"] = canary_weight
    return {
        "apiVersion": f"{ISVC_GROUP}/{ISVC_VERSION}",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels(name, {LABEL_VERSION: str(version)}),
            # tag routing: the previous and latest revisions answer at prev-/latest- URLs (the analysis)
            "annotations": {
                "serving.kserve.io/deploymentMode": "Serverless",
                "serving.kserve.io/enable-tag-routing": "true",
            },
        },
        "spec": {"predictor": predictor},
    }


class KServe:
    name = "kserve"
    custom_kinds = {"InferenceService": (ISVC_GROUP, ISVC_VERSION, ISVC_PLURAL)}
    rbac = ({"apiGroups": [ISVC_GROUP], "resources": [ISVC_PLURAL], "verbs": ["get", "create", "patch"]},)

    def children(
        self,
        name: str,
        namespace: str,
        spec: ServiceSpec,
        stable: ServedVersion,
        canary: ServedVersion | None,
        weight: int,
        s: CompileSettings,
        serving: dict,
    ) -> list[dict]:
        served, canary_weight = (canary, weight) if canary else (stable, None)
        isvc = inference_service(name, namespace, spec, served, canary_weight, s)
        isvc["spec"]["predictor"].setdefault("canaryTrafficPercent", None)  # a merge patch removes it
        return [isvc]

    def split(self, children: list[dict]) -> dict[str, int]:
        """KServe sends `canaryTrafficPercent` to the latest revision, the rest to the previous."""
        (isvc,) = [c for c in children if c["kind"] == "InferenceService"]
        canary = isvc["spec"]["predictor"].get("canaryTrafficPercent")
        return {"stable": 100 - (canary or 0), "candidate": canary or 0}

    def endpoints(self, name: str, namespace: str) -> dict[str, str]:
        return {
            "stable": f"http://prev-{name}-predictor.{namespace}.svc.cluster.local",
            "candidate": f"http://latest-{name}-predictor.{namespace}.svc.cluster.local",
        }


KSERVE = KServe()
