"""deploy/kubernetes/: every manifest valid against the Kubernetes schemas, and coherent.

``kubernetes-validate`` checks each resource (strictly: an unknown field is an error)
against the schemas of the Kubernetes release it ships; the rest checks what no schema
can: that the selectors, ports, probes and grace period agree with each other and
with voxrelay's settings (SPEC: "Running more than one process").
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.servers import ROOT
from voxrelay.service.settings import Settings

KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBECTL = shutil.which("kubectl")
#: The oldest release whose API this base must run on (gRPC probes are GA since 1.27).
OLDEST = "1.27"


def kustomization() -> dict[str, Any]:
    loaded = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def resources() -> list[dict[str, Any]]:
    """Every resource the kustomization lists, in its order."""
    found = []
    for name in kustomization()["resources"]:
        found += [doc for doc in yaml.safe_load_all((KUBERNETES / name).read_text()) if doc]
    return found


def by_kind() -> dict[str, dict[str, Any]]:
    return {resource["kind"]: resource for resource in resources()}


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container["env"]}


def test_every_file_is_in_the_kustomization() -> None:
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert files == set(kustomization()["resources"])


@pytest.mark.parametrize("version", [OLDEST, kubernetes_validate.utils.latest_version()])
def test_every_manifest_is_valid_against_the_schemas(version: str) -> None:
    kinds = []
    for resource in resources():
        kubernetes_validate.validate(resource, version, strict=True)
        kinds.append(resource["kind"])
    assert sorted(kinds) == sorted(
        [
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "Secret",
            "Service",
            "Service",
        ]
    )


def test_an_invalid_manifest_is_caught() -> None:
    broken = by_kind()["Deployment"]
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, OLDEST, strict=True)


def test_deployment_probes_drain_and_security() -> None:
    deployment = by_kind()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = env_of(container)
    assert env["VOXRELAY_HOST"]["value"] == "0.0.0.0"
    assert int(env["VOXRELAY_GRPC_PORT"]["value"]) == ports["grpc"]
    assert int(env["VOXRELAY_WS_PORT"]["value"]) == ports["ws"]
    assert int(env["VOXRELAY_METRICS_PORT"]["value"]) == ports["metrics"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ws"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ws"}
    assert container["startupProbe"]["grpc"]["port"] == ports["grpc"]
    # The kubelet's SIGKILL comes after the grace period: the pause and the drain fit in.
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(env["VOXRELAY_DRAIN_S"]["value"])
    assert pod["terminationGracePeriodSeconds"] > pause + drain
    assert drain == Settings(_env_file=None, drain_s=drain).drain_s
    # The Redis URL carries a password: only ever from a Secret.
    secret = env["VOXRELAY_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] == by_kind()["Secret"]["metadata"]["name"]
    assert secret["key"] in by_kind()["Secret"]["stringData"]
    assert env["VOXRELAY_REDIS_FAILURE"]["value"] in ("open", "closed")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]


def test_selectors_and_targets_agree() -> None:
    kinds = by_kind()
    pod_labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    services = [r for r in resources() if r["kind"] == "Service"]
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    grpc = next(s for s in services if any(p["name"] == "grpc" for p in s["spec"]["ports"]))
    assert grpc["spec"]["clusterIP"] == "None"  # headless: clients balance per call
    pdb = kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert pdb.items() <= pod_labels.items()
    target = kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    deployment = kinds["Deployment"]["metadata"]["name"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment)


@pytest.mark.skipif(
    KUBECTL is None, reason="needs kubectl (renders the kustomization); not in `make test-deps`"
)
def test_kustomize_renders_the_base(tmp_path: Path) -> None:
    assert KUBECTL is not None
    done = subprocess.run(
        [KUBECTL, "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    rendered = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert len(rendered) == len(resources())
    for resource in rendered:
        kubernetes_validate.validate(resource, OLDEST, strict=True)
