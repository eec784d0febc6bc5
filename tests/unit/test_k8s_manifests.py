"""The Kubernetes manifests in docker/k8s/, checked offline: core kinds against Kubernetes' own schemas
(kubernetes-validate), KEDA's kinds against the schemas committed beside them; and the pieces agree."""

from __future__ import annotations

import json

import jsonschema
import kubernetes_validate
import pytest
import yaml

from config.settings import ROOT, Settings

K8S = ROOT / "docker" / "k8s"
KUBERNETES_VERSION = "1.30"


def documents() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(kind: str, name: str) -> dict:
    [doc] = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


@pytest.mark.parametrize("doc", [d for d in documents() if not d["apiVersion"].startswith("keda.sh/")],
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_core_kinds_validate_against_kubernetes_schemas(doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("doc", [d for d in documents() if d["apiVersion"].startswith("keda.sh/")],
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_keda_kinds_validate_against_the_committed_schemas(doc):
    schema = json.loads((K8S / "schemas" / f"{doc['kind'].lower()}.keda.sh-v1alpha1.json").read_text())
    jsonschema.validate(doc, schema)


def test_a_bad_manifest_is_caught():
    web = one("Deployment", "chatqueue-web")
    broken = {**web, "spec": {**web["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    scaled = one("ScaledObject", "chatqueue-worker")
    schema = json.loads((K8S / "schemas" / "scaledobject.keda.sh-v1alpha1.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**scaled, "spec": {**scaled["spec"], "minReplicas": 0}}, schema)


def test_the_pieces_agree():
    config = one("ConfigMap", "chatqueue-config")["data"]
    secret = one("Secret", "chatqueue-secrets")["stringData"]
    web = one("Deployment", "chatqueue-web")["spec"]["template"]["spec"]
    worker = one("Deployment", "chatqueue-worker")["spec"]["template"]["spec"]
    scaled = one("ScaledObject", "chatqueue-worker")["spec"]
    # KEDA watches the list the workers read and the web tier fills.
    queue = Settings(model=config["CHAT_MODEL"], models_dir=config["CHAT_MODELS_DIR"]).queue
    assert scaled["triggers"][0]["metadata"]["listName"] == queue
    assert scaled["scaleTargetRef"]["name"] == "chatqueue-worker" and scaled["minReplicaCount"] == 0
    auth = one("TriggerAuthentication", scaled["triggers"][0]["authenticationRef"]["name"])["spec"]
    assert all(ref["key"] in secret for ref in auth["secretTargetRef"])
    # The load balancer's readiness does not wait for a worker (or scaling up from zero never begins).
    assert web["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # A worker pod gets one GPU, and time to drain before it is killed.
    [container] = worker["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["terminationGracePeriodSeconds"] >= float(env_of(container)["CHAT_WORKER_DRAIN_S"]) + 30
    # Every CHAT_ variable the manifests set is a setting (a misspelt one would be ignored without a word).
    names = {*config, *secret, *(n for pod in (web, worker) for c in [*pod["containers"], *pod.get("initContainers", [])]
                                 for n in env_of(c))}
    unknown = {n for n in names if n.startswith("CHAT_") and n.removeprefix("CHAT_").lower() not in Settings.model_fields}
    assert not unknown
