"""The one way nmm connects to Kubernetes (the CLI, the operator, the node daemon).

`NMM_KUBE_SERVER` (a `kubectl proxy` URL, or a test's API emulator), else the pod's service account
when running inside a cluster, else the local kube config. TLS is verified wherever TLS is used.
"""

from __future__ import annotations

import os
from functools import lru_cache

from kubernetes import client, config


class KubeConfigError(RuntimeError):
    """No way to reach a Kubernetes API server is configured."""


@lru_cache(maxsize=1)
def api_client() -> client.ApiClient:
    cfg = client.Configuration()
    server = os.environ.get("NMM_KUBE_SERVER")
    if server:
        cfg.host = server
        return client.ApiClient(cfg)
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)
        else:
            config.load_kube_config(client_configuration=cfg)
    except config.ConfigException as exc:
        raise KubeConfigError(f"no Kubernetes connection (NMM_KUBE_SERVER, in-cluster or kube config): {exc}") from None
    return client.ApiClient(cfg)


def custom_objects() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client())


def core() -> client.CoreV1Api:
    return client.CoreV1Api(api_client())
