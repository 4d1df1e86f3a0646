"""Offline checks of the chart's network surface (charts/smartpath): the Gateway API GRPCRoute and
Gateway, the egress NetworkPolicies for default-deny clusters, and the API-server sources of a
KubeRay operator run with ``--use-kubernetes-proxy``.

Rendering, the pinned helm and the ingress simulator come from ``test_chart``. GRPCRoute and
Gateway have no CRD in ``../shared/k8s/crds``; they are validated against strict hand-written
schemas (``tests/deploy/schemas``, from Gateway API v1.6.1) plus the CRDs' CEL rules written out
below. NetworkPolicies are checked by simulation: ``allowed`` decides one direction (ingress or
egress, ipBlocks included) and ``connects`` both ends of a connection.
"""

# The fixtures imported from test_chart (helm, variant, objects) are parameters of the tests here.
# ruff: noqa: F811

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_chart import (  # noqa: F401  (helm, variant, objects: pytest fixtures)
    _DNS1123_LABEL,
    CHART,
    OPERATOR_LABELS,
    OPERATOR_NAMESPACE,
    OWN_NAMESPACE,
    SCHEMA_KINDS,
    SCHEMAS,
    _public_and_internal_services,
    _selects,
    admitted,
    helm,
    objects,
    of_kind,
    open_objects,
    pod_labels,
    render,
    render_fails,
    schema_validator,
    variant,
)

GATEWAY_KINDS = {k: SCHEMA_KINDS[k] for k in ("GRPCRoute", "Gateway")}
GATEWAY_VALUES = CHART / "ci" / "gateway-values.yaml"
HEALTH = "grpc.health.v1.Health"
REFLECTION = ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]

# The Gateway data plane of ci/gateway-values.yaml's networkPolicy.gatewayFrom (Envoy Gateway).
ENVOY_NAMESPACE = {"kubernetes.io/metadata.name": "envoy-gateway-system"}
ENVOY_LABELS = {
    "app.kubernetes.io/name": "envoy",
    "gateway.envoyproxy.io/owning-gateway-name": "shared-gateway",
}
ENVOY_FROM = (
    "networkPolicy.gatewayFrom[0].namespaceSelector.matchLabels"
    ".kubernetes\\.io/metadata\\.name=envoy-gateway-system"
)
# A GRPCRoute on an existing Gateway, admitted through the NetworkPolicy.
ON_SHARED_GATEWAY = (
    "--set",
    "gateway.enabled=true,gateway.parentRefs[0].name=shared,gateway.parentRefs[0].namespace=infra",
    "--set",
    ENVOY_FROM,
)
API_SERVER_IP = "10.0.0.10"  # ci/gateway-values.yaml: networkPolicy.egress.apiServer / viaApiServer
KUBE_DNS = {"k8s-app": "kube-dns"}
KUBE_SYSTEM = {"kubernetes.io/metadata.name": "kube-system"}
COMPONENT = "app.kubernetes.io/component"
NODE_TYPE = "ray.io/node-type"  # KubeRay's label on Ray pods: head or worker


# ---- Gateway API objects against their schemas and CEL rules ------------------------------------


def _parent_key(ref: dict[str, Any]) -> tuple[str, str, str, str]:
    return (
        ref.get("group", "gateway.networking.k8s.io"),
        ref.get("kind", "Gateway"),
        ref.get("namespace", ""),
        ref["name"],
    )


def cel_errors(obj: dict[str, Any]) -> list[str]:
    """The CRDs' x-kubernetes-validations rules on the fields the chart renders, which JSON
    Schema cannot say (Gateway API v1.6.1)."""
    errors = []
    spec = obj["spec"]
    if obj["kind"] == "GRPCRoute":
        refs = spec.get("parentRefs", [])
        for a in refs:
            same = [b for b in refs if _parent_key(a) == _parent_key(b)]
            if len({bool(b.get("sectionName")) for b in same}) > 1:
                errors.append("sectionName must be specified when parentRefs includes 2 or more")
            if sum(b.get("sectionName", "") == a.get("sectionName", "") for b in same) != 1:
                errors.append("sectionName must be unique when parentRefs includes 2 or more")
        if sum(len(rule.get("matches", [])) for rule in spec.get("rules", [])) > 128:
            errors.append("the total number of matches across all rules must be at most 128")
    elif obj["kind"] == "Gateway":
        listeners = spec["listeners"]
        names = [listener["name"] for listener in listeners]
        if len(names) != len(set(names)):
            errors.append("Listener name must be unique within the Gateway")
        combos = [(ln["port"], ln["protocol"], ln.get("hostname")) for ln in listeners]
        if len(combos) != len(set(combos)):
            errors.append("Combination of port, protocol and hostname must be unique")
        for listener in listeners:
            tls = listener.get("tls")
            if listener["protocol"] in ("HTTP", "TCP", "UDP") and tls is not None:
                errors.append(f"{listener['name']}: tls must not be specified")
            if (
                listener["protocol"] == "HTTPS"
                and tls
                and tls.get("mode", "")
                not in (
                    "",
                    "Terminate",
                )
            ):
                errors.append(f"{listener['name']}: tls mode must be Terminate for HTTPS")
            if tls and tls.get("mode", "Terminate") == "Terminate" and not tls["certificateRefs"]:
                errors.append(f"{listener['name']}: certificateRefs must be specified")
    return errors


def schema_errors(obj: dict[str, Any]) -> list[str]:
    errors = sorted(schema_validator(obj["kind"]).iter_errors(obj), key=lambda e: e.path)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors] + cel_errors(obj)


def test_should_render_gateway_api_objects_valid_for_their_schemas(
    objects: list[dict[str, Any]],
) -> None:
    for obj in objects:
        if obj["kind"] not in GATEWAY_KINDS:
            continue
        assert obj["apiVersion"] == GATEWAY_KINDS[obj["kind"]][1], obj["apiVersion"]
        errors = schema_errors(obj)
        assert not errors, f"{obj['kind']}/{obj['metadata']['name']}: " + "; ".join(errors[:5])


def test_should_render_both_gateway_api_kinds_in_a_ci_variant(helm: Path) -> None:
    """So that the per-variant validation above sees each of them."""
    kinds = {o["kind"] for o in render(helm, "-f", str(GATEWAY_VALUES))}
    assert set(GATEWAY_KINDS) <= kinds


@pytest.mark.parametrize("kind", sorted(GATEWAY_KINDS))
def test_should_keep_the_hand_written_schemas_strict(kind: str) -> None:
    schema = json.loads((SCHEMAS / GATEWAY_KINDS[kind][0]).read_text())
    assert "Gateway API v1.6.1" in schema["$comment"]
    # Only the if/then clauses (CEL rules spelt in JSON Schema) may leave objects open.
    assert [w for w in open_objects(schema) if ".if" not in w and not w.endswith(".then")] == []


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        (("spec", "rules", 0, "matches", 0, "method", "type"), "Prefix", "is not one of"),
        (("spec", "rules", 0, "matches", 0, "method", "service"), "smartpath/v1", "does not match"),
        (("spec", "rules", 0, "matches", 0, "method", "servce"), "x", "Additional properties"),
        (("spec", "rules", 0, "backendRefs", 0, "port"), 70000, "is greater than"),
        (("spec", "hostnames", 0), "Smartpath.example.org", "does not match"),
        (("spec", "hostnames", 0), "smartpath.example.org.", "does not match"),
        (("spec", "parentRefs", 0, "namespace"), "Infra", "does not match"),
        (("spec", "parentRefs", 0, "sectionName"), "https_1", "does not match"),
    ],
)
def test_should_refuse_what_the_grpcroute_crd_refuses(
    helm: Path, path: tuple[Any, ...], value: Any, error: str
) -> None:
    (route,) = of_kind(
        render(helm, *ON_SHARED_GATEWAY, "--set", "gateway.hostnames={a.example.org}"),
        "GRPCRoute",
    )
    assert schema_errors(route) == []
    node = route
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert any(error in e for e in schema_errors(route)), schema_errors(route)


def test_should_refuse_what_the_crds_cel_rules_refuse(helm: Path) -> None:
    (route,) = of_kind(render(helm, *ON_SHARED_GATEWAY), "GRPCRoute")
    # A Service backend needs a port.
    del route["spec"]["rules"][0]["backendRefs"][0]["port"]
    assert any("'port' is a required property" in e for e in schema_errors(route))
    # Two refs to one Gateway: both with distinct sectionNames, or neither.
    refs = route["spec"]["parentRefs"]
    refs.append({**refs[0], "sectionName": "https"})
    assert any("sectionName must be specified" in e for e in cel_errors(route))
    refs[0]["sectionName"] = "https"
    assert any("sectionName must be unique" in e for e in cel_errors(route))
    refs[0]["sectionName"] = "https-1"
    assert cel_errors(route) == []
    # A Gateway's HTTPS listeners: certificates, distinct names and port/protocol/hostname.
    (gateway,) = of_kind(render(helm, "-f", str(GATEWAY_VALUES)), "Gateway")
    assert cel_errors(gateway) == []
    listeners = gateway["spec"]["listeners"]
    listeners[0]["tls"]["certificateRefs"] = []
    listeners[1]["name"] = "https"
    listeners[1]["hostname"] = listeners[0]["hostname"]
    errors = " | ".join(cel_errors(gateway))
    for rule in ("certificateRefs must", "Listener name must", "Combination of port, protocol"):
        assert rule in errors, errors


# ---- the GRPCRoute ------------------------------------------------------------------------------


def route_services(objs: list[dict[str, Any]]) -> list[str]:
    """The gRPC services the one GRPCRoute matches, checking its one rule's shape: exact service
    matches only, to the serve Service's gRPC port."""
    (route,) = of_kind(objs, "GRPCRoute")
    (rayservice,) = of_kind(objs, "RayService")
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [
        {
            "group": "",
            "kind": "Service",
            "name": f"{rayservice['metadata']['name']}-serve-svc",  # KubeRay's serve Service
            "port": 9000,
        }
    ]
    services = []
    for match in rule["matches"]:
        assert set(match) == {"method"}, match
        assert set(match["method"]) == {"type", "service"}, match  # every method of the service
        assert match["method"]["type"] == "Exact"
        services.append(match["method"]["service"])
    return services


def ingress_services(objs: list[dict[str, Any]]) -> list[str]:
    (ingress,) = of_kind(objs, "Ingress")
    return [
        path["path"].strip("/")
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]


@pytest.mark.parametrize(
    ("settings", "extra"),
    [
        ((), []),
        (("exposeInternalServices={smartpath.v1.Decoder,smartpath.v1.SlideTiler}",), "internal"),
        (("exposeReflection=true",), REFLECTION),
    ],
)
def test_should_route_the_services_the_ingress_routes(
    helm: Path, settings: tuple[str, ...], extra: Any
) -> None:
    public, _ = _public_and_internal_services()
    sets = [a for s in settings for key in ("ingress", "gateway") for a in ("--set", f"{key}.{s}")]
    objs = render(helm, *ON_SHARED_GATEWAY, "--set", "ingress.enabled=true", *sets)
    if extra == "internal":
        extra = ["smartpath.v1.Decoder", "smartpath.v1.SlideTiler"]
    assert route_services(objs) == [public, HEALTH, *extra]
    assert route_services(objs) == ingress_services(objs)  # one definition for both
    # Each front end follows its own values.
    objs = render(helm, *ON_SHARED_GATEWAY, "--set", "ingress.enabled=true", *sets[:2])
    assert route_services(objs) == [public, HEALTH]
    # The serve Service's port follows service.port.
    (route,) = of_kind(render(helm, *ON_SHARED_GATEWAY, "--set", "service.port=9443"), "GRPCRoute")
    assert route["spec"]["rules"][0]["backendRefs"][0]["port"] == 9443


def test_should_offer_the_gateway_the_ingress_choice_of_internal_services() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]
    offered = schema["gateway"]["properties"]["exposeInternalServices"]["items"]["enum"]
    assert offered == schema["ingress"]["properties"]["exposeInternalServices"]["items"]["enum"]
    assert offered == _public_and_internal_services()[1]
    values = yaml.safe_load((CHART / "values.yaml").read_text())["gateway"]
    assert values["enabled"] is False and values["create"]["enabled"] is False
    assert values["exposeInternalServices"] == [] and values["exposeReflection"] is False


@pytest.mark.parametrize("name", ["smartpath.v1.Pathology", "smartpath.v1.Tiler", HEALTH])
def test_should_refuse_unknown_services_for_the_gateway(helm: Path, name: str) -> None:
    setting = f"gateway.exposeInternalServices={{{name}}}"
    assert "exposeInternalServices" in render_fails(helm, *ON_SHARED_GATEWAY, "--set", setting)
    error = render_fails(helm, "--skip-schema-validation", *ON_SHARED_GATEWAY, "--set", setting)
    assert f'gateway.exposeInternalServices: "{name}" is not an internal SmartPath gRPC' in error


def test_should_attach_the_route_to_the_listeners_it_names(helm: Path) -> None:
    objs = render(
        helm,
        *ON_SHARED_GATEWAY,
        "--set",
        "gateway.parentRefs[0].sectionName=https-pathology",
        "--set",
        "gateway.hostnames={smartpath.example.org}",
    )
    (route,) = of_kind(objs, "GRPCRoute")
    assert route["spec"]["parentRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": "shared",
            "namespace": "infra",
            "sectionName": "https-pathology",
        }
    ]
    assert route["spec"]["hostnames"] == ["smartpath.example.org"]
    assert not of_kind(objs, "Gateway")  # the platform's Gateway, not one of ours
    # No hostnames: every host name of the listener.
    (route,) = of_kind(render(helm, *ON_SHARED_GATEWAY), "GRPCRoute")
    assert "hostnames" not in route["spec"]


def test_should_render_a_gateway_of_its_own_on_request(helm: Path) -> None:
    objs = render(helm, "-f", str(GATEWAY_VALUES))
    (gateway,) = of_kind(objs, "Gateway")
    (route,) = of_kind(objs, "GRPCRoute")
    assert gateway["spec"]["gatewayClassName"] == "eg"
    assert gateway["metadata"]["annotations"] == {"cert-manager.io/cluster-issuer": "letsencrypt"}
    hostnames = ["smartpath.example.org", "*.pathology.example.org"]
    listeners = gateway["spec"]["listeners"]
    assert [(ln["name"], ln.get("hostname")) for ln in listeners] == list(
        zip(["https", "https-1"], hostnames, strict=True)
    )
    for listener in listeners:
        assert (listener["protocol"], listener["port"]) == ("HTTPS", 443)
        assert listener["tls"] == {
            "mode": "Terminate",
            "certificateRefs": [{"group": "", "kind": "Secret", "name": "smartpath-gateway-tls"}],
        }
        assert listener["allowedRoutes"] == {
            "namespaces": {"from": "Same"},
            "kinds": [{"group": "gateway.networking.k8s.io", "kind": "GRPCRoute"}],
        }
    # The chart's route attaches to it (same namespace, every listener) and to the shared one.
    assert route["spec"]["parentRefs"][0] == {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": gateway["metadata"]["name"],
    }
    assert [r["name"] for r in route["spec"]["parentRefs"]] == [
        gateway["metadata"]["name"],
        "shared-gateway",
    ]
    assert route["spec"]["hostnames"] == hostnames
    # Without a shared Gateway or host names: the route on ours alone, one listener for any host.
    objs = render(
        helm,
        "--set",
        "gateway.enabled=true,gateway.create.enabled=true,gateway.create.gatewayClassName=istio",
        "--set",
        ENVOY_FROM,
    )
    (gateway,) = of_kind(objs, "Gateway")
    (route,) = of_kind(objs, "GRPCRoute")
    ((listener),) = gateway["spec"]["listeners"]
    assert listener["name"] == "https" and "hostname" not in listener
    assert listener["tls"]["certificateRefs"][0]["name"] == "smartpath-tls"
    assert [r["name"] for r in route["spec"]["parentRefs"]] == [gateway["metadata"]["name"]]
    # Nothing of this without gateway.enabled.
    objs = render(helm, "--set", "gateway.create.enabled=true,gateway.create.gatewayClassName=x")
    assert not of_kind(objs, "Gateway") and not of_kind(objs, "GRPCRoute")


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        (("gateway.enabled=true", ENVOY_FROM), "gateway.enabled needs a Gateway to attach"),
        (("gateway.enabled=true,gateway.parentRefs[0].name=gw",), "networkPolicy.gatewayFrom"),
        (
            ("gateway.enabled=true,gateway.create.enabled=true", ENVOY_FROM),
            "gateway.create.gatewayClassName",
        ),
        (
            (
                "gateway.enabled=true,gateway.create.enabled=true",
                "gateway.create.gatewayClassName=eg,gateway.create.tlsSecretName=",
                ENVOY_FROM,
            ),
            "gateway.create.tlsSecretName",
        ),
        (("gateway.enabled=true", "gateway.hostnames={Smartpath.Example.org}"), "hostnames"),
        (("gateway.parentRefs[0].nam=gw",), "additional properties 'nam'"),
    ],
)
def test_should_refuse_incomplete_gateway_values(
    helm: Path, settings: tuple[str, ...], error: str
) -> None:
    assert error in render_fails(helm, *[a for s in settings for a in ("--set", s)])


def test_should_need_no_gateway_peers_without_network_policies(helm: Path) -> None:
    objs = render(
        helm,
        "--set",
        "gateway.enabled=true,gateway.parentRefs[0].name=gw,networkPolicy.enabled=false",
    )
    assert of_kind(objs, "GRPCRoute") and not of_kind(objs, "NetworkPolicy")


def test_should_admit_the_gateway_data_plane_to_the_grpc_port_only(helm: Path) -> None:
    for objs, gateway_on in (
        (render(helm, "-f", str(GATEWAY_VALUES)), True),
        (render(helm, "--set", ENVOY_FROM), False),  # the peers alone admit nothing
    ):
        policies = of_kind(objs, "NetworkPolicy")
        for where, labels in ray_pods(objs).items():
            serving = labels["app.kubernetes.io/component"] == "serving"
            for port, expected in ((9000, gateway_on and serving), (8265, False), (6379, False)):
                assert (
                    admitted(policies, labels, ENVOY_LABELS, port, ENVOY_NAMESPACE) == expected
                ), f"gateway -> {where}:{port}"
            # Other pods of the gateway's namespace are not the gateway's data plane.
            assert not admitted(policies, labels, {"app": "other"}, 9000, ENVOY_NAMESPACE)


# ---- NetworkPolicy simulation, both directions ----------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One end of a connection: a pod (labels, and its namespace's labels) or an address."""

    labels: dict[str, str] | None = None
    namespace: dict[str, str] = field(default_factory=lambda: OWN_NAMESPACE)
    ip: str | None = None

    @property
    def in_release_namespace(self) -> bool:
        return self.labels is not None and self.namespace == OWN_NAMESPACE


def _peer_matches(peer: dict[str, Any], end: Endpoint) -> bool:
    if "ipBlock" in peer:  # pods are not given addresses here: ipBlocks stand for outside ones
        if end.ip is None:
            return False
        address = ipaddress.ip_address(end.ip)
        block = peer["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if end.labels is None:
        return False
    if "namespaceSelector" in peer:
        in_namespace = _selects(peer["namespaceSelector"], end.namespace)
    else:
        in_namespace = end.namespace == OWN_NAMESPACE
    return in_namespace and _selects(peer.get("podSelector"), end.labels)


def _port_matches(rule: dict[str, Any], port: int, protocol: str) -> bool:
    if not rule.get("ports"):  # missing or empty: every port
        return True
    return any(
        p.get("protocol", "TCP") == protocol and p.get("port", port) == port for p in rule["ports"]
    )


def allowed(
    policies: list[dict[str, Any]],
    direction: str,
    pod: dict[str, str],
    peer: Endpoint,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Whether the policies let a pod of the release namespace (labels `pod`) accept from
    (direction "Ingress") or open to (direction "Egress") `peer` a connection on `port`: a pod
    no policy selects for that direction is unrestricted; otherwise some rule of a selecting
    policy must allow it."""
    rules_key, peers_key = {"Ingress": ("ingress", "from"), "Egress": ("egress", "to")}[direction]
    selecting = [
        p
        for p in policies
        if direction in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod)
    ]
    if not selecting:
        return True
    return any(
        _port_matches(rule, port, protocol)
        and (not rule.get(peers_key) or any(_peer_matches(x, peer) for x in rule[peers_key]))
        for policy in selecting
        for rule in policy["spec"].get(rules_key, [])
    )


def connects(
    policies: list[dict[str, Any]],
    source: dict[str, str],
    target: Endpoint,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """A pod of the release namespace opens a connection: its egress must allow it and, when the
    target is a pod of the release namespace too, the target's ingress."""
    if not allowed(policies, "Egress", source, target, port, protocol):
        return False
    if target.in_release_namespace:
        assert target.labels is not None
        return allowed(policies, "Ingress", target.labels, Endpoint(source), port, protocol)
    return True


def release_pods(objs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """pod_labels, plus the ray.io/node-type label KubeRay puts on the Ray pods."""
    pods = {}
    for where, labels in pod_labels(objs).items():
        labels = dict(labels)
        if labels.get("smartpath.io/ray") == "true":
            labels[NODE_TYPE] = "head" if where.endswith(" head") else "worker"
        pods[where] = labels
    return pods


def ray_pods(objs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {
        w: labels
        for w, labels in release_pods(objs).items()
        if labels.get("smartpath.io/ray") == "true"
    }


def test_should_simulate_ingress_as_admitted_does(helm: Path) -> None:
    """The two simulators agree on pod sources (admitted ignores ipBlocks)."""
    objs = render(helm, "-f", str(GATEWAY_VALUES))
    policies = of_kind(objs, "NetworkPolicy")
    pods = release_pods(objs)
    sources = [(labels, OWN_NAMESPACE) for labels in pods.values()]
    sources += [(OPERATOR_LABELS, OPERATOR_NAMESPACE), (ENVOY_LABELS, ENVOY_NAMESPACE)]
    for target in pods.values():
        for source, namespace in sources:
            for port in (9000, 8265, 8000, 6379):
                assert allowed(
                    policies, "Ingress", target, Endpoint(source, namespace), port
                ) == admitted(policies, target, source, port, namespace)


# ---- KubeRay through the API server's proxy (useKubernetesProxy) ------------------------------


def test_should_admit_the_api_server_where_the_operator_is_admitted(helm: Path) -> None:
    api_server, elsewhere = Endpoint(ip=API_SERVER_IP), Endpoint(ip="10.0.0.11")
    for objs, via_proxy in (
        (render(helm, "-f", str(GATEWAY_VALUES)), True),
        (render(helm, "-f", str(CHART / "ci" / "training-values.yaml")), False),
    ):
        policies = of_kind(objs, "NetworkPolicy")
        pods = ray_pods(objs)
        assert {labels["app.kubernetes.io/component"] for labels in pods.values()} == {
            "serving",
            "training-sft",
            "training-grpo",
        }
        for where, labels in pods.items():
            serving = labels["app.kubernetes.io/component"] == "serving"
            operator_ports = {8265, 8000} if serving else {8265}
            for port in (8265, 8000, 9000, 6379, 10001, 8080):
                assert allowed(policies, "Ingress", labels, api_server, port) == (
                    via_proxy and port in operator_ports
                ), f"API server -> {where}:{port}"
                assert not allowed(policies, "Ingress", labels, elsewhere, port)


def test_should_take_any_peers_as_api_server_sources(helm: Path) -> None:
    """Konnectivity: the proxied calls come from the agents' pods in kube-system."""
    objs = render(
        helm,
        "--set",
        "networkPolicy.kuberayOperator.viaApiServer[0].namespaceSelector.matchLabels"
        ".kubernetes\\.io/metadata\\.name=kube-system",
        "--set",
        "networkPolicy.kuberayOperator.viaApiServer[0].podSelector.matchLabels"
        ".k8s-app=konnectivity-agent",
    )
    policies = of_kind(objs, "NetworkPolicy")
    agent = Endpoint({"k8s-app": "konnectivity-agent"}, KUBE_SYSTEM)
    for labels in ray_pods(objs).values():
        assert allowed(policies, "Ingress", labels, agent, 8265)
        assert not allowed(policies, "Ingress", labels, agent, 6379)


# ---- egress for default-deny clusters ---------------------------------------------------------


def _expected_egress(
    source: dict[str, str], target: dict[str, str], target_where: str, port: int
) -> bool:
    """What each pod of the release must reach, and nothing more."""
    component = source["app.kubernetes.io/component"]
    target_component = target.get("app.kubernetes.io/component")
    target_is_ray = target.get("smartpath.io/ray") == "true"
    if source.get("smartpath.io/ray") == "true":
        same_cluster = target_is_ray and target_component == component
        return same_cluster or (target_component == "minio" and port == 9000)
    if source.get("smartpath.io/ray-submitter") == "true":
        own_head = target_is_ray and target_component == component
        own_head = own_head and target.get(NODE_TYPE) == "head"
        return own_head and port == 8265
    if component == "minio-buckets":
        return target_component == "minio" and port == 9000
    if component == "test":
        return target_is_ray and target_component == "serving" and port == 9000
    raise AssertionError(f"unexpected source pod {source} (-> {target_where})")


def test_should_let_every_pod_reach_what_it_needs_and_nothing_else(helm: Path) -> None:
    objs = render(helm, "-f", str(GATEWAY_VALUES))
    policies = of_kind(objs, "NetworkPolicy")
    pods = release_pods(objs)
    sources = {w: labels for w, labels in pods.items() if labels.get(COMPONENT) != "minio"}
    assert {labels[COMPONENT] for labels in sources.values()} == {
        "serving",
        "training-sft",
        "training-grpo",
        "minio-buckets",
        "test",
    }
    assert any(labels.get("smartpath.io/ray-submitter") for labels in sources.values())
    ports = (9000, 8000, 8265, 6379, 10001, 8080, 52365)
    for source_where, source in sources.items():
        for target_where, target in pods.items():
            for port in ports:
                assert connects(policies, source, Endpoint(target), port) == _expected_egress(
                    source, target, target_where, port
                ), f"{source_where} -> {target_where}:{port}"
        # DNS for everyone; nothing else in kube-system.
        for protocol in ("UDP", "TCP"):
            assert connects(policies, source, Endpoint(KUBE_DNS, KUBE_SYSTEM), 53, protocol)
        assert not connects(policies, source, Endpoint({"k8s-app": "x"}, KUBE_SYSTEM), 53, "UDP")
        assert not connects(policies, source, Endpoint(KUBE_DNS, KUBE_SYSTEM), 443)
        # The API server (ci: 10.0.0.10, port 6443): the RayService's head alone (autoscaler).
        serving_head = source.get(COMPONENT) == "serving" and source.get(NODE_TYPE) == "head"
        api = Endpoint(ip=API_SERVER_IP)
        assert connects(policies, source, api, 6443) == serving_head, source_where
        assert not connects(policies, source, api, 443)  # ports: [6443] in the ci values
        assert not connects(policies, source, Endpoint(ip="10.0.0.11"), 6443)
        # networkPolicy.egress.extra (ci: 10.20.0.0/16:4317) on the Ray pods only.
        is_ray = source.get("smartpath.io/ray") == "true"
        assert connects(policies, source, Endpoint(ip="10.20.3.4"), 4317) == is_ray
        # Nowhere else: not the internet, not pods of other namespaces.
        assert not connects(policies, source, Endpoint(ip="203.0.113.7"), 443)
        other = Endpoint(
            {COMPONENT: source.get(COMPONENT, "")}, {"kubernetes.io/metadata.name": "x"}
        )
        assert not connects(policies, source, other, 9000)


def test_should_open_external_storage_and_the_api_server_to_their_peers(helm: Path) -> None:
    base = ("-f", str(CHART / "ci" / "external-minio-values.yaml"), "--set")
    storage_port = 9000  # externalStorage.endpoint minio.storage.svc.cluster.local:9000
    narrowed = render(
        helm,
        *base,
        "networkPolicy.egress.enabled=true",
        "--set",
        "networkPolicy.externalStorageTo[0].ipBlock.cidr=10.8.0.0/24",
        "--set",
        "networkPolicy.egress.apiServer.to[0].ipBlock.cidr=172.16.0.2/32",
    )
    wide = render(helm, *base, "networkPolicy.egress.enabled=true")  # no peers: any address
    for objs, storage_ips, api_ips in (
        (narrowed, {"10.8.0.5": True, "10.9.0.5": False}, {"172.16.0.2": True, "10.0.0.1": False}),
        (wide, {"10.8.0.5": True, "10.9.0.5": True}, {"172.16.0.2": True, "10.0.0.1": True}),
    ):
        policies = of_kind(objs, "NetworkPolicy")
        for where, labels in ray_pods(objs).items():
            head = labels[NODE_TYPE] == "head"
            for ip, expected in storage_ips.items():
                assert connects(policies, labels, Endpoint(ip=ip), storage_port) == expected
                assert not connects(policies, labels, Endpoint(ip=ip), 5432)
            for ip, expected in api_ips.items():
                for port in (443, 6443):  # the default ports
                    assert connects(policies, labels, Endpoint(ip=ip), port) == (
                        expected and head
                    ), f"{where} -> {ip}:{port}"
        # No MinIO, so no bucket Job and no policy for it.
        assert not [p for p in policies if "minio" in p["metadata"]["name"]]


def test_should_give_the_api_server_to_the_autoscaler_only(helm: Path) -> None:
    objs = render(
        helm,
        "--set",
        "networkPolicy.egress.enabled=true,ray.enableInTreeAutoscaling=false",
    )
    policies = of_kind(objs, "NetworkPolicy")
    for where, labels in ray_pods(objs).items():
        for port in (443, 6443):
            assert not connects(policies, labels, Endpoint(ip="10.0.0.1"), port), where
    (rayservice,) = of_kind(objs, "RayService")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert head["automountServiceAccountToken"] is False  # and the head has no token then


def _without_egress_policies(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        _unrandomised(o)
        for o in objs
        if not (o["kind"] == "NetworkPolicy" and o["spec"]["policyTypes"] == ["Egress"])
    ]


def _unrandomised(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without the credentials the chart generates anew on every render."""
    if obj["kind"] == "Secret":
        return {k: v for k, v in obj.items() if k not in ("data", "stringData")}
    return obj


@pytest.mark.parametrize("values", [None, "gateway-values.yaml", "external-minio-values.yaml"])
def test_should_change_nothing_but_add_egress_policies(helm: Path, values: str | None) -> None:
    args = () if values is None else ("-f", str(CHART / "ci" / values))
    on = render(helm, *args, "--set", "networkPolicy.egress.enabled=true")
    off = render(helm, *args, "--set", "networkPolicy.egress.enabled=false")
    # Policies are additive: the rest stays as it is.
    assert _without_egress_policies(on) == [_unrandomised(o) for o in off]
    added = [o for o in on if _unrandomised(o) not in [_unrandomised(x) for x in off]]
    assert added and all(o["kind"] == "NetworkPolicy" for o in added)
    # Disabled: the only egress rules are the KServe predictor's (always there).
    for obj in of_kind(off, "NetworkPolicy"):
        if "Egress" in obj["spec"]["policyTypes"]:
            assert obj["metadata"]["name"].endswith("-kserve"), obj["metadata"]["name"]
    if values is None:  # the default is off
        assert [_unrandomised(o) for o in off] == [_unrandomised(o) for o in render(helm)]
    # And nothing at all without networkPolicy.enabled.
    objs = render(
        helm, *args, "--set", "networkPolicy.egress.enabled=true,networkPolicy.enabled=false"
    )
    assert not of_kind(objs, "NetworkPolicy")


def test_should_name_the_new_objects_within_kubernetes_limits(helm: Path) -> None:
    release = "pathology-prod-eu-west-1-a-very-long-release-name-x"
    objs = render(helm, "-f", str(GATEWAY_VALUES), release=release)
    new = [o for o in objs if o["kind"] in GATEWAY_KINDS or o["kind"] == "NetworkPolicy"]
    names = [(o["kind"], o["metadata"]["name"]) for o in new]
    assert len(names) == len(set(names)), names
    for kind, name in names:
        assert len(name) <= 63 and _DNS1123_LABEL.match(name), (kind, name)
    (route,) = of_kind(objs, "GRPCRoute")
    (gateway,) = of_kind(objs, "Gateway")
    assert route["spec"]["parentRefs"][0]["name"] == gateway["metadata"]["name"]
