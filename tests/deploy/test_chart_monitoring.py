"""Offline checks of the chart's monitoring (charts/smartpath, ``metrics.*``): the PodMonitor on
every Ray pod, the PrometheusRule alerts and the Grafana dashboard.

Rendering and the pinned helm come from ``test_chart``. PodMonitor and PrometheusRule have no CRD
in ``../shared/k8s/crds``; they are validated against strict hand-written schemas
(``tests/deploy/schemas``, from the Prometheus Operator v0.93.0 CRDs). Every metric the alerts and
the dashboard query must be one the code defines, under the name Ray exports it with
(``exposition_names``: ``ray_`` + the name, counters + ``_total`` unless the name ends with it,
histograms + ``_bucket``/``_sum``/``_count``); the slow test runs ``metrics_probe`` to check that
rule against a real Ray.
"""

# The fixtures imported from test_chart (helm, variant, objects) are parameters of the tests here.
# ruff: noqa: F811

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.test_chart import (  # noqa: F401  (helm, variant, objects: pytest fixtures)
    CHART,
    NAMESPACE,
    RELEASE,
    ROOT,
    SCHEMA_KINDS,
    SCHEMAS,
    _name,
    admitted,
    helm,
    objects,
    of_kind,
    open_objects,
    pod_labels,
    pod_specs,
    render,
    schema_validator,
    variant,
)

MONITORING_KINDS = {k: SCHEMA_KINDS[k] for k in ("PodMonitor", "PrometheusRule")}
MONITORING_VALUES = CHART / "ci" / "monitoring-values.yaml"
TRAINING_VALUES = CHART / "ci" / "training-values.yaml"
ALL_ON = (
    "--set",
    "metrics.podMonitor.enabled=true,metrics.prometheusRule.enabled=true",
    "--set",
    "metrics.dashboard.enabled=true",
)
OPERATOR_VERSION = "v0.93.0"
# Prometheus as kube-prometheus-stack runs it (networkPolicy.prometheus's default selects it).
PROMETHEUS_NAMESPACE = {"kubernetes.io/metadata.name": "monitoring"}
PROMETHEUS_LABELS = {"app.kubernetes.io/name": "prometheus"}
METRICS_PORT = 8080
# The chart's alerts (README lists them with their thresholds).
ALERTS = {
    "SmartPathRpcErrors",
    "SmartPathDecoderQueueFull",
    "SmartPathDecoderQueueSlow",
    "SmartPathReplicaRestarts",
    "SmartPathReplicasUnavailable",
    "SmartPathGrpcLatencyHigh",
}
GRPC_CODES = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
}


def dashboard_of(objs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the dashboard ConfigMap, its parsed dashboard JSON)."""
    (configmap,) = [c for c in of_kind(objs, "ConfigMap") if "smartpath.json" in c.get("data", {})]
    return configmap, json.loads(configmap["data"]["smartpath.json"])


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def rules_of(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (rule,) = of_kind(objs, "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


# ---- schemas -------------------------------------------------------------------------------------


def schema_errors(obj: dict[str, Any]) -> list[str]:
    errors = sorted(schema_validator(obj["kind"]).iter_errors(obj), key=lambda e: e.path)
    found = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    if obj["kind"] == "PrometheusRule":  # the CRD's list-map key
        names = [g["name"] for g in obj["spec"].get("groups", [])]
        if len(names) != len(set(names)):
            found.append(f"spec.groups: duplicate names {names}")
    return found


def test_should_render_monitoring_objects_valid_for_their_schemas(
    objects: list[dict[str, Any]],
) -> None:
    for obj in objects:
        if obj["kind"] not in MONITORING_KINDS:
            continue
        assert obj["apiVersion"] == MONITORING_KINDS[obj["kind"]][1], _name(obj)
        errors = schema_errors(obj)
        assert not errors, f"{_name(obj)}: " + "; ".join(errors[:5])


def test_should_render_every_monitoring_object_in_a_ci_variant(helm: Path) -> None:
    """So that the per-variant validation above sees each kind; off by default."""
    objs = render(helm, "-f", str(MONITORING_VALUES))
    assert set(MONITORING_KINDS) <= {o["kind"] for o in objs}
    dashboard_of(objs)
    default = render(helm)
    assert not [o for o in default if o["kind"] in MONITORING_KINDS]
    assert not [c for c in of_kind(default, "ConfigMap") if "smartpath.json" in c.get("data", {})]


@pytest.mark.parametrize("kind", sorted(MONITORING_KINDS))
def test_should_keep_the_hand_written_schemas_strict(kind: str) -> None:
    schema = json.loads((SCHEMAS / MONITORING_KINDS[kind][0]).read_text())
    assert f"Prometheus Operator {OPERATOR_VERSION}" in schema["$comment"]
    assert open_objects(schema) == []


def _set(obj: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    obj = json.loads(json.dumps(obj))
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return obj


@pytest.mark.parametrize(
    ("kind", "path", "value", "error"),
    [
        ("PodMonitor", ("spec", "podMetricsEndpoints", 0, "interval"), "30 s", "does not match"),
        ("PodMonitor", ("spec", "podMetricsEndpoints", 0, "scrapeTimeout"), "10", "does not match"),
        ("PodMonitor", ("spec", "podMetricsEndpoints", 0, "scheme"), "tcp", "is not one of"),
        (
            "PodMonitor",
            ("spec", "podMetricsEndpoints", 0, "relabelings", 0, "action"),
            "rename",
            "is not one of",
        ),
        ("PodMonitor", ("spec", "podMetricsEndpoints", 0, "targetport"), 8080, "Additional"),
        ("PodMonitor", ("spec", "selector", "matchLabel"), {}, "Additional"),
        (
            "PrometheusRule",
            ("spec", "groups", 0, "rules", 0, "for"),
            "10 minutes",
            "does not match",
        ),
        (
            "PrometheusRule",
            ("spec", "groups", 0, "rules", 0, "record"),
            "x:y",
            "is valid under each",
        ),
        (
            "PrometheusRule",
            ("spec", "groups", 0, "rules", 0, "labels", "severity"),
            1,
            "not of type",
        ),
        ("PrometheusRule", ("spec", "groups", 0, "rules", 0, "keepFiringFor"), "5m", "Additional"),
        ("PrometheusRule", ("spec", "groups", 1, "name"), "smartpath.alerts", "duplicate names"),
    ],
)
def test_should_refuse_what_the_crd_refuses(
    helm: Path, kind: str, path: tuple[Any, ...], value: Any, error: str
) -> None:
    (obj,) = of_kind(render(helm, "-f", str(MONITORING_VALUES)), kind)
    assert schema_errors(obj) == []
    assert any(error in e for e in schema_errors(_set(obj, path, value))), error


# ---- the PodMonitor: every Ray pod, nothing else -------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels are simulated here"
    return selector["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("gpu", [False, True])
def test_should_scrape_every_ray_pod_and_nothing_else(helm: Path, gpu: bool) -> None:
    objs = render(
        helm,
        "-f",
        str(TRAINING_VALUES),
        *ALL_ON,
        "--set",
        f"kserve.enabled=true,workers.gpu.enabled={str(gpu).lower()}",
    )
    (monitor,) = of_kind(objs, "PodMonitor")
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    pods = pod_labels(objs)
    selected = {where for where, labels in pods.items() if _selects(spec["selector"], labels)}
    # The RayService's head and worker groups, and both RayJobs' heads and workers.
    ray = {
        w
        for w in pods
        if w.startswith("RayService/") or (w.startswith("RayJob/") and not w.endswith("submitter"))
    }
    groups = {f"RayService/{RELEASE} {g}" for g in ("head", "cpu", *(["gpu"] if gpu else []))}
    assert {w for w in ray if w.startswith("RayService/")} == groups
    jobs = {_name(job) for job in of_kind(objs, "RayJob")}
    assert len(jobs) == 2 and {w.rsplit(" ", 1)[0] for w in ray if w.startswith("RayJob/")} == jobs
    assert len(ray) == len(groups) + 4  # each RayJob: head + one worker group
    assert selected == ray
    # Not MinIO, its bucket Job, KServe, the helm test or KubeRay's submitter pods.
    others = set(pods) - selected
    assert {w.split("/")[0] for w in others} == {
        "StatefulSet",
        "Job",
        "Pod",
        "InferenceService",
        "RayJob",
    }
    assert all(w.endswith(" submitter") for w in others if w.startswith("RayJob/"))
    # Each selected pod's Ray container serves the endpoint's port name on 8080.
    (endpoint,) = spec["podMetricsEndpoints"]
    specs = dict(spec_ for obj in objs for spec_ in pod_specs(obj))
    for where in selected:
        ports = {p["name"]: p["containerPort"] for p in specs[where]["containers"][0]["ports"]}
        assert ports[endpoint["port"]] == METRICS_PORT, where
    assert endpoint["path"] == "/metrics"


def test_should_label_series_by_ray_node_cluster_and_release(helm: Path) -> None:
    objs = render(helm, "-f", str(MONITORING_VALUES))
    (monitor,) = of_kind(objs, "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    targets = {
        r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"] if "sourceLabels" in r
    }
    assert targets == {
        "ray_node_type": ["__meta_kubernetes_pod_label_ray_io_node_type"],
        "ray_group": ["__meta_kubernetes_pod_label_ray_io_group"],
        "ray_cluster": ["__meta_kubernetes_pod_label_ray_io_cluster"],
        "smartpath_component": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"],
        "smartpath_release": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
        "node": ["__meta_kubernetes_pod_node_name"],  # metrics.podMonitor.relabelings, appended
    }
    assert endpoint["interval"] == "15s" and endpoint["scrapeTimeout"] == "10s"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


@pytest.mark.parametrize("training", [False, True])
def test_should_admit_prometheus_to_the_metrics_port_of_every_ray_pod(
    helm: Path, training: bool
) -> None:
    base = ("-f", str(TRAINING_VALUES)) if training else ()
    for enabled in (True, False):
        objs = render(helm, *base, "--set", f"metrics.podMonitor.enabled={str(enabled).lower()}")
        policies = of_kind(objs, "NetworkPolicy")
        pods = pod_labels(objs)
        ray = {w: labels for w, labels in pods.items() if labels.get("smartpath.io/ray") == "true"}
        clusters = {labels["app.kubernetes.io/component"] for labels in ray.values()}
        assert ("training-sft" in clusters) == training
        for where, labels in ray.items():
            assert (
                admitted(policies, labels, PROMETHEUS_LABELS, METRICS_PORT, PROMETHEUS_NAMESPACE)
                == enabled
            ), f"prometheus -> {where}:{METRICS_PORT}"
            # Only the metrics port: not the GCS, the dashboard or the Ray client port.
            for port in (6379, 8265, 10001):
                assert not admitted(policies, labels, PROMETHEUS_LABELS, port, PROMETHEUS_NAMESPACE)
            # Other pods of that namespace still reach nothing.
            assert not admitted(policies, labels, {}, METRICS_PORT, PROMETHEUS_NAMESPACE)


# ---- metric names: what the alerts and the dashboard query must be what the code exports ---------

# f-string placeholders of metric names the code builds: {service} is RpcCounter's argument.
_DEFINITION = re.compile(
    r"\b(?:metrics|ray_metrics)\.(Counter|Histogram|Gauge)\(\s*(?:name\s*=\s*)?(f?)\"([^\"]+)\""
)
_PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def exposition_names(kind: str, name: str) -> set[str]:
    """The names Ray's metrics agent exports a ray.util/ray.serve metric under (checked against a
    real Ray by test_should_export_metrics_under_the_names_the_chart_uses)."""
    base = f"ray_{name}"
    if kind == "Counter":
        return {base if name.endswith("_total") else f"{base}_total"}
    if kind == "Histogram":
        return {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return {base}


def rpc_counter_services() -> set[str]:
    """The services that count their RPCs (``RpcCounter("<service>")`` in services/)."""
    found = set()
    for path in (ROOT / "services").rglob("*.py"):
        found |= set(re.findall(r"\bRpcCounter\(\"(\w+)\"\)", path.read_text()))
    return found


def metric_definitions(root: Path, fills: dict[str, set[str]]) -> dict[str, str]:
    """Exposition-name regex -> file, for every ray.util/ray.serve metric defined under root. An
    f-string's placeholders take the values of ``fills`` (by placeholder), or any word."""
    found = {}
    for path in root.rglob("*.py"):
        for kind, is_f, name in _DEFINITION.findall(path.read_text()):
            # Placeholders become markers, so that exposition_names sees the literal suffix.
            regexes = {}
            if is_f:
                for i, placeholder in enumerate(re.findall(r"\{(\w+)\}", name)):
                    marker = f"\x00{i}\x00"
                    name = name.replace(f"{{{placeholder}}}", marker, 1)
                    values = fills.get(placeholder)
                    regexes[marker] = "|".join(sorted(values)) if values else "[a-z0-9_]+"
            for exported in exposition_names(kind, name):
                pattern = re.escape(exported)
                for marker, alternatives in regexes.items():
                    pattern = pattern.replace(re.escape(marker), f"(?:{alternatives})")
                found[pattern] = str(path.relative_to(root.parent))
    return found


@functools.cache
def exported_patterns() -> dict[str, str]:
    """Exposition-name regex -> where the metric is defined: the services' metrics and Ray
    Serve's (the installed Ray, the version the image runs)."""
    import ray.serve
    from ray.serve._private.common import RequestProtocol

    patterns = metric_definitions(ROOT / "services", {"service": rpc_counter_services()})
    assert len(patterns) > 10, patterns  # the regex still finds the definitions
    # serve_num_{protocol_name}_requests and the like: one family per request protocol.
    protocols = {p.lower() for p in RequestProtocol}
    serve = metric_definitions(Path(ray.serve.__file__).parent, {"protocol_name": protocols})
    assert len(serve) > 50, serve
    return {**serve, **patterns}


def _expand_name_regex(regex: str) -> set[str]:
    """The names a ``__name__=~`` matcher of the form prefix(a|b|…)suffix matches."""
    match = re.fullmatch(r"([\w:]*)\(([\w|]+)\)([\w:]*)", regex)
    assert match, f"__name__=~{regex!r}: only prefix(a|b)suffix matchers are checked"
    return {f"{match[1]}{alt}{match[3]}" for alt in match[2].split("|")}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: bare selectors and ``__name__`` matchers.
    Grafana's ``label_values(selector, label)`` is read as its selector."""
    values = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr, re.S)
    if values:
        expr = values[1]
    names: set[str] = set()
    for block in re.findall(r"\{([^{}]*)\}", expr):
        for label, op, value in re.findall(
            r"([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*\"((?:[^\"\\]|\\.)*)\"", block
        ):
            if label == "__name__":
                assert op in ("=", "=~"), expr
                names |= _expand_name_regex(value) if op == "=~" else {value}
    text = re.sub(r"\"(?:[^\"\\]|\\.)*\"", '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    for word, call in re.findall(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        if not call and word not in _PROMQL_KEYWORDS:
            names.add(word)
    return names


def test_should_read_metric_names_out_of_promql() -> None:
    expr = (
        'sum by (application, code) (rate({__name__=~"ray_a_(x|y)_total", code="OK"}[5m]))'
        ' / ignoring (code) group_left sum by (application) (rate(ray_b_total{a="1"}[$__rate_'
        "interval])) > 0.05 or histogram_quantile(0.99, sum by (le) (rate(ray_c_bucket[5m])))"
        " * 1e3 unless on (x) rec:ord offset 10m"
    )
    assert promql_metric_names(expr) == {
        "ray_a_x_total",
        "ray_a_y_total",
        "ray_b_total",
        "ray_c_bucket",
        "rec:ord",
    }
    assert promql_metric_names('label_values(ray_d{namespace="$namespace"}, release)') == {"ray_d"}


def chart_queries(objs: list[dict[str, Any]]) -> dict[str, str]:
    """where -> PromQL of every query the chart ships: rules, dashboard panels and variables."""
    queries = {}
    for rule in rules_of(objs):
        queries[f"rule {rule.get('alert') or rule.get('record')}"] = str(rule["expr"])
    _, dashboard = dashboard_of(objs)
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            queries[f"panel {panel['id']} {target['refId']}"] = target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            queries[f"variable {var['name']}"] = query
    return queries


def test_should_query_only_metrics_the_code_exports(helm: Path) -> None:
    objs = render(helm, "-f", str(MONITORING_VALUES))
    patterns = exported_patterns()
    recorded = {r["record"] for r in rules_of(objs) if "record" in r}
    used: set[str] = set()
    for where, expr in chart_queries(objs).items():
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for name in names:
            if ":" in name:  # a recording rule's series
                assert name in recorded, f"{where}: {name} is recorded by no rule"
                continue
            defined = [w for p, w in patterns.items() if re.fullmatch(p, name)]
            assert defined, f"{where}: no code exports {name}"
            used.add(name)
    # What the alerts and the dashboard are about (so the checks above check something).
    assert {
        "ray_smartpath_gateway_rpcs_total",
        "ray_smartpath_decoder_queue_seconds_bucket",
        "ray_smartpath_decoder_tokens_total",
        "ray_smartpath_encoder_tiles_per_second",
        "ray_smartpath_feature_cache_lookups_total",
        "ray_serve_grpc_request_latency_ms_bucket",
        "ray_serve_health_check_failures_total",
        "ray_serve_deployment_replica_healthy",
    } <= used


def test_should_refuse_a_metric_no_code_exports() -> None:
    patterns = exported_patterns()
    for name in (
        "ray_smartpath_decoder_rpcs",  # a counter without _total
        "smartpath_decoder_rpcs_total",  # without Ray's prefix
        "ray_smartpath_decoder_queue_seconds",  # a histogram without _bucket
        "ray_serve_health_check_failures_total_total",
        "ray_smartpath_decoder_tokens_per_second_total",  # a gauge is no counter
        "ray_smartpath_kserve_rpcs_total",  # no RpcCounter("kserve")
    ):
        assert not [p for p in patterns if re.fullmatch(p, name)], name
    for name in ("ray_serve_num_grpc_requests_total", "ray_smartpath_router_rpcs_total"):
        assert [p for p in patterns if re.fullmatch(p, name)], name


def test_should_count_the_rpcs_of_every_service(helm: Path) -> None:
    """The rules and the dashboard name the RPC counter of each service in the contracts, which
    are the services that count their RPCs."""
    from smartpath.services.contracts import SERVICES

    apps = {s.app for s in SERVICES}
    assert rpc_counter_services() == apps
    objs = render(helm, "-f", str(MONITORING_VALUES))
    expected = {f"ray_smartpath_{app}_rpcs_total" for app in apps}
    counted = {
        where: names
        for where, expr in chart_queries(objs).items()
        if where != "rule SmartPathDecoderQueueFull"  # the decoder and the gateway only
        for names in [{n for n in promql_metric_names(expr) if n.endswith("_rpcs_total")}]
        if names
    }
    assert "rule SmartPathRpcErrors" in counted and any(w.startswith("panel") for w in counted)
    for where, names in counted.items():
        assert names == expected, where


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SMARTPATH_SLOW"), reason="set SMARTPATH_SLOW=1")
def test_should_export_metrics_under_the_names_the_chart_uses(helm: Path) -> None:
    """A real Ray (tests/deploy/metrics_probe.py): the exposition rule holds for the kinds the
    services use, and Serve's metrics the chart queries appear under the names it uses."""
    from tests.deploy import metrics_probe

    proc = subprocess.run(
        [sys.executable, "-m", "tests.deploy.metrics_probe"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    scraped = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    for kind, name in (
        *metrics_probe.PROBE_METRICS,
        ("Counter", f"smartpath_{metrics_probe.PROBE_SERVICE}_rpcs"),
        ("Counter", "serve_health_check_failures_total"),  # ends with _total already
    ):
        assert exposition_names(kind, name) <= scraped, (kind, name)
    objs = render(helm, "-f", str(MONITORING_VALUES))
    used = set().union(*map(promql_metric_names, chart_queries(objs).values()))
    serve = {n for n in used if n.startswith("ray_serve_")}
    assert serve and serve <= scraped, serve - scraped


# ---- the alerts ----------------------------------------------------------------------------------


def test_should_label_and_annotate_every_alert(helm: Path) -> None:
    objs = render(helm, "-f", str(MONITORING_VALUES))
    (rule,) = of_kind(objs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    groups = {g["name"]: g["rules"] for g in rule["spec"]["groups"]}
    assert set(groups) == {"smartpath.alerts", "smartpath.extra"}
    ours = {r["alert"]: r for r in groups["smartpath.alerts"]}
    assert set(ours) == ALERTS
    for r in rules_of(objs):
        if "alert" not in r:
            continue
        assert r["labels"]["severity"], r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        if r["alert"] in ALERTS:
            assert r["labels"]["team"] == "pathology"  # metrics.prometheusRule.additionalLabels
            # Only this release's series.
            assert f'namespace="{NAMESPACE}", smartpath_release="{RELEASE}"' in r["expr"]
    severities = {a: r["labels"]["severity"] for a, r in ours.items()}
    assert severities["SmartPathRpcErrors"] == "critical"
    assert ours["SmartPathGrpcLatencyHigh"]["expr"].endswith("> 30000")  # thresholdSeconds: 30
    codes = re.search(r'code=~"([^"]+)"', ours["SmartPathRpcErrors"]["expr"])
    assert codes and set(codes[1].split("|")) < GRPC_CODES - {"OK", "RESOURCE_EXHAUSTED"}
    assert 'code="RESOURCE_EXHAUSTED"' in ours["SmartPathDecoderQueueFull"]["expr"]


def test_should_take_thresholds_from_the_values(helm: Path) -> None:
    objs = render(
        helm,
        *ALL_ON,
        "--set-json",  # --set reads 0.2 as a string, which the values schema refuses
        "metrics.prometheusRule.rpcErrors.threshold=0.2",
        "--set",
        "metrics.prometheusRule.rpcErrors.for=3m",
        "--set",
        "metrics.prometheusRule.rpcErrors.codes={INTERNAL}",
        "--set",
        "metrics.prometheusRule.replicaRestarts.window=1h,metrics.prometheusRule.latency=null",
        "--set",
        "metrics.prometheusRule.decoderQueueWait.severity=critical",
    )
    alerts = {r["alert"]: r for r in rules_of(objs)}
    assert set(alerts) == ALERTS - {"SmartPathGrpcLatencyHigh"}  # null drops an alert
    errors = alerts["SmartPathRpcErrors"]
    assert errors["expr"].endswith("> 0.2") and errors["for"] == "3m"
    assert 'code=~"INTERNAL"' in errors["expr"]
    assert "[1h]" in alerts["SmartPathReplicaRestarts"]["expr"]
    assert alerts["SmartPathDecoderQueueSlow"]["labels"] == {"severity": "critical"}
    (rule,) = of_kind(objs, "PrometheusRule")
    assert [g["name"] for g in rule["spec"]["groups"]] == ["smartpath.alerts"]  # no extraRules


def test_should_parse_every_query_as_promql(helm: Path) -> None:
    """Every query parses as PromQL (promql-parser, a test dependency)."""
    import promql_parser

    with pytest.raises(Exception):  # noqa: B017 (its error type is not exported)
        promql_parser.parse("sum by (a) (rate(x[5m])")
    objs = render(helm, "-f", str(MONITORING_VALUES))
    grafana = {"$__rate_interval": "5m", "$namespace": "ns", "$release": "rel"}
    for where, expr in chart_queries(objs).items():
        if where.startswith("variable"):
            continue
        for variable, value in grafana.items():
            expr = expr.replace(variable, value)
        try:
            promql_parser.parse(expr)
        except Exception as exc:
            pytest.fail(f"{where}: {exc}\n{expr}")


def test_should_document_every_alert_in_the_readme(helm: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**Metrics.**") :]
    for alert in ALERTS:
        assert f"`{alert}`" in section, alert


# ---- the dashboard -------------------------------------------------------------------------------


def test_should_ship_a_dashboard_grafana_can_load(helm: Path) -> None:
    objs = render(helm, "-f", str(MONITORING_VALUES))
    configmap, dashboard = dashboard_of(objs)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "SmartPath"}
    assert "namespace" not in configmap["metadata"]
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # No hard-coded datasource: every reference is the variable.
    refs = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "datasource" in node:
                refs.append(node["datasource"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard)
    assert refs and all(r == {"type": "prometheus", "uid": "${datasource}"} for r in refs), refs
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            # This release's series only, chosen by the dashboard's variables.
            for selector in re.findall(r"\{[^{}]*\}", target["expr"]):
                assert 'namespace="$namespace", smartpath_release="$release"' in selector, panel[
                    "title"
                ]
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in (
        "rpc rate",
        "error rate",
        "p50, p99",
        "decoder queue",
        "tokens/s",
        "tiles/s",
        "batch size",
        "feature cache hit ratio",
        "replicas",
        "health check failures",
    ):
        assert topic in titles, topic


def test_should_place_the_dashboard_where_the_sidecar_looks(helm: Path) -> None:
    objs = render(
        helm,
        "--set",
        "metrics.dashboard.enabled=true,metrics.dashboard.label=dashboards",
        "--set",
        "metrics.dashboard.labelValue=smartpath,metrics.dashboard.namespace=grafana",
    )
    configmap, _ = dashboard_of(objs)
    assert configmap["metadata"]["labels"]["dashboards"] == "smartpath"
    assert "grafana_dashboard" not in configmap["metadata"]["labels"]
    assert configmap["metadata"]["namespace"] == "grafana"
