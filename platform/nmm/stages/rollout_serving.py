"""The rollout stage's serving half (`spec.rollout.serving`): roll a promoted version out as a
canary against the champion, and record every step in the rollout's MLflow run.

- Local engine (NMM_ENGINE=local): for real on this machine (nmm.rollout.canary): both versions
  served on loopback, traffic split by weight, analysed at each step; the stage waits for the
  outcome and moves `champion` only when every step passed.
- On a cluster: the pipeline's `NMMService` is created or updated to serve the new version; the
  operator runs the same steps and analysis and moves `champion` itself.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from nmm import storage
from nmm.data.dataset import Dataset
from nmm.rollout import analysis, probe
from nmm.rollout.local_canary import LocalCanary, Outcome, Step, StepResult
from nmm.spec.crd import GROUP, SERVICE_PLURAL, VERSION
from nmm.spec.serving import SERVICE_KIND, Serving
from nmm.stages.context import StageContext

PROBE_FILE = "probe.jsonl"


def local_engine() -> bool:
    return os.environ.get("NMM_ENGINE") == "local"


def held_out(model_manifest: dict) -> Dataset:
    """The model's dataset (its splits are read on first use and kept: probe cases, traffic)."""
    return Dataset.open(model_manifest["dataset_uri"])


def write_probe(ctx: StageContext, serving: Serving, ds: Dataset) -> tuple[str | None, probe.Cases | None]:
    """(URI, cases): the quality probe's cases — per task the model serves, from the test split
    (drawings graded by the suite's judge, fitted on the train split) —, written next to the
    rollout's outputs (the operator reads them there); (None, None) without a probe."""
    qp = serving.canary.analysis.quality_probe
    if qp is None:
        return None, None
    if qp.cases_uri:
        return qp.cases_uri, probe.loads(storage.read_bytes(storage.in_store(qp.cases_uri, ctx.store)), qp.cases)
    ev = ctx.spec.spec.evaluation
    cases = probe.cases_from_split(
        ds.split("test"), ev.suites, qp.cases, train=ds.split("train"), drawing=(ev.temperature, ev.guidance)
    )
    missing = sorted(set(ctx.spec.spec.model.tasks) - set(cases.tasks))
    if missing:
        raise probe.ProbeError(
            f"the quality probe found no held-out {missing[0]} cases in {ds.uri}; set "
            "analysis.qualityProbe: null to roll out on SLOs alone"
        )
    uri = storage.join(ctx.stage_uri(ctx.step("rollout")), PROBE_FILE)
    storage.write_bytes(uri, probe.dumps(cases))
    return uri, cases


def traffic(ctx: StageContext, cases: probe.Cases | None, ds: Dataset, limit: int = 32) -> tuple[list[dict], list[str]]:
    """What the local canary sends: (chat cases — the probe's, or held-out ones when there is no
    probe —, prompts to draw for models that generate)."""
    tasks = ctx.spec.spec.model.tasks
    chat = cases.chat if cases is not None else []
    if not chat and "m2t" in tasks:
        chat = probe.cases_from_split(ds.split("test"), ctx.spec.spec.evaluation.suites, 40).chat
    drawn = [caps[0] for caps in ds.split("test").captions if caps][:limit] if "m2g" in tasks else []
    return chat, drawn


def run_local(
    ctx: StageContext,
    run_,
    serving: Serving,
    stable: str,
    candidate: str,
    cases: probe.Cases | None,
    chat: list[dict],
    drawn: list[str],
    log,
) -> Outcome:
    steps = [Step(s.weight, s.pause_seconds) for s in serving.canary.steps]
    batching = {
        "max_batch": serving.batching.max_batch,
        "max_wait_ms": serving.batching.max_wait_ms,
        "max_queue": serving.batching.max_queue,
    }
    with tempfile.TemporaryDirectory(prefix="nmm-canary-") as tmp:
        canary = LocalCanary(
            stable,
            candidate,
            steps,
            analysis.Limits.of(serving.canary.analysis),
            cases,
            Path(tmp),
            chat=chat,
            prompts=drawn,
            store=ctx.store,
            batching=batching,
        )
        results: list[StepResult] = []

        def on_step(r: StepResult) -> None:
            results.append(r)
            run_.log_metrics(
                {
                    "canary.weight": r.weight,
                    "canary.ok": float(r.ok),
                    "canary.stable_requests": r.stable_requests,
                    **{f"canary.{k}": v for k, v in r.measured.items()},
                },
                step=r.index + 1,
            )

        outcome = canary.run(on_step, log=log.info)
        for track in ("stable", "candidate"):
            log_file = Path(tmp) / f"{track}.log"
            if log_file.exists():
                run_.log_bytes(log_file.read_bytes()[-1_000_000:], f"{track}.log", "canary")
    if results:
        run_.log_bytes(plot(results), "canary.png", "canary")
    return outcome


def plot(results: list[StepResult]) -> bytes:
    """Per step: weight, candidate p95 latency and time to first token, quality of both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r.index + 1 for r in results]
    series = lambda k: [r.measured.get(k, float("nan")) for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].step(x, [r.weight for r in results], where="post", color="tab:blue")
    axes[0].set(title="candidate weight (%)", xlabel="step", ylim=(0, 105))
    for r in results:
        if not r.ok:
            axes[0].axvline(r.index + 1, color="tab:red", linestyle="--")
    axes[1].plot(x, series("p95_latency_ms"), "o-", label="p95 latency")
    axes[1].plot(x, series("p95_ttft_ms"), "s-", label="p95 time to first token")
    axes[1].set(title="candidate latency (ms)", xlabel="step")
    axes[1].legend(fontsize=7)
    axes[2].plot(x, series("quality_candidate"), "o-", label="candidate")
    axes[2].plot(x, series("quality_stable"), "s--", label="stable")
    axes[2].set(title="quality probe", xlabel="step", ylim=(-0.05, 1.05))
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def service_body(ctx: StageContext, serving: Serving, name: str, version: str, cases_uri: str | None) -> dict:
    """The pipeline's NMMService serving `version` (the operator rolls it out as a canary)."""
    spec = serving.model_dump(by_alias=True, exclude_none=True, mode="json")  # no qualityProbe: none (NMMService)
    if cases_uri and "qualityProbe" in spec["canary"]["analysis"]:
        spec["canary"]["analysis"]["qualityProbe"]["casesUri"] = cases_uri
    spec["model"] = {"name": name, "version": int(version)}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": SERVICE_KIND,
        "metadata": {
            "name": ctx.pipeline,
            "namespace": ctx.run.namespace,
            "labels": {"nmm.dev/pipeline": ctx.pipeline, "app.kubernetes.io/managed-by": "nmm"},
        },
        "spec": spec,
    }


class ClusterRefused(RuntimeError):
    """The Kubernetes API would not take the NMMService: unreachable or 5xx/429 (retryable), or a
    refusal such as 403 or 422 (not)."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def apply_service(body: dict) -> str:
    """Create the NMMService, or point the existing one at the new version ("created" | "updated").
    The update replaces the whole spec (a JSON patch), so what the pipeline no longer sets goes."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    from nmm import kubeclient

    meta = body["metadata"]
    where = f"NMMService {meta['namespace']}/{meta['name']}"
    try:
        api = kubeclient.custom_objects()
        args = (GROUP, VERSION, meta["namespace"], SERVICE_PLURAL)
        try:
            api.create_namespaced_custom_object(*args, body)
            return "created"
        except ApiException as exc:
            if exc.status != 409:
                raise
        api.patch_namespaced_custom_object(
            *args, meta["name"], [{"op": "replace", "path": "/spec", "value": body["spec"]}]
        )
        return "updated"
    except kubeclient.KubeConfigError as exc:
        raise ClusterRefused(f"{where}: {exc}", retryable=False) from None
    except ApiException as exc:
        raise ClusterRefused(
            f"{where}: the API server answered {exc.status} {exc.reason}",
            retryable=exc.status == 0 or exc.status == 429 or exc.status >= 500,
        ) from None
    except (OSError, HTTPError) as exc:  # connection refused, DNS: the API server is not there right now
        raise ClusterRefused(f"{where}: {exc}", retryable=True) from None
