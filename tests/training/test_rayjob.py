"""RayJob manifests for SFT/GRPO: built, validated against the real KubeRay CRD, submitted."""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from smartpath.core.config import SmartPathConfig
from smartpath.training import rayjob
from smartpath.training.rayjob import (
    PodResources,
    RayJobSpec,
    build_rayjob,
    submit_rayjob,
    to_yaml,
    validate_rayjob,
)

CRDS = Path(__file__).resolve().parents[3] / "shared" / "k8s" / "crds"
pytestmark = pytest.mark.skipif(
    not (CRDS / "ray.io_rayjobs.yaml").is_file(), reason="KubeRay CRDs not present"
)


def make_spec(**overrides: Any) -> RayJobSpec:
    fields: dict[str, Any] = {
        "kind": "sft",
        "name": "sft-run-1",
        "namespace": "smartpath",
        "image": "registry.local/smartpath:0.1.0",
        "workers": 2,
        "worker": PodResources(cpus="4", memory="16Gi", gpus=0),
        "config_map": "smartpath-config",
        "s3_secret": "smartpath-s3",
        "storage_endpoint": "minio.smartpath.svc:9000",
    }
    fields.update(overrides)
    return RayJobSpec(**fields)


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = obj["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def worker_group(obj: dict[str, Any]) -> dict[str, Any]:
    groups = obj["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert len(groups) == 1
    return groups[0]


@pytest.mark.parametrize("kind", ["sft", "grpo"])
@pytest.mark.parametrize("gpus", [0, 2])
def test_built_rayjob_matches_crd_schema(kind: str, gpus: int) -> None:
    spec = make_spec(kind=kind, name=f"{kind}-g{gpus}", worker=PodResources(gpus=gpus), workers=3)
    obj = build_rayjob(spec)
    validate_rayjob(obj)

    assert obj["apiVersion"] == "ray.io/v1"
    assert obj["kind"] == "RayJob"
    assert obj["metadata"] == {
        "name": f"{kind}-g{gpus}",
        "namespace": "smartpath",
        "labels": obj["metadata"]["labels"],
    }
    assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == f"training-{kind}"
    body = obj["spec"]
    assert body["entrypoint"] == (
        f"python -m smartpath.training.{kind} --config /etc/smartpath/config.yaml"
    )
    assert body["submissionMode"] == "K8sJobMode"
    assert body["shutdownAfterJobFinishes"] is True
    assert body["ttlSecondsAfterFinished"] == 3600
    assert "runtimeEnvYAML" not in body
    group = worker_group(obj)
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (3, 3, 3)
    assert body["rayClusterSpec"]["rayVersion"] == "2.60.0"


def test_gpu_limits_only_when_gpus_requested() -> None:
    cpu = build_rayjob(make_spec(worker=PodResources(cpus="4", memory="16Gi", gpus=0)))
    gpu = build_rayjob(make_spec(worker=PodResources(cpus="8", memory="64Gi", gpus=4)))
    for ctr in containers(cpu):
        assert "nvidia.com/gpu" not in ctr["resources"]["limits"]
        assert "nvidia.com/gpu" not in ctr["resources"]["requests"]

    gpu_worker = worker_group(gpu)["template"]["spec"]["containers"][0]
    assert gpu_worker["resources"]["limits"] == {
        "cpu": "8",
        "memory": "64Gi",
        "nvidia.com/gpu": "4",
    }
    assert gpu_worker["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
    gpu_head = gpu["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in gpu_head["resources"]["limits"]  # head has gpus=0
    assert worker_group(cpu)["groupName"] == "cpu-workers"
    assert worker_group(gpu)["groupName"] == "gpu-workers"
    # Tainted GPU nodes: GPU workers tolerate the taint, CPU pods do not ask to land there.
    assert worker_group(gpu)["template"]["spec"]["tolerations"] == [rayjob.GPU_TOLERATION]
    assert "tolerations" not in worker_group(cpu)["template"]["spec"]
    head = gpu["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert "tolerations" not in head["template"]["spec"]
    # Train workers never land on the head: it offers Ray no CPUs.
    assert head["rayStartParams"] == {"num-cpus": "0"}


def test_one_rayjob_name_per_run() -> None:
    assert rayjob.job_name("smartpath", "sft", "run_1.b") == "smartpath-sft-run-1-b"
    long = rayjob.job_name("pathology-prod-eu-west-1-smartpath", "grpo", "nightly-2026.12.07")
    assert len(long) <= rayjob.RAYJOB_NAME_MAX and long.startswith("pathology-prod-eu-west-1")
    other = rayjob.job_name("pathology-prod-eu-west-1-smartpath", "grpo", "nightly-2026.12.08")
    assert other != long  # the hash keeps cut names of different runs apart
    validate_rayjob(build_rayjob(make_spec(name=long)))


def test_env_secret_refs_and_config_mount_on_every_container() -> None:
    obj = build_rayjob(make_spec(s3_access_key_key="ak", s3_secret_key_key="sk"))
    ctrs = containers(obj)
    assert [c["name"] for c in ctrs] == ["ray-head", "ray-worker"]
    for ctr in ctrs:
        env = {e["name"]: e for e in ctr["env"]}
        assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0"
        assert env["SMARTPATH_STORAGE__ENDPOINT"]["value"] == "minio.smartpath.svc:9000"
        assert env["SMARTPATH_STORAGE__ACCESS_KEY"] == {
            "name": "SMARTPATH_STORAGE__ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": "smartpath-s3", "key": "ak"}},
        }
        assert env["SMARTPATH_STORAGE__SECRET_KEY"] == {
            "name": "SMARTPATH_STORAGE__SECRET_KEY",
            "valueFrom": {"secretKeyRef": {"name": "smartpath-s3", "key": "sk"}},
        }
        # Credentials are never inlined as plain values.
        assert "value" not in env["SMARTPATH_STORAGE__ACCESS_KEY"]
        mounts = {m["name"]: m for m in ctr["volumeMounts"]}
        assert mounts["smartpath-config"]["mountPath"] == "/etc/smartpath"
    pod = worker_group(obj)["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["smartpath-config"]["configMap"]["name"] == "smartpath-config"
    assert volumes["smartpath-config"]["configMap"]["items"] == [
        {"key": "config.yaml", "path": "config.yaml"}
    ]


def test_env_names_map_onto_the_config_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The env the pods get is what load_config reads back as storage settings."""
    obj = build_rayjob(make_spec(storage_secure=True))
    env = containers(obj)[0]["env"]
    for item in env:
        if "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
        else:  # what the kubelet would resolve from the Secret
            monkeypatch.setenv(item["name"], f"resolved-{item['valueFrom']['secretKeyRef']['key']}")
    cfg = SmartPathConfig()
    assert cfg.storage.endpoint == "minio.smartpath.svc:9000"
    assert cfg.storage.secure is True
    assert cfg.storage.access_key is not None
    assert cfg.storage.access_key.get_secret_value() == "resolved-access-key"
    assert cfg.storage.secret_key is not None
    assert cfg.storage.secret_key.get_secret_value() == "resolved-secret-key"


def test_from_config_takes_the_storage_endpoint() -> None:
    cfg = SmartPathConfig(storage={"endpoint": "s3.example:443", "secure": True})
    spec = RayJobSpec.from_config(
        cfg, kind="grpo", name="rl", image="img:1", config_map="c", s3_secret="s"
    )
    assert (spec.storage_endpoint, spec.storage_secure) == ("s3.example:443", True)
    with pytest.raises(ValueError, match=r"storage\.endpoint"):
        RayJobSpec.from_config(
            SmartPathConfig(), kind="sft", name="x", image="i", config_map="c", s3_secret="s"
        )


def test_long_names_are_cut_and_stay_distinct() -> None:
    a = make_spec(name="sft-" + "a" * 100)
    b = make_spec(name="sft-" + "a" * 99 + "b")
    assert len(a.name) <= 63
    assert len(a.name) == rayjob.RAYJOB_NAME_MAX  # KubeRay's own RayJob limit (47)
    assert a.name.startswith("sft-aaaa")
    assert a.name != b.name
    assert make_spec(name="sft-" + "a" * 100).name == a.name  # deterministic
    obj = build_rayjob(a)
    validate_rayjob(obj)
    assert obj["metadata"]["name"] == a.name
    assert all(len(v) <= 63 for v in obj["metadata"]["labels"].values())
    assert make_spec(name="short").name == "short"  # short names untouched
    assert rayjob.cut_name("x" * 47) == "x" * 47


def test_bad_names_and_quantities_are_refused() -> None:
    with pytest.raises(ValidationError, match="DNS-1035"):
        make_spec(name="SFT_Run")
    with pytest.raises(ValidationError, match="DNS-1035"):
        make_spec(name="1run")
    # References to existing objects are refused, never cut (a cut name would point elsewhere).
    with pytest.raises(ValidationError, match="not a valid Kubernetes object name"):
        make_spec(config_map="Bad_Name")
    with pytest.raises(ValidationError, match="quantity"):
        PodResources(memory="16 GB")
    with pytest.raises(ValidationError):
        PodResources(gpus=-1)
    with pytest.raises(ValidationError):
        make_spec(workers=0)
    assert PodResources(cpus=0.5).cpus == "0.5"
    assert PodResources(cpus=4).cpus == "4"


def test_runtime_env_and_deadline() -> None:
    obj = build_rayjob(
        make_spec(runtime_env={"env_vars": {"NCCL_DEBUG": "WARN"}}, active_deadline_seconds=7200)
    )
    validate_rayjob(obj)
    assert yaml.safe_load(obj["spec"]["runtimeEnvYAML"]) == {"env_vars": {"NCCL_DEBUG": "WARN"}}
    assert obj["spec"]["activeDeadlineSeconds"] == 7200


def _broken(mutate: Any) -> dict[str, Any]:
    obj = build_rayjob(make_spec())
    mutate(obj)
    return obj


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (
            lambda o: worker_group(o).__setitem__("replicas", "2"),
            r"spec\.rayClusterSpec\.workerGroupSpecs\[0\]\.replicas",
        ),
        (
            lambda o: worker_group(o)["template"]["spec"]["containers"][0].pop("name"),
            r"spec\.rayClusterSpec\.workerGroupSpecs\[0\]\.template\.spec\.containers\[0\]",
        ),
        (
            lambda o: worker_group(o).pop("groupName"),
            r"spec\.rayClusterSpec\.workerGroupSpecs\[0\]",
        ),
        (
            lambda o: o["spec"]["rayClusterSpec"].pop("headGroupSpec"),
            r"spec\.rayClusterSpec",
        ),
        (  # int-or-string: a float is neither
            lambda o: worker_group(o)["template"]["spec"]["containers"][0]["resources"][
                "limits"
            ].__setitem__("cpu", 0.5),
            r"spec\.rayClusterSpec\.workerGroupSpecs\[0\]\.template\.spec\.containers\[0\]"
            r"\.resources\.limits\.cpu",
        ),
        (  # int-or-string: a string must still be a quantity
            lambda o: worker_group(o)["template"]["spec"]["containers"][0]["resources"][
                "limits"
            ].__setitem__("memory", "lots"),
            r"spec\.rayClusterSpec\.workerGroupSpecs\[0\]\.template\.spec\.containers\[0\]"
            r"\.resources\.limits\.memory",
        ),
        (  # format: int32
            lambda o: o["spec"].__setitem__("ttlSecondsAfterFinished", 2**31),
            r"spec\.ttlSecondsAfterFinished",
        ),
        (
            lambda o: o["spec"].__setitem__("shutdownAfterJobFinishes", "yes"),
            r"spec\.shutdownAfterJobFinishes",
        ),
        (lambda o: o["metadata"].__setitem__("name", "n" * 48), r"metadata\.name"),
        (lambda o: o.__setitem__("apiVersion", "ray.io/v1alpha2"), r"apiVersion"),
    ],
)
def test_broken_rayjob_is_rejected_with_path(mutate: Any, path: str) -> None:
    with pytest.raises(ValueError, match=rf"^{path}"):
        validate_rayjob(_broken(mutate))


def test_int_or_string_accepts_both_forms() -> None:
    obj = build_rayjob(make_spec())
    limits = worker_group(obj)["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["cpu"] = 4  # an integer is a valid quantity too
    limits["memory"] = "17179869184"
    validate_rayjob(obj)


def test_crd_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    obj = build_rayjob(make_spec())
    monkeypatch.setenv("SMARTPATH_CRDS_DIR", str(tmp_path))
    assert rayjob.crds_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="SMARTPATH_CRDS_DIR"):
        validate_rayjob(obj)
    # A copy of the real CRD there is used.
    (tmp_path / "ray.io_rayjobs.yaml").write_text((CRDS / "ray.io_rayjobs.yaml").read_text())
    validate_rayjob(obj)


def test_openapi_conversion_drops_kubernetes_keys_and_maps_nullable() -> None:
    schema = {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "a": {"type": "string", "nullable": True},
            "b": {"x-kubernetes-int-or-string": True},
        },
    }
    assert rayjob._to_json_schema(schema) == {
        "type": "object",
        "properties": {
            "a": {"type": ["string", "null"]},
            "b": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        },
    }


def test_yaml_round_trip() -> None:
    obj = build_rayjob(make_spec(kind="grpo", worker=PodResources(gpus=1)))
    text = to_yaml(obj)
    assert text.startswith("apiVersion: ray.io/v1\nkind: RayJob\n")
    back = yaml.safe_load(text)
    assert back == obj
    validate_rayjob(back)
    # Quantities stay strings through YAML ('2' would otherwise come back as an int 2).
    limits = worker_group(back)["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


class FakeCustomObjectsApi:
    """Stands in for kubernetes.client.CustomObjectsApi (no API server can run here)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.error = error

    def create_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, body: Any, **kwargs: Any
    ) -> Any:
        self.calls.append(
            {"group": group, "version": version, "namespace": namespace, "plural": plural,
             "body": copy.deepcopy(body), **kwargs}
        )  # fmt: skip
        if self.error is not None:
            raise self.error
        return {**body, "metadata": {**body["metadata"], "uid": "1234"}}


def test_submit_sends_the_validated_body() -> None:
    obj = build_rayjob(make_spec(kind="grpo", worker=PodResources(gpus=1)))
    before = copy.deepcopy(obj)
    api = FakeCustomObjectsApi()
    created = submit_rayjob(obj, "smartpath", api=api)
    assert len(api.calls) == 1
    call = api.calls[0]
    assert (call["group"], call["version"], call["plural"], call["namespace"]) == (
        "ray.io",
        "v1",
        "rayjobs",
        "smartpath",
    )
    assert call["field_validation"] == "Strict"
    assert call["body"] == before
    validate_rayjob(call["body"])
    assert created["metadata"]["uid"] == "1234"
    assert obj == before  # caller's dict untouched


def test_submit_sets_namespace_and_refuses_mismatch() -> None:
    obj = build_rayjob(make_spec())
    del obj["metadata"]["namespace"]
    api = FakeCustomObjectsApi()
    submit_rayjob(obj, "team-a", api=api)
    assert api.calls[0]["body"]["metadata"]["namespace"] == "team-a"
    assert api.calls[0]["namespace"] == "team-a"

    with pytest.raises(ValueError, match="differs"):
        submit_rayjob(build_rayjob(make_spec(namespace="x")), "y", api=api)
    assert len(api.calls) == 1


def test_submit_refuses_invalid_body_before_calling_api() -> None:
    obj = build_rayjob(make_spec())
    worker_group(obj)["replicas"] = "2"
    api = FakeCustomObjectsApi()
    with pytest.raises(ValueError, match=r"workerGroupSpecs\[0\]\.replicas"):
        submit_rayjob(obj, "smartpath", api=api)
    assert api.calls == []


def test_submit_conflict_is_a_clear_error() -> None:
    class Conflict(Exception):
        status = 409

    api = FakeCustomObjectsApi(error=Conflict("AlreadyExists"))
    with pytest.raises(RuntimeError, match="smartpath/sft-run-1 already exists"):
        submit_rayjob(build_rayjob(make_spec()), "smartpath", api=api)

    api = FakeCustomObjectsApi(error=KeyError("other"))
    with pytest.raises(KeyError):
        submit_rayjob(build_rayjob(make_spec()), "smartpath", api=api)


def test_submit_without_kubernetes_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match=r"pip install kubernetes==37\.0\.2"):
        submit_rayjob(build_rayjob(make_spec()), "smartpath")


def test_submit_without_kubeconfig(monkeypatch: pytest.MonkeyPatch) -> None:
    class ConfigException(Exception):
        pass

    def no_config(**_: Any) -> None:
        raise ConfigException("Invalid kube-config file. No configuration found.")

    config = types.SimpleNamespace(load_kube_config=no_config, load_incluster_config=no_config)
    client = types.SimpleNamespace(CustomObjectsApi=lambda: pytest.fail("no API without config"))
    fake = types.ModuleType("kubernetes")
    fake.config = config  # type: ignore[attr-defined]
    fake.client = client  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kubernetes", fake)
    with pytest.raises(RuntimeError, match="no Kubernetes credentials"):
        submit_rayjob(build_rayjob(make_spec()), "smartpath")
    with pytest.raises(RuntimeError, match="cannot load kube context 'prod'"):
        submit_rayjob(build_rayjob(make_spec()), "smartpath", kube_context="prod")
