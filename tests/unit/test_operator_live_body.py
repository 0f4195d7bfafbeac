"""kopf hands a timer a live view of its object, replaced by kopf's event loop while the handler
runs in a thread. A promote written (spec and annotation in one patch) while the rollout tick was
in its registry call used to pair the old spec with the new annotation: the tick refused the
promote ("not the version the spec asks for"), consumed the annotation, and the next tick started
a canary instead. Here the swap happens at exactly that moment, deterministically."""

import kopf
import pytest

from nmm import lineage
from nmm.spec.serving import ANNOTATION_PROMOTE
from nmm_operator import kube, rollout_state, service_handlers, service_tick


def version(rv: int, promoted: bool) -> dict:
    model = {"name": "nmm-svc", "version": 2} if promoted else {"name": "nmm-svc", "alias": "candidate"}
    return {
        "apiVersion": "nmm.dev/v1alpha1",
        "kind": "NMMService",
        "metadata": {
            "name": "digits",
            "namespace": "team-a",
            "uid": "u-1",
            "resourceVersion": str(rv),
            "annotations": {ANNOTATION_PROMOTE: "2"} if promoted else {},
        },
        "spec": {"model": model},
        "status": {"stableVersion": 1},
    }


class Live(kopf.Body):
    """Replaced by the next version the first `swaps` times its spec is read (as kopf would on a
    watch event arriving then)."""

    def __init__(self, versions: list[dict], swaps: int = 1):
        super().__init__(versions[0])
        self.versions, self.swaps = versions[1:], swaps

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if key == "spec" and self.swaps and self.versions:
            self.swaps -= 1
            self._replace_with(self.versions.pop(0))
        return value


def test_a_copy_taken_while_the_object_changes_is_one_version():
    snap = kube.one_version(Live([version(10, False), version(11, True)]))
    assert snap["metadata"]["resourceVersion"] == "11"
    assert snap["spec"]["model"]["version"] == 2 and snap["metadata"]["annotations"][ANNOTATION_PROMOTE] == "2"


def test_an_object_changing_during_every_copy_is_a_retryable_error():
    versions = [version(rv, rv % 2 == 1) for rv in range(10, 70)]
    with pytest.raises(kube.Changing, match="changed during each of 5 copies"):
        kube.one_version(Live(versions, swaps=60), tries=5)


def test_the_rollout_tick_sees_the_spec_and_the_promote_annotation_of_one_version(monkeypatch):
    live = Live([version(10, False), version(11, True)], swaps=0)
    seen = {}

    def check_owner(model, namespace):  # the registry call during which `nmm promote` lands
        live._replace_with(version(11, True))

    def tick(spec, status, annotation, world, now, **_):
        seen.update(spec=spec.model.model_dump(exclude_none=True), annotation=annotation)
        return rollout_state.Tick(dict(status))

    monkeypatch.setattr(lineage, "check_owner", check_owner)
    monkeypatch.setattr(service_tick, "tick", tick)
    monkeypatch.setattr(service_handlers, "_export", lambda *a: None)
    # As kopf calls it: body, meta, spec and status are live views of one replaceable object.
    service_handlers.rollout(body=live, meta=live.meta, spec=live.spec, status=live.status, patch=kopf.Patch())
    # One version, whichever: the old spec with no annotation, or the promote's spec with its annotation.
    assert (seen["spec"].get("version"), seen["annotation"]) in ((None, None), (2, "2")), seen
