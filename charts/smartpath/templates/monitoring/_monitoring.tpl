{{/* ============================== monitoring ============================== */}}

{{/*
smartpath.monitoring.seriesSelector: the label matchers that pick this release's series out of
Prometheus (`namespace="…", smartpath_release="…"`): the PodMonitor (podmonitor.yaml) puts the
pod's namespace and its app.kubernetes.io/instance label on every series it scrapes, so the alerts
of one release never see another's.
*/}}
{{- define "smartpath.monitoring.seriesSelector" -}}
namespace={{ .Release.Namespace | quote }}, smartpath_release={{ .Release.Name | quote }}
{{- end }}

{{/*
smartpath.monitoring.rpcMetrics: a `__name__` matcher for the RPC counters of the given
applications (dict "root" $ "apps" LIST; no "apps": every service of smartpath.services). Each
deployment counts its RPCs by method and status code as smartpath_<app>_rpcs
(services/grpc_util.py RpcCounter); Ray exports a counter as ray_<name>_total.
*/}}
{{- define "smartpath.monitoring.rpcMetrics" -}}
{{- $apps := .apps | default list }}
{{- if not $apps }}
{{- range $service := include "smartpath.services" .root | fromJsonArray }}
{{- $apps = append $apps $service.app }}
{{- end }}
{{- end }}
{{- printf "__name__=~%q" (printf "ray_smartpath_(%s)_rpcs_total" (join "|" $apps)) }}
{{- end }}

{{/*
smartpath.monitoring.alertLabels: the labels of one alert (dict "root" $ "severity" S):
its severity plus metrics.prometheusRule.additionalLabels.
*/}}
{{- define "smartpath.monitoring.alertLabels" -}}
{{- toYaml (merge (dict "severity" .severity) (deepCopy (.root.Values.metrics.prometheusRule.additionalLabels | default dict))) }}
{{- end }}
