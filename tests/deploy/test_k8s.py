"""The Kubernetes manifests (deploy/k8s, kustomize): every resource the kustomization lists passes
`kubernetes-validate` (strict: unknown fields fail) against the API schemas, and they agree with the
server and with each other: probes on the metrics port's /healthz and /readyz, the gRPC port, GPU
resources, the store on a ReadWriteMany claim, a grace period above the server's, Envoy's config the
one compose uses (ring hash on the client's header), the HPA on the queue-depth metric the server
exports, and scrape annotations on the metrics port.

The resource list is read from kustomization.yaml here (kubectl is not on every CI machine); where
kubectl is installed, `kubectl kustomize`'s output is validated too.
"""

from __future__ import annotations

import copy
import inspect
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.client.library import ROUTING_HEADER
from service.rpc import config as cfg

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
VERSION = "1.37.0"


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def resources() -> list[dict[str, Any]]:
    """Every document of every file the kustomization lists."""
    docs = []
    for name in kustomization()["resources"]:
        path = K8S / name
        assert path.is_file(), f"kustomization lists {name}, which is not in deploy/k8s"
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in resources() if d["kind"] == kind}


def test_every_resource_passes_kubernetes_validate() -> None:
    docs = resources()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler"}
    for doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)
    # The validator does reject what is wrong (so passing means something): an unknown field, a
    # misspelt probe.
    broken = copy.deepcopy(by_kind("Deployment")["preimage"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/readyz"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def test_the_kustomization_is_well_formed() -> None:
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    names = [(d["kind"], d["metadata"]["name"]) for d in resources()]
    assert len(names) == len(set(names)), names
    (generator,) = k["configMapGenerator"]
    for entry in generator["files"]:
        key, _, file = entry.partition("=")
        assert (K8S / (file or key)).is_file(), entry


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_replicas_probe_drain_and_use_a_gpu() -> None:
    deployment = by_kind("Deployment")["preimage"]
    pod = deployment["spec"]["template"]
    server = container(deployment)
    env = {e["name"]: e["value"] for e in server["env"]}
    assert set(env) <= {s.env for s in cfg.settings()} | {"PREIMAGE_CACHE"}, env
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["grpc"] == int(env["PREIMAGE_ADDRESS"].rsplit(":", 1)[1])
    assert ports["metrics"] == int(env["PREIMAGE_METRICS_PORT"]) and env["PREIMAGE_METRICS_ADDRESS"] == "0.0.0.0"
    # Liveness must not be gRPC health: that is NOT_SERVING for a whole drain.
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert server["startupProbe"]["grpc"]["port"] == ports["grpc"]
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180  # the image's start period
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(env["PREIMAGE_SHUTDOWN_GRACE"])
    assert int(server["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # the Dockerfile's user
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"
    # The store: the claim, mounted where PREIMAGE_STORE points, ReadWriteMany.
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = volumes["store"]["persistentVolumeClaim"]["claimName"]
    assert mounts["store"] == env["PREIMAGE_STORE"]
    assert by_kind("PersistentVolumeClaim")[claim]["spec"]["accessModes"] == ["ReadWriteMany"]
    tokens = Path(env["PREIMAGE_AUTH_TOKENS_FILE"])
    assert mounts[next(n for n, v in volumes.items() if "secret" in v)] == str(tokens.parent)


def test_envoy_routes_by_model_over_the_headless_service() -> None:
    config_file = next(e.partition("=")[2] for e in kustomization()["configMapGenerator"][0]["files"])
    assert (K8S / config_file).read_text() == (ROOT / "deploy" / "envoy.yaml").read_text(), (
        "deploy/k8s/envoy-config.yaml must be a copy of deploy/envoy.yaml"
    )
    envoy_config = yaml.safe_load((K8S / config_file).read_text())
    (cluster,) = envoy_config["static_resources"]["clusters"]
    assert cluster["lb_policy"] == "RING_HASH"
    route = envoy_config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (vhost,) = route["route_config"]["virtual_hosts"]
    assert vhost["routes"][0]["route"]["hash_policy"][0]["header"]["header_name"] == ROUTING_HEADER
    socket = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    services = by_kind("Service")
    replicas = services[socket["address"]]
    assert replicas["spec"]["clusterIP"] == "None"  # headless: DNS answers every replica, STRICT_DNS balances
    assert socket["port_value"] in [p["port"] for p in replicas["spec"]["ports"]]
    assert replicas["spec"]["selector"] == by_kind("Deployment")["preimage"]["spec"]["selector"]["matchLabels"]
    proxy = by_kind("Deployment")["preimage-envoy"]
    envoy = container(proxy)
    listener = envoy_config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    assert listener in [p["containerPort"] for p in envoy["ports"]]
    (volume,) = proxy["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == kustomization()["configMapGenerator"][0]["name"]
    assert envoy["args"] == ["-c", f"{envoy['volumeMounts'][0]['mountPath']}/envoy.yaml"]
    front = services["preimage"]
    assert front["spec"]["selector"] == proxy["spec"]["selector"]["matchLabels"]
    assert front["spec"]["ports"][0]["targetPort"] == "grpc"


def test_hpa_scales_the_replicas_on_the_queue_depth_metric() -> None:
    from service.rpc.metrics import _Sampled

    (hpa,) = by_kind("HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "preimage"}
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    # The name the server exports (read from the collector's source, so a rename fails here).
    assert f'"{name}"' in inspect.getsource(_Sampled.collect)
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_kubectl_kustomize_output_validates() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the resource list was validated file by file above")
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert len(docs) == len(resources()) + 1  # and the generated ConfigMap
    for doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "preimage-envoy")
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"].startswith("preimage-envoy-")  # kustomize's hashed name, rewired
