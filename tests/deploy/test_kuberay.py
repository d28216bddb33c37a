"""deploy/kuberay/rayservice.yaml: parses, serves exactly deploy/serve.yaml, and validates.

Validation, honestly split:
* built-in kinds (the PersistentVolumeClaim) and every Ray pod template (as a ``v1/PodTemplate``)
  against Kubernetes' own OpenAPI schemas bundled by the ``kubernetes-validate`` package, strict
  (unknown fields fail), offline;
* the RayService fields around the pod templates against :data:`RAYSERVICE_SCHEMA`, a subset of
  the KubeRay ``ray.io/v1`` CRD written out here (field names and types as the CRD declares them;
  no package ships the CRD for offline use, so the full CRD is not checked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.settings import ServeSettings
from tests.deploy.promql import DEPLOY

MANIFEST = DEPLOY / "kuberay" / "rayservice.yaml"
SERVE_YAML = DEPLOY / "serve.yaml"

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_GROUP_COMMON = {
    "rayStartParams": _STR_MAP,         # the CRD: map[string]string (numbers must be quoted)
    "template": {"type": "object", "required": ["spec"]},  # a PodTemplateSpec: checked separately
}
RAYSERVICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["serveConfigV2", "rayClusterConfig"],
            "properties": {
                "serveConfigV2": {"type": "string"},
                "serviceUnhealthySecondThreshold": _INT32,
                "deploymentUnhealthySecondThreshold": _INT32,
                "excludeHeadPodFromServeSvc": {"type": "boolean"},
                "rayClusterConfig": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["headGroupSpec"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "authOptions": {  # KubeRay >= 1.5.1, ray-operator/apis/ray/v1/raycluster_types.go
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"},
                                           "enableK8sTokenAuth": {"type": "boolean"}},
                        },
                        "autoscalerOptions": {"type": "object"},
                        "headGroupSpec": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["template"],
                            "properties": {**_GROUP_COMMON, "serviceType": {"type": "string"},
                                           "enableIngress": {"type": "boolean"}},
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["groupName", "template", "minReplicas", "maxReplicas"],
                                "properties": {**_GROUP_COMMON, "groupName": {"type": "string"},
                                               "replicas": _INT32, "minReplicas": _INT32, "maxReplicas": _INT32,
                                               "numOfHosts": _INT32, "idleTimeoutSeconds": _INT32,
                                               "suspend": {"type": "boolean"}},
                            },
                        },
                    },
                },
            },
        },
    },
}


def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]


def _rayservice() -> dict[str, Any]:
    (rs,) = [d for d in _docs() if d["kind"] == "RayService"]
    return rs


def _groups(rs: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    cluster = rs["spec"]["rayClusterConfig"]
    return [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]


def test_manifest_parses() -> None:
    kinds = [(d["apiVersion"], d["kind"]) for d in _docs()]
    assert kinds == [("v1", "PersistentVolumeClaim"), ("ray.io/v1", "RayService")]


def test_serve_config_v2_equals_serve_yaml() -> None:
    """Same Serve config on a laptop (`serve deploy deploy/serve.yaml`) and on KubeRay."""
    in_cluster = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    assert in_cluster == yaml.safe_load(SERVE_YAML.read_text()), (
        "serveConfigV2 differs from deploy/serve.yaml: copy serve.yaml (without comments) into the manifest")


def test_application_args_are_valid_settings() -> None:
    """The import path builder gets `args`: they must make valid ServeSettings (no typo, no bad value)."""
    (app,) = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "service.app:build_app"
    args = dict(app["args"])
    settings = ServeSettings.build(args.pop("repo"), config=args.pop("config", None), overrides=args, environ={})
    options = settings.deployment_options()
    assert options["max_ongoing_requests"] >= settings.max_batch_size
    assert options["ray_actor_options"]["num_cpus"] == settings.replica_cpus


def test_rayservice_matches_the_crd_subset() -> None:
    jsonschema.validate(_rayservice(), RAYSERVICE_SCHEMA)
    bad = yaml.safe_load(yaml.safe_dump(_rayservice()))
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # unquoted: rejected
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAYSERVICE_SCHEMA)


def test_cluster_layout() -> None:
    """Metrics port, model volume, Serve environment and GPU group, in every group where they belong."""
    rs = _rayservice()
    (pvc,) = [d for d in _docs() if d["kind"] == "PersistentVolumeClaim"]
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    groups = dict(_groups(rs))
    assert {"head", "cpu", "gpu"} <= set(groups)
    for name, group in groups.items():
        assert group["rayStartParams"]["metrics-export-port"] == "8080", name
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == 8080 and ports["serve"] == 8000, name
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"]["value"] == "1", name
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"]["value"] == "1", name
        assert env["STEADY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "token", name
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        models = mounts[app["args"]["repo"]]  # the repository Serve reads is the mounted volume
        assert volumes[models["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], name
        assert models.get("readOnly", False) is (name != "head"), name  # replicas only read
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory", name
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"
    gpu = groups["gpu"]
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["rayStartParams"]["num-gpus"] == "1" and container["image"].endswith("-gpu")
    assert gpu["minReplicas"] == 0


def test_every_ray_container_gets_the_cluster_token() -> None:
    """Ray 2.60 clusters use token authentication: KubeRay's authOptions hands the token to every node."""
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    auth = cluster["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"], auth
    assert not auth.get("enableK8sTokenAuth"), "KubeRay does not support Kubernetes token auth for a RayService"
    major, minor, *_ = (int(x) for x in cluster["rayVersion"].split("."))
    assert (major, minor) >= (2, 52), "authOptions needs Ray >= 2.52"
    for name, group in _groups(_rayservice()):
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"] for e in container["env"]}
        # set by hand they would override what the operator injects (it only adds missing variables)
        assert not env & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, name
    bad = yaml.safe_load(yaml.safe_dump(_rayservice()))
    bad["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "on"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAYSERVICE_SCHEMA)


def _kubernetes_validate() -> Any:
    return pytest.importorskip("kubernetes_validate",
                               reason="kubernetes-validate not installed (pip install kubernetes-validate)")


def _builtin(doc: dict[str, Any]) -> bool:
    """A core or built-in API group kind (``v1``, ``apps/v1``), not a CRD such as ``ray.io/v1``."""
    api = doc.get("apiVersion")
    return isinstance(api, str) and {"kind", "metadata"} <= set(doc) and "." not in api.split("/")[0]


def test_builtin_kinds_validate_against_kubernetes_schemas() -> None:
    k = _kubernetes_validate()
    version = k.latest_version()
    builtin = [d for d in _docs() if _builtin(d)]
    assert builtin
    for doc in builtin:
        k.validate(doc, version, True)


def test_pod_templates_validate_against_kubernetes_schemas() -> None:
    k = _kubernetes_validate()
    version = k.latest_version()
    for name, group in _groups(_rayservice()):
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"steady-{name}"},
               "template": group["template"]}
        k.validate(doc, version, True)
    # the validator is strict: an unknown container field fails
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(k.ValidationError):
        k.validate(broken, version, True)


def test_every_built_in_manifest_in_deploy_validates() -> None:
    """Any other Kubernetes manifest added under deploy/ (built-in kinds) validates too."""
    k = _kubernetes_validate()
    version = k.latest_version()
    checked = 0
    for path in sorted(Path(DEPLOY).rglob("*.y*ml")):
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
        except yaml.YAMLError:
            continue
        for doc in docs:
            if _builtin(doc):
                k.validate(doc, version, True)
                checked += 1
    assert checked >= 1
