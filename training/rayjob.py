"""KubeRay ``RayJob`` manifests for SFT and GRPO runs (``smartpath train submit``).

``build_rayjob`` turns a typed :class:`RayJobSpec` into a ``ray.io/v1`` ``RayJob`` dict,
``validate_rayjob`` checks it offline against the CRD's ``openAPIV3Schema`` (from
``../shared/k8s/crds``), ``to_yaml`` renders it for ``--dry-run`` and ``submit_rayjob`` creates it
through the Kubernetes API. ``jsonschema`` and ``kubernetes`` are imported lazily, so building a
manifest needs neither.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from smartpath.core.config import SmartPathConfig

GROUP = "ray.io"
VERSION = "v1"
PLURAL = "rayjobs"
KIND = "RayJob"
API_VERSION = f"{GROUP}/{VERSION}"

CONFIG_MOUNT_DIR = "/etc/smartpath"
CONFIG_FILE = "config.yaml"
RAY_VERSION = "2.60.0"  # the ray[serve] pin in pyproject.toml; the image must carry the same.

# Kubernetes object names and label values are at most 63 characters (DNS-1123/1035 label;
# RFC 1123 limits one DNS label to 63 octets, and label values share the limit).
K8S_NAME_MAX = 63
# A RayJob's name is stricter: KubeRay appends "-xxxxx" (6 chars) to build the RayCluster name, and
# the cluster name must leave room for "-serve-svc" within 63, so the operator rejects RayJob names
# longer than 63 - 10 - 6 = 47 (utils.MaxRayJobNameLength). We cut to that.
RAYJOB_NAME_MAX = 47

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
# Kubernetes resource.Quantity, the same pattern the CRD puts on resource limits.
_QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_ENTRY_MODULE = {"sft": "smartpath.training.sft", "grpo": "smartpath.training.grpo"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def cut_name(name: str, limit: int = RAYJOB_NAME_MAX) -> str:
    """Cut ``name`` to ``limit`` chars; a cut name ends in a hash so long names stay distinct."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{name[: limit - 7].rstrip('-')}-{digest}"


def run_slug(run: str) -> str:
    """A run name (``training.name``) as a DNS label part: dots and underscores become dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", run.lower()).strip("-")


def job_name(prefix: str, kind: str, run: str) -> str:
    """``<prefix>-<kind>-<run>``, cut to a RayJob name: one RayJob per run, since KubeRay never
    re-runs a finished RayJob (the chart's ``smartpath.rayJobName`` builds the same name)."""
    return cut_name(f"{prefix}-{kind}-{run_slug(run)}")


def _quantity(value: str | int | float) -> str:
    text = format(value, "g") if isinstance(value, float) else str(value)
    if isinstance(value, bool) or not _QUANTITY.match(text):
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return text


class PodResources(BaseModel):
    """CPU, memory and GPUs of one Ray pod (requests = limits, as Ray recommends)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: str = Field("2", description="CPU quantity, e.g. '4' or '500m'.")
    memory: str = Field("8Gi", description="Memory quantity, e.g. '16Gi'.")
    gpus: int = Field(0, ge=0, description="NVIDIA GPUs; 0 means a CPU-only pod.")

    @field_validator("cpus", "memory", mode="before")
    @classmethod
    def _as_quantity(cls, value: Any) -> str:
        return _quantity(value)


class RayJobSpec(BaseModel):
    """What ``smartpath train submit`` needs to run one SFT or GRPO job on KubeRay."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["sft", "grpo"]
    name: str = Field(description=f"RayJob name; cut to {RAYJOB_NAME_MAX} chars (DNS-1035).")
    namespace: str = "default"
    image: str = Field(min_length=1, description="Image holding smartpath and ray==2.60.0.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    workers: int = Field(1, ge=1, description="Ray worker pods (replicas = min = max).")
    worker: PodResources = Field(default_factory=PodResources)
    head: PodResources = Field(default_factory=lambda: PodResources(cpus="2", memory="8Gi"))
    ttl_seconds_after_finished: int = Field(3600, ge=0, le=2**31 - 1)
    active_deadline_seconds: int | None = Field(None, ge=1, le=2**31 - 1)
    config_map: str = Field(
        description=f"ConfigMap holding the SmartPath config as '{CONFIG_FILE}', mounted at "
        f"{CONFIG_MOUNT_DIR}."
    )
    s3_secret: str = Field(description="Secret with the S3 credentials.")
    s3_access_key_key: str = Field("access-key", description="Key of the access key in it.")
    s3_secret_key_key: str = Field("secret-key", description="Key of the secret key in it.")
    storage_endpoint: str = Field(min_length=1, description="S3/MinIO endpoint as host:port.")
    storage_secure: bool = False
    runtime_env: dict[str, Any] | None = Field(None, description="Ray runtime_env, if any.")
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("name", mode="before")
    @classmethod
    def _cut_name(cls, value: Any) -> Any:
        return cut_name(value) if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _dns1035(cls, value: str) -> str:
        if not _DNS1035.match(value):
            raise ValueError(
                f"RayJob name {value!r} must be a DNS-1035 label: lower-case letters, digits and "
                "'-', starting with a letter and ending with a letter or digit"
            )
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if len(value) > K8S_NAME_MAX or not _DNS1123_LABEL.match(value):
            raise ValueError(f"namespace {value!r} must be a DNS-1123 label of at most 63 chars")
        return value

    @field_validator("config_map", "s3_secret")
    @classmethod
    def _reference(cls, value: str) -> str:
        # These name objects that already exist, so a bad name is refused, never cut.
        if len(value) > 253 or not _DNS1123_SUBDOMAIN.match(value):
            raise ValueError(f"{value!r} is not a valid Kubernetes object name")
        return value

    @model_validator(mode="after")
    def _label_values(self) -> RayJobSpec:
        for key, value in self.labels.items():
            if len(value) > K8S_NAME_MAX:
                raise ValueError(f"label {key}={value!r} is longer than {K8S_NAME_MAX} chars")
        return self

    @property
    def entrypoint(self) -> str:
        """The command the job runs on the Ray head."""
        return f"python -m {_ENTRY_MODULE[self.kind]} --config {CONFIG_MOUNT_DIR}/{CONFIG_FILE}"

    @classmethod
    def from_config(cls, config: SmartPathConfig, **fields: Any) -> RayJobSpec:
        """Spec whose storage endpoint/TLS come from a loaded SmartPath config."""
        if config.storage.endpoint is None:
            raise ValueError("storage.endpoint must be set to run on Kubernetes")
        fields.setdefault("storage_endpoint", config.storage.endpoint)
        fields.setdefault("storage_secure", config.storage.secure)
        return cls(**fields)


def _env(spec: RayJobSpec) -> list[dict[str, Any]]:
    def secret(name: str, key: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"secretKeyRef": {"name": spec.s3_secret, "key": key}}}

    return [
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        {"name": "SMARTPATH_STORAGE__ENDPOINT", "value": spec.storage_endpoint},
        {"name": "SMARTPATH_STORAGE__SECURE", "value": "true" if spec.storage_secure else "false"},
        secret("SMARTPATH_STORAGE__ACCESS_KEY", spec.s3_access_key_key),
        secret("SMARTPATH_STORAGE__SECRET_KEY", spec.s3_secret_key_key),
    ]


def _resources(res: PodResources) -> dict[str, Any]:
    limits: dict[str, str] = {"cpu": res.cpus, "memory": res.memory}
    if res.gpus > 0:
        limits["nvidia.com/gpu"] = str(res.gpus)
    return {"requests": {"cpu": res.cpus, "memory": res.memory}, "limits": limits}


def _pod_template(
    spec: RayJobSpec, container: str, res: PodResources, labels: dict[str, str], head: bool
) -> dict[str, Any]:
    ctr: dict[str, Any] = {
        "name": container,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "env": _env(spec),
        "resources": _resources(res),
        "volumeMounts": [
            {"name": "smartpath-config", "mountPath": CONFIG_MOUNT_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    if head:
        ctr["ports"] = [
            {"name": "gcs-server", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
            {"name": "client", "containerPort": 10001},
        ]
    pod: dict[str, Any] = {
        "containers": [ctr],
        "volumes": [
            {
                "name": "smartpath-config",
                "configMap": {
                    "name": spec.config_map,
                    "items": [{"key": CONFIG_FILE, "path": CONFIG_FILE}],
                },
            },
            # Ray's object store and NCCL use /dev/shm; the container default is 64 MiB.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if res.gpus > 0:  # GPU nodes are usually tainted so that only GPU pods land there
        pod["tolerations"] = [GPU_TOLERATION]
    return {"metadata": {"labels": dict(labels)}, "spec": pod}


def build_rayjob(spec: RayJobSpec) -> dict[str, Any]:
    """The ``ray.io/v1`` ``RayJob`` for ``spec`` (a plain dict, ready for YAML or the API)."""
    labels = {
        "app.kubernetes.io/name": "smartpath",
        "app.kubernetes.io/component": f"training-{spec.kind}",
        "app.kubernetes.io/managed-by": "smartpath-cli",
        "smartpath.io/job": spec.name,
        **spec.labels,
    }
    body: dict[str, Any] = {
        "entrypoint": spec.entrypoint,
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
        "rayClusterSpec": {
            "rayVersion": RAY_VERSION,
            "headGroupSpec": {
                # No CPUs for Ray tasks, so Train workers always land on the worker pods; Ray
                # Train's controller actor asks for none and runs next to the driver on the head.
                "rayStartParams": {"num-cpus": "0"},
                "template": _pod_template(spec, "ray-head", spec.head, labels, head=True),
            },
            "workerGroupSpecs": [
                {
                    "groupName": "gpu-workers" if spec.worker.gpus > 0 else "cpu-workers",
                    "replicas": spec.workers,
                    "minReplicas": spec.workers,
                    "maxReplicas": spec.workers,
                    "rayStartParams": {},
                    "template": _pod_template(spec, "ray-worker", spec.worker, labels, head=False),
                }
            ],
        },
    }
    if spec.active_deadline_seconds is not None:
        body["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.runtime_env:
        body["runtimeEnvYAML"] = yaml.safe_dump(spec.runtime_env, sort_keys=True)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels},
        "spec": body,
    }


def to_yaml(obj: dict[str, Any]) -> str:
    """The manifest as YAML (for ``--dry-run``), key order kept."""
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)


# ---- offline validation against the CRD --------------------------------------------------------


def crds_dir() -> Path:
    """Folder of the CRD YAMLs: ``$SMARTPATH_CRDS_DIR`` or ``<repo>/../shared/k8s/crds``."""
    env = os.environ.get("SMARTPATH_CRDS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "k8s" / "crds"


def _to_json_schema(node: Any) -> Any:
    """OpenAPI v3 (structural CRD schema) → JSON Schema: drop x-kubernetes-*, map nullable."""
    if isinstance(node, list):
        return [_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.lru_cache(maxsize=8)
def _crd_schema(directory: str, version: str) -> dict[str, Any]:
    path = Path(directory) / f"{GROUP}_{PLURAL}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"RayJob CRD not found at {path} (set SMARTPATH_CRDS_DIR)")
    # The CRD is ~1.4 MB; libyaml's loader reads it in under a second, pure Python in ~6 s.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for doc in yaml.load_all(path.read_text(), Loader=loader):
        if not doc or doc.get("kind") != "CustomResourceDefinition":
            continue
        if doc["spec"]["group"] != GROUP or doc["spec"]["names"]["kind"] != KIND:
            continue
        for ver in doc["spec"]["versions"]:
            if ver["name"] == version:
                return _to_json_schema(ver["schema"]["openAPIV3Schema"])
    raise ValueError(f"{path} has no {KIND} schema for version {version!r}")


def _json_path(path: Any) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"


def validate_rayjob(obj: dict[str, Any]) -> None:
    """Check ``obj`` against the RayJob CRD schema; ValueError naming the first bad path."""
    import jsonschema  # lazy: only validation needs it

    if not isinstance(obj, dict):
        raise ValueError(f"<root>: a RayJob must be a mapping, got {type(obj).__name__}")
    if obj.get("apiVersion") != API_VERSION:
        raise ValueError(f"apiVersion: expected {API_VERSION!r}, got {obj.get('apiVersion')!r}")
    if obj.get("kind") != KIND:
        raise ValueError(f"kind: expected {KIND!r}, got {obj.get('kind')!r}")
    name = (obj.get("metadata") or {}).get("name")
    if not isinstance(name, str) or len(name) > RAYJOB_NAME_MAX or not _DNS1035.match(name):
        raise ValueError(
            f"metadata.name: {name!r} must be a DNS-1035 label of at most {RAYJOB_NAME_MAX} chars"
        )

    schema = _crd_schema(str(crds_dir()), VERSION)
    formats = jsonschema.FormatChecker(formats=())

    @formats.checks("int32")
    def _int32(value: object) -> bool:
        return not isinstance(value, int) or -(2**31) <= value < 2**31

    @formats.checks("int64")
    def _int64(value: object) -> bool:
        return not isinstance(value, int) or -(2**63) <= value < 2**63

    validator = jsonschema.Draft7Validator(schema, format_checker=formats)
    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is not None:
        raise ValueError(f"{_json_path(error.absolute_path)}: {error.message}")


# ---- submission --------------------------------------------------------------------------------


class CustomObjectsApiLike(Protocol):
    """The one method of ``kubernetes.client.CustomObjectsApi`` that submission uses."""

    def create_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, body: Any, **kwargs: Any
    ) -> Any: ...


def _default_api(kube_context: str | None) -> CustomObjectsApiLike:
    try:
        from kubernetes import client, config
    except ImportError as exc:
        raise RuntimeError(
            "submitting a RayJob needs the kubernetes client: pip install kubernetes==37.0.2 "
            "(or use --dry-run to print the manifest)"
        ) from exc
    try:
        config.load_kube_config(context=kube_context)
    except Exception as exc:  # ConfigException, or a missing/garbled kubeconfig file
        if kube_context is not None:
            raise RuntimeError(f"cannot load kube context {kube_context!r}: {exc}") from exc
        try:
            config.load_incluster_config()
        except Exception:
            raise RuntimeError(
                "no Kubernetes credentials: no usable kubeconfig (~/.kube/config or $KUBECONFIG)"
                f" and not running in a cluster ({exc})"
            ) from exc
    return client.CustomObjectsApi()


def submit_rayjob(
    obj: dict[str, Any],
    namespace: str,
    kube_context: str | None = None,
    api: CustomObjectsApiLike | None = None,
) -> dict[str, Any]:
    """Validate ``obj`` and create it in ``namespace``; returns what the API server stored."""
    body = copy.deepcopy(obj)
    meta = body.setdefault("metadata", {})
    if meta.get("namespace") not in (None, namespace):
        raise ValueError(
            f"metadata.namespace {meta['namespace']!r} differs from namespace {namespace!r}"
        )
    meta["namespace"] = namespace
    validate_rayjob(body)
    if api is None:
        api = _default_api(kube_context)
    try:
        created = api.create_namespaced_custom_object(
            group=GROUP,
            version=VERSION,
            namespace=namespace,
            plural=PLURAL,
            body=body,
            field_validation="Strict",  # unknown fields are errors, as with kubectl
        )
    except Exception as exc:  # kubernetes.client.ApiException carries .status
        status = getattr(exc, "status", None)
        if status == 409:
            raise RuntimeError(f"RayJob {namespace}/{meta['name']} already exists") from exc
        if status in (401, 403):
            raise RuntimeError(f"not allowed to create RayJobs in {namespace!r}: {exc}") from exc
        if status == 404:
            raise RuntimeError(
                f"RayJob API not found (is KubeRay installed? namespace {namespace!r}?): {exc}"
            ) from exc
        raise
    return created if isinstance(created, dict) else body
