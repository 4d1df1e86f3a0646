{{/* ============================== names ============================== */}}

{{/*
smartpath.name: the chart name (or nameOverride), for the app.kubernetes.io/name label.
Cut to 63 characters: label values and DNS-1123 labels are at most 63.
*/}}
{{- define "smartpath.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
smartpath.fullname: the prefix of every object name: the release name, plus the chart name
unless the release name already contains it (smartpath -> "smartpath", prod -> "prod-smartpath").
Cut to 63 characters: Kubernetes object names used as DNS labels (Services) are at most 63.
*/}}
{{- define "smartpath.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
smartpath.componentName: "<fullname>-<suffix>" for objects of one component (dict "root" $
"suffix" "grpc"). The full name is cut first so that the suffix always survives and the result
stays within 63 characters (DNS-1123 label, the limit for Service names).
*/}}
{{- define "smartpath.componentName" -}}
{{- $max := sub 62 (len .suffix) | int }}
{{- printf "%s-%s" (include "smartpath.fullname" .root | trunc $max | trimSuffix "-") .suffix }}
{{- end }}

{{/*
smartpath.rayServiceName: the RayService's name, cut to 47 characters. KubeRay names the
RayCluster "<name>-<5 random chars>" (+6) and its Services "<cluster>-serve-svc" (+10), and its
webhook/controller refuse RayService names over 63 - 16 = 47 (utils.MaxRayServiceNameLength).
*/}}
{{- define "smartpath.rayServiceName" -}}
{{- include "smartpath.fullname" . | trunc 47 | trimSuffix "-" }}
{{- end }}

{{/*
smartpath.runSlug: the run name (training.config.name, `^[a-z0-9][a-z0-9._-]*$`) as a DNS label
part: dots and underscores become dashes (smartpath.training.rayjob.run_slug).
*/}}
{{- define "smartpath.runSlug" -}}
{{- $run := (.Values.training.config | default dict).name | default "smartpath" }}
{{- regexReplaceAll "[^a-z0-9-]+" (lower (toString $run)) "-" | trimAll "-" }}
{{- end }}

{{/*
smartpath.rayJobName: "<fullname>-<kind>-<run>" for a training RayJob (dict "root" $ "kind" "sft"),
<run> from smartpath.runSlug, so each run is a RayJob of its own. KubeRay refuses RayJob names
over 47 characters (utils.MaxRayJobNameLength: it adds a 6-character suffix for the RayCluster,
whose Services add up to 10 more); a longer name is cut to 40 and ends in "-" and the first 6 hex
digits of its SHA-256, so cut names stay distinct (smartpath.training.rayjob.cut_name).
*/}}
{{- define "smartpath.rayJobName" -}}
{{- $name := printf "%s-%s-%s" (include "smartpath.fullname" .root) .kind (include "smartpath.runSlug" .root) }}
{{- if le (len $name) 47 }}
{{- $name }}
{{- else }}
{{- printf "%s-%s" (regexReplaceAll "-+$" ($name | trunc 40) "") (sha256sum $name | trunc 6) }}
{{- end }}
{{- end }}

{{/*
smartpath.grpcServiceName: the Service clients dial for the gRPC API: KubeRay's serve Service of
the RayService, "<RayService>-serve-svc" (spec.serveService; KubeRay >= 1.6 adds every container
port named "serve" or "serve-*" to it and switches it to a new cluster atomically on upgrades).
*/}}
{{- define "smartpath.grpcServiceName" -}}
{{- printf "%s-serve-svc" (include "smartpath.rayServiceName" .) }}
{{- end }}

{{/*
smartpath.inferenceServiceName: the InferenceService's name, cut to 47 characters. KServe derives
"<name>-predictor" Deployments/Services and, in Serverless mode, Knative revisions
"<name>-predictor-00001" (+16), all of which must stay within 63.
*/}}
{{- define "smartpath.inferenceServiceName" -}}
{{- include "smartpath.fullname" . | trunc 47 | trimSuffix "-" }}
{{- end }}

{{/*
smartpath.chart: "name-version" for the helm.sh/chart label ("+" is not allowed in labels).
*/}}
{{- define "smartpath.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* ============================== labels ============================== */}}

{{/*
smartpath.selectorLabels: the immutable labels that select the release's pods.
*/}}
{{- define "smartpath.selectorLabels" -}}
app.kubernetes.io/name: {{ include "smartpath.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
smartpath.labels: the standard labels of every object (selector labels, chart, version, manager,
part-of) plus commonLabels.
*/}}
{{- define "smartpath.labels" -}}
helm.sh/chart: {{ include "smartpath.chart" . }}
{{ include "smartpath.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: smartpath
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
smartpath.componentSelectorLabels: selector labels of one component (dict "root" $ "component"
"serving"): serving, minio, training-sft, training-grpo, kserve, test.
*/}}
{{- define "smartpath.componentSelectorLabels" -}}
{{ include "smartpath.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
smartpath.componentLabels: all labels of one component's objects (dict "root" $ "component" …).
*/}}
{{- define "smartpath.componentLabels" -}}
{{ include "smartpath.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
smartpath.rayClusterSelectorLabels: the labels that select the pods of one Ray cluster (dict "root"
$ "component" C): the RayService's (serving) or one training RayJob's (training-sft,
training-grpo). KubeRay's own `ray.io/cluster` label cannot be used in a static NetworkPolicy: its
value is the RayCluster's name, "<RayService|RayJob name>-<5 random characters>", made by KubeRay
(and renewed by every NewCluster upgrade); the chart's component label is fixed per cluster.
*/}}
{{- define "smartpath.rayClusterSelectorLabels" -}}
{{ include "smartpath.componentSelectorLabels" . }}
smartpath.io/ray: "true"
{{- end }}

{{/* ============================== image, accounts ============================== */}}

{{/*
smartpath.image: the SmartPath image reference; the tag defaults to the chart's appVersion and may
carry a digest ("0.1.0@sha256:…").
*/}}
{{- define "smartpath.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/*
smartpath.serviceAccountName: the ServiceAccount of the SmartPath pods.
*/}}
{{- define "smartpath.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "smartpath.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* ============================== storage ============================== */}}

{{/*
smartpath.minio.serviceName: the bundled MinIO's client Service.
*/}}
{{- define "smartpath.minio.serviceName" -}}
{{- include "smartpath.componentName" (dict "root" . "suffix" "minio") }}
{{- end }}

{{/*
smartpath.storage.endpoint: host:port of object storage: the bundled MinIO, or
externalStorage.endpoint (required when minio.enabled=false).
*/}}
{{- define "smartpath.storage.endpoint" -}}
{{- if .Values.minio.enabled }}
{{- printf "%s.%s.svc:9000" (include "smartpath.minio.serviceName" .) .Release.Namespace }}
{{- else }}
{{- required "externalStorage.endpoint is required when minio.enabled=false (host:port of an S3 API endpoint)" .Values.externalStorage.endpoint }}
{{- end }}
{{- end }}

{{/*
smartpath.storage.secure: "true" when object storage is reached over TLS (the bundled MinIO
speaks plain HTTP inside the cluster, behind its NetworkPolicy).
*/}}
{{- define "smartpath.storage.secure" -}}
{{- if .Values.minio.enabled }}false{{ else }}{{ .Values.externalStorage.secure }}{{ end }}
{{- end }}

{{/*
smartpath.storage.region: the S3 region ("" lets the client discover it).
*/}}
{{- define "smartpath.storage.region" -}}
{{- if not .Values.minio.enabled }}{{ .Values.externalStorage.region }}{{ end }}
{{- end }}

{{/*
smartpath.storage.secretName: the Secret holding the S3 credentials: an existing one, or the one
the chart makes (templates/secret-storage.yaml).
*/}}
{{- define "smartpath.storage.secretName" -}}
{{- if .Values.minio.enabled }}
{{- .Values.minio.auth.existingSecret | default (include "smartpath.componentName" (dict "root" . "suffix" "minio")) }}
{{- else }}
{{- .Values.externalStorage.existingSecret | default (include "smartpath.componentName" (dict "root" . "suffix" "storage")) }}
{{- end }}
{{- end }}

{{/*
smartpath.storage.accessKeyKey: key of the access key in the storage Secret.
*/}}
{{- define "smartpath.storage.accessKeyKey" -}}
{{- if .Values.minio.enabled }}{{ .Values.minio.auth.accessKeyKey }}{{ else }}{{ .Values.externalStorage.accessKeyKey }}{{ end }}
{{- end }}

{{/*
smartpath.storage.secretKeyKey: key of the secret key in the storage Secret.
*/}}
{{- define "smartpath.storage.secretKeyKey" -}}
{{- if .Values.minio.enabled }}{{ .Values.minio.auth.secretKeyKey }}{{ else }}{{ .Values.externalStorage.secretKeyKey }}{{ end }}
{{- end }}

{{/*
smartpath.storage.roles: the storage roles in use, as a JSON list: "serving" (the RayService and
the KServe predictor) always, "training" (the RayJobs) when training.enabled.
*/}}
{{- define "smartpath.storage.roles" -}}
{{- $roles := list "serving" }}
{{- if .Values.training.enabled }}
{{- $roles = append $roles "training" }}
{{- end }}
{{- toJson $roles }}
{{- end }}

{{/*
smartpath.storage.roleCredentials: where the S3 credentials of one role's pods come from (dict
"root" $ "role" "serving"|"training"), as JSON {secretName, accessKeyKey, secretKeyKey, chartMade}:
storage.<role>.existingSecret when set; else, with the bundled MinIO, the Secret the chart makes
for that role's MinIO user ("<fullname>-minio-<role>"); else (external storage) the one shared
Secret of externalStorage. Never MinIO's root account.
*/}}
{{- define "smartpath.storage.roleCredentials" -}}
{{- $v := .root.Values }}
{{- $r := get $v.storage .role }}
{{- if $r.existingSecret }}
{{- dict "secretName" $r.existingSecret "accessKeyKey" $r.accessKeyKey "secretKeyKey" $r.secretKeyKey "chartMade" false | toJson }}
{{- else if $v.minio.enabled }}
{{- dict "secretName" (include "smartpath.componentName" (dict "root" .root "suffix" (printf "minio-%s" .role))) "accessKeyKey" $r.accessKeyKey "secretKeyKey" $r.secretKeyKey "chartMade" true | toJson }}
{{- else }}
{{- dict "secretName" (include "smartpath.storage.secretName" .root) "accessKeyKey" $v.externalStorage.accessKeyKey "secretKeyKey" $v.externalStorage.secretKeyKey "chartMade" false | toJson }}
{{- end }}
{{- end }}

{{/*
smartpath.s3Bucket: the bucket of an s3://bucket/prefix URI; empty for anything else.
*/}}
{{- define "smartpath.s3Bucket" -}}
{{- $uri := toString (. | default "") }}
{{- if hasPrefix "s3://" $uri }}
{{- trimPrefix "s3://" $uri | splitList "/" | first }}
{{- end }}
{{- end }}

{{/*
smartpath.minio.grants: what one role's MinIO user may do per bucket (dict "root" $ "role" R), as
JSON {bucket: {"read": bool, "write": bool}}: minio.policies.<role> (read, readWrite, write) plus
the buckets the config tree names for that role: serving reads config.model.uri's bucket and
reads and writes config.model.features_bucket (the slide feature cache); training reads the
buckets of training.config.data.manifests and reads and writes training.config.run_root's.
*/}}
{{- define "smartpath.minio.grants" -}}
{{- $v := .root.Values }}
{{- $p := get $v.minio.policies .role }}
{{- $read := concat ($p.read | default list) ($p.readWrite | default list) }}
{{- $write := concat ($p.write | default list) ($p.readWrite | default list) }}
{{- if eq .role "serving" }}
{{- $model := $v.config.model | default dict }}
{{- $read = append $read ($model.features_bucket | default "smartpath") }}
{{- $write = append $write ($model.features_bucket | default "smartpath") }}
{{- with include "smartpath.s3Bucket" $model.uri }}
{{- $read = append $read . }}
{{- end }}
{{- else }}
{{- $t := $v.training.config | default dict }}
{{- with include "smartpath.s3Bucket" $t.run_root }}
{{- $read = append $read . }}
{{- $write = append $write . }}
{{- end }}
{{- range (($t.data | default dict).manifests | default list) }}
{{- with include "smartpath.s3Bucket" . }}
{{- $read = append $read . }}
{{- end }}
{{- end }}
{{- end }}
{{- $grants := dict }}
{{- range $bucket := concat $read $write | uniq }}
{{- $_ := set $grants $bucket (dict "read" (has $bucket $read) "write" (has $bucket $write)) }}
{{- end }}
{{- toJson $grants }}
{{- end }}

{{/*
smartpath.minio.policy: the IAM policy document of one role's MinIO user (dict "root" $ "role" R),
as JSON, from smartpath.minio.grants: on every granted bucket s3:GetBucketLocation (the client
asks for the region) and s3:ListBucket (listing, HeadBucket); s3:GetObject (GET/HEAD) on the
objects of readable buckets; s3:PutObject and s3:AbortMultipartUpload (multipart uploads) on the
objects of writable ones. Nothing else: no deletes, no bucket creation, no admin.
*/}}
{{- define "smartpath.minio.policy" -}}
{{- $grants := include "smartpath.minio.grants" . | fromJson }}
{{- $buckets := list }}
{{- $readable := list }}
{{- $writable := list }}
{{- range $bucket := keys $grants | sortAlpha }}
{{- $g := get $grants $bucket }}
{{- $buckets = append $buckets (printf "arn:aws:s3:::%s" $bucket) }}
{{- if $g.read }}
{{- $readable = append $readable (printf "arn:aws:s3:::%s/*" $bucket) }}
{{- end }}
{{- if $g.write }}
{{- $writable = append $writable (printf "arn:aws:s3:::%s/*" $bucket) }}
{{- end }}
{{- end }}
{{- $statements := list }}
{{- if $buckets }}
{{- $statements = append $statements (dict "Sid" "Buckets" "Effect" "Allow" "Action" (list "s3:GetBucketLocation" "s3:ListBucket") "Resource" $buckets) }}
{{- end }}
{{- if $readable }}
{{- $statements = append $statements (dict "Sid" "Read" "Effect" "Allow" "Action" (list "s3:GetObject") "Resource" $readable) }}
{{- end }}
{{- if $writable }}
{{- $statements = append $statements (dict "Sid" "Write" "Effect" "Allow" "Action" (list "s3:PutObject" "s3:AbortMultipartUpload") "Resource" $writable) }}
{{- end }}
{{- dict "Version" "2012-10-17" "Statement" $statements | toJson }}
{{- end }}

{{/*
smartpath.minio.allBuckets: the buckets the bucket Job creates, as a JSON list: minio.buckets plus
every bucket a role's policy grants (a user may not create buckets itself).
*/}}
{{- define "smartpath.minio.allBuckets" -}}
{{- $buckets := .Values.minio.buckets | default list }}
{{- range $role := include "smartpath.storage.roles" . | fromJsonArray }}
{{- $buckets = concat $buckets (include "smartpath.minio.grants" (dict "root" $ "role" $role) | fromJson | keys | sortAlpha) }}
{{- end }}
{{- $buckets | uniq | toJson }}
{{- end }}

{{/* ============================== auth ============================== */}}

{{/*
smartpath.auth.secretName: the Secret holding the accepted bearer tokens.
*/}}
{{- define "smartpath.auth.secretName" -}}
{{- .Values.auth.existingSecret | default (include "smartpath.componentName" (dict "root" . "suffix" "auth")) }}
{{- end }}

{{/*
smartpath.auth.tokenFile: where the tokens file is mounted (config.serve.auth_token_file). Its own
folder, not under /etc/smartpath: a Secret mounted inside the ConfigMap's mount would nest two
atomically-updated volumes.
*/}}
{{- define "smartpath.auth.tokenFile" -}}
/etc/smartpath-auth/tokens
{{- end }}

{{/* ============================== config ============================== */}}

{{/*
smartpath.config: the SmartPath config tree the services load, as JSON: .Values.config plus what
the chart owns (storage.endpoint/secure/region from minio/externalStorage, serve.auth_token_file
from auth). JSON, not toYaml: Helm reads numbers as float64 and toYaml would write large integers
such as slide_cache.max_bytes in e-notation; toJson keeps them whole. Never holds secrets.
*/}}
{{- define "smartpath.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $storage := get $cfg "storage" | default dict }}
{{- $_ := set $storage "endpoint" (include "smartpath.storage.endpoint" .) }}
{{- $_ := set $storage "secure" (eq (include "smartpath.storage.secure" .) "true") }}
{{- with include "smartpath.storage.region" . }}
{{- $_ := set $storage "region" . }}
{{- end }}
{{- $_ := set $cfg "storage" $storage }}
{{- if .Values.auth.enabled }}
{{- $serve := get $cfg "serve" | default dict }}
{{- $_ := set $serve "auth_token_file" (include "smartpath.auth.tokenFile" .) }}
{{- $_ := set $cfg "serve" $serve }}
{{- end }}
{{- toJson $cfg }}
{{- end }}

{{/*
smartpath.trainingConfig: the config tree of the training RayJobs: smartpath.config plus
`training` from .Values.training.config (JSON, for the same reason).
*/}}
{{- define "smartpath.trainingConfig" -}}
{{- $cfg := include "smartpath.config" . | fromJson }}
{{- $_ := set $cfg "training" (deepCopy (.Values.training.config | default dict)) }}
{{- toJson $cfg }}
{{- end }}

{{/*
smartpath.services: the five services, callees before callers, as JSON: each its Serve application,
its one deployment and its generated gRPC servicer. A copy of smartpath.services.contracts.SERVICES
(tests/deploy/test_chart.py keeps them equal); everything below reads it.
*/}}
{{- define "smartpath.services" -}}
{{- list
  (dict "app" "tiler" "deployment" "SlideTiler" "grpcService" "smartpath.v1.SlideTiler" "servicer" "smartpath.v1.tiling_pb2_grpc.add_SlideTilerServicer_to_server")
  (dict "app" "encoder" "deployment" "FeatureEncoder" "grpcService" "smartpath.v1.FeatureEncoder" "servicer" "smartpath.v1.encoding_pb2_grpc.add_FeatureEncoderServicer_to_server")
  (dict "app" "router" "deployment" "ExpertRouter" "grpcService" "smartpath.v1.ExpertRouter" "servicer" "smartpath.v1.routing_pb2_grpc.add_ExpertRouterServicer_to_server")
  (dict "app" "decoder" "deployment" "Decoder" "grpcService" "smartpath.v1.Decoder" "servicer" "smartpath.v1.decoding_pb2_grpc.add_DecoderServicer_to_server")
  (dict "app" "gateway" "deployment" "Pathology" "grpcService" "smartpath.v1.Pathology" "servicer" "smartpath.v1.pathology_pb2_grpc.add_PathologyServicer_to_server")
  | toJson }}
{{- end }}

{{/*
smartpath.publicApp: the application whose gRPC service is the public API (the gateway's
smartpath.v1.Pathology); the other services are internal (the gateway calls them).
*/}}
{{- define "smartpath.publicApp" -}}
gateway
{{- end }}

{{/*
smartpath.exposedGrpcServices: the full names of the gRPC services routed from outside the
cluster, as a JSON list: the one definition the Ingress (smartpath.ingress.paths) and the Gateway
API GRPCRoute (templates/grpcroute.yaml) share (dict "root" $ "key" "ingress"|"gateway": the
values section holding exposeInternalServices and exposeReflection). The public service and
grpc.health.v1.Health always; <key>.exposeInternalServices (full gRPC names of the other
services) and server reflection (<key>.exposeReflection) on request. Fails on a name that is no
internal service (values.schema.json refuses those too).
*/}}
{{- define "smartpath.exposedGrpcServices" -}}
{{- $v := get .root.Values .key }}
{{- $public := include "smartpath.publicApp" .root }}
{{- $internal := dict }}
{{- $names := list }}
{{- range $s := include "smartpath.services" .root | fromJsonArray }}
{{- if eq $s.app $public }}
{{- $names = append $names $s.grpcService }}
{{- else }}
{{- $_ := set $internal $s.grpcService true }}
{{- end }}
{{- end }}
{{- $names = append $names "grpc.health.v1.Health" }}
{{- range $name := $v.exposeInternalServices }}
{{- if not (hasKey $internal $name) }}
{{- fail (printf "%s.exposeInternalServices: %q is not an internal SmartPath gRPC service (one of %s; %s is always exposed)" $.key $name (keys $internal | sortAlpha | join ", ") (first $names)) }}
{{- end }}
{{- $names = append $names $name }}
{{- end }}
{{- if $v.exposeReflection }}
{{- /* Serve's proxy registers v1alpha; v1 is routed too for clients that try it first (they
  fall back to v1alpha on UNIMPLEMENTED). */}}
{{- $names = concat $names (list "grpc.reflection.v1.ServerReflection" "grpc.reflection.v1alpha.ServerReflection") }}
{{- end }}
{{- $names | uniq | toJson }}
{{- end }}

{{/*
smartpath.ingress.paths: the path prefixes the Ingress routes, as a JSON list. gRPC calls are
POST /<package>.<Service>/<Method>, so one prefix per service of smartpath.exposedGrpcServices
(ingress.exposeInternalServices, ingress.exposeReflection).
*/}}
{{- define "smartpath.ingress.paths" -}}
{{- $paths := list }}
{{- range $name := include "smartpath.exposedGrpcServices" (dict "root" . "key" "ingress") | fromJsonArray }}
{{- $paths = append $paths (printf "/%s/" $name) }}
{{- end }}
{{- $paths | toJson }}
{{- end }}

{{/*
smartpath.grpcServicers: Serve's grpc_servicer_functions (smartpath.services.apps.GRPC_SERVICERS):
each service's servicer, then the health servicer on the proxy itself.
*/}}
{{- define "smartpath.grpcServicers" -}}
{{- $servicers := list }}
{{- range $s := include "smartpath.services" . | fromJsonArray }}
{{- $servicers = append $servicers $s.servicer }}
{{- end }}
{{- append $servicers "smartpath.services.grpc_util.add_health_servicer" | toJson }}
{{- end }}

{{/*
smartpath.serveConfig: the RayService's serveConfigV2, the document `smartpath serve
--print-config` prints (smartpath.services.apps.serve_config): gRPC options, and per application
(callees before callers) its builder import path, args {config: <the tree>} and the deployment's
options from config.serve.<app> (and a graceful shutdown as long as config.serve.deadline_s). JSON (valid YAML), for the reason given at smartpath.config.
*/}}
{{- define "smartpath.serveConfig" -}}
{{- $cfg := include "smartpath.config" . | fromJson }}
{{- $serve := $cfg.serve }}
{{- $apps := list }}
{{- range $service := include "smartpath.services" . | fromJsonArray }}
{{- $app := $service.app }}
{{- $d := required (printf "config.serve.%s is required" $app) (get $serve $app) }}
{{- $scale := required (printf "config.serve.%s.autoscaling is required" $app) $d.autoscaling }}
{{- $options := dict
  "name" $service.deployment
  "max_ongoing_requests" (required (printf "config.serve.%s.max_ongoing_requests is required" $app) $d.max_ongoing_requests)
  "max_queued_requests" (required (printf "config.serve.%s.max_queued_requests is required" $app) $d.max_queued_requests)
  "autoscaling_config" (dict
    "min_replicas" (required (printf "config.serve.%s.autoscaling.min_replicas is required" $app) $scale.min_replicas)
    "max_replicas" (required (printf "config.serve.%s.autoscaling.max_replicas is required" $app) $scale.max_replicas)
    "target_ongoing_requests" (required (printf "config.serve.%s.autoscaling.target_ongoing_requests is required" $app) $scale.target_ongoing_requests)
    "upscale_delay_s" (required (printf "config.serve.%s.autoscaling.upscale_delay_s is required" $app) $scale.upscale_delay_s)
    "downscale_delay_s" (required (printf "config.serve.%s.autoscaling.downscale_delay_s is required" $app) $scale.downscale_delay_s)
    "look_back_period_s" (required (printf "config.serve.%s.autoscaling.look_back_period_s is required" $app) $scale.look_back_period_s))
  "ray_actor_options" (dict
    "num_cpus" (required (printf "config.serve.%s.num_cpus is required" $app) $d.num_cpus)
    "num_gpus" (required (printf "config.serve.%s.num_gpus is required" $app) $d.num_gpus))
  "graceful_shutdown_timeout_s" (required "config.serve.deadline_s is required" $serve.deadline_s) }}
{{- $apps = append $apps (dict
  "name" $app
  "route_prefix" (printf "/%s" $app)
  "import_path" (printf "smartpath.services.apps:%s" $app)
  "args" (dict "config" $cfg)
  "deployments" (list $options)) }}
{{- end }}
{{- $doc := dict
  "proxy_location" "EveryNode"
  "http_options" (dict "host" $serve.host "port" $serve.http_port)
  "grpc_options" (dict
    "port" $serve.grpc_port
    "grpc_servicer_functions" (include "smartpath.grpcServicers" . | fromJsonArray)
    "request_timeout_s" $serve.request_timeout_s
    "enable_reflection" true)
  "logging_config" (dict "encoding" $serve.log_encoding "log_level" $cfg.log_level)
  "applications" $apps }}
{{- toPrettyJson $doc }}
{{- end }}

{{/* ============================== pods ============================== */}}

{{/*
smartpath.env: environment of every SmartPath container (dict "root" $ "role" "serving"|"training").
Storage endpoint and credentials come as SMARTPATH_STORAGE__* variables, the credentials from the
role's Secret (smartpath.storage.roleCredentials: its own MinIO user, never the root account): the
config tree's environment overrides win over the file and the Serve args, so replicas read secrets
that never appear in the RayService or a ConfigMap. HOME and the cache folders are the image's
(docker/Dockerfile).
*/}}
{{- define "smartpath.env" -}}
{{- $creds := include "smartpath.storage.roleCredentials" (dict "root" .root "role" .role) | fromJson }}
{{- $cfg := include "smartpath.config" .root | fromJson }}
{{- with .root -}}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
# Serve's gRPC proxies and replicas (inter-deployment gRPC) read their message size limits
# from the node's environment (services/serving.py proxy_environment).
- name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
  value: {{ $cfg.serve.max_message_bytes | int64 | toString | quote }}
- name: RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH
  value: {{ $cfg.serve.max_message_bytes | int64 | toString | quote }}
# Ray no longer sets CUDA_VISIBLE_DEVICES for workers given no GPU (ray-project/ray#54868), so a
# replica with num_gpus 0 on a GPU worker would see the pod's GPUs and config.model.device "auto"
# would load it onto a GPU another replica holds. "1" makes Ray hide them (CUDA_VISIBLE_DEVICES="").
- name: RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO
  value: "1"
- name: SMARTPATH_STORAGE__ENDPOINT
  value: {{ include "smartpath.storage.endpoint" . | quote }}
- name: SMARTPATH_STORAGE__SECURE
  value: {{ include "smartpath.storage.secure" . | quote }}
{{- with include "smartpath.storage.region" . }}
- name: SMARTPATH_STORAGE__REGION
  value: {{ . | quote }}
{{- end }}
- name: SMARTPATH_STORAGE__ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $creds.secretName }}
      key: {{ $creds.accessKeyKey }}
- name: SMARTPATH_STORAGE__SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $creds.secretName }}
      key: {{ $creds.secretKeyKey }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
smartpath.volumes: volumes of a SmartPath pod (dict "root" $ "configMap" NAME "auth" BOOL
"modelCache" BOOL): the config file, the tokens file (auth), an emptyDir at each writable path of
the read-only image, the model cache (modelCache: an emptyDir, or modelCache.existingClaim) and
extraVolumes. "ray-logs" is KubeRay's own name for /tmp/ray: the autoscaler sidecar KubeRay adds to the head
then mounts this same volume (it shares Ray's logs) instead of a second one.
*/}}
{{- define "smartpath.volumes" -}}
{{- $v := .root.Values.volumes -}}
- name: config
  configMap:
    name: {{ .configMap }}
    items:
      - key: config.yaml
        path: config.yaml
{{- if .auth }}
- name: auth-tokens
  secret:
    secretName: {{ include "smartpath.auth.secretName" .root }}
    defaultMode: 0440
    items:
      - key: {{ .root.Values.auth.secretKey }}
        path: tokens
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: {{ $v.tmp.sizeLimit }}
- name: ray-logs
  emptyDir:
    sizeLimit: {{ $v.rayTmp.sizeLimit }}
- name: smartpath-home
  emptyDir:
    sizeLimit: {{ $v.home.sizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: {{ $v.cache.sizeLimit }}
{{- if .modelCache }}
{{- with .root.Values.modelCache }}
- name: model-cache
  {{- if .existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .existingClaim }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .sizeLimit }}
  {{- end }}
{{- end }}
{{- end }}
# Ray's object store and NCCL use /dev/shm; a container's default is 64 MiB.
- name: dshm
  emptyDir:
    medium: Memory
    {{- with $v.shm.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- with .root.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
smartpath.volumeMounts: mounts matching smartpath.volumes (dict "root" $ "auth" BOOL "modelCache"
BOOL), plus extraVolumeMounts. The model cache is mounted inside ~/.smartpath (see
smartpath.modelCache.initContainer).
*/}}
{{- define "smartpath.volumeMounts" -}}
- name: config
  mountPath: /etc/smartpath
  readOnly: true
{{- if .auth }}
- name: auth-tokens
  mountPath: {{ include "smartpath.auth.tokenFile" .root | dir }}
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
- name: ray-logs
  mountPath: /tmp/ray
- name: smartpath-home
  mountPath: /home/smartpath/.smartpath
- name: cache
  mountPath: /home/smartpath/.cache
{{- if .modelCache }}
- name: model-cache
  mountPath: {{ include "smartpath.modelCache.path" .root }}
{{- end }}
- name: dshm
  mountPath: /dev/shm
{{- with .root.Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
smartpath.resources: container resources with `gpus` NVIDIA GPUs and, when set, `ephemeralStorage`
of local disk added to requests and limits (dict "resources" MAP "gpus" N "ephemeralStorage" QTY).
*/}}
{{- define "smartpath.resources" -}}
{{- $res := deepCopy (.resources | default dict) }}
{{- $add := dict }}
{{- if gt (int .gpus) 0 }}
{{- $_ := set $add "nvidia.com/gpu" (toString (int .gpus)) }}
{{- end }}
{{- with .ephemeralStorage }}
{{- $_ := set $add "ephemeral-storage" (toString .) }}
{{- end }}
{{- if $add }}
{{- $_ := set $res "requests" (merge (deepCopy $add) ($res.requests | default dict)) }}
{{- $_ := set $res "limits" (merge (deepCopy $add) ($res.limits | default dict)) }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* ============================== model cache and local disk ============================== */}}

{{/*
smartpath.modelCache.path: where checkpoints downloaded from object storage are cached
(smartpath.model.checkpoint.DEFAULT_CACHE_DIR under the image's HOME).
*/}}
{{- define "smartpath.modelCache.path" -}}
/home/smartpath/.smartpath/cache/models
{{- end }}

{{/*
smartpath.modelCache.initContainer: creates the model cache's mount point in the ~/.smartpath
emptyDir as the image's user. Left to the container runtime, the folders of a nested mount point
are made by root, and ~/.smartpath/cache (where the slide cache lives too) would not be writable.
*/}}
{{- define "smartpath.modelCache.initContainer" -}}
- name: smartpath-dirs
  image: {{ include "smartpath.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["mkdir", "-p", {{ include "smartpath.modelCache.path" . | quote }}]
  resources:
    requests:
      cpu: 10m
      memory: 16Mi
    limits:
      cpu: 100m
      memory: 64Mi
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: smartpath-home
      mountPath: /home/smartpath/.smartpath
{{- end }}

{{/*
smartpath.headRunsReplicas: "true" when Serve replicas can run on the head, i.e. unless
head.rayStartParams sets num-cpus to 0 (without it KubeRay gives the head its CPU limit).
*/}}
{{- define "smartpath.headRunsReplicas" -}}
{{- $cpus := toString (get (.Values.head.rayStartParams | default dict) "num-cpus") }}
{{- if or (eq $cpus "") (ne (float64 $cpus) 0.0) }}true{{ end }}
{{- end }}

{{/*
smartpath.quantityBytes: a storage quantity ("20Gi", "512Mi", "1.5G") in bytes (a float).
*/}}
{{- define "smartpath.quantityBytes" -}}
{{- $q := toString . }}
{{- $num := regexFind "^[0-9]+([.][0-9]+)?" $q }}
{{- $unit := trimPrefix $num $q }}
{{- $units := dict "" 1 "k" 1000 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 }}
{{- if or (not $num) (not (hasKey $units $unit)) }}
{{- fail (printf "%q is not a storage quantity such as 20Gi" $q) }}
{{- end }}
{{- mulf (float64 $num) (get $units $unit) }}
{{- end }}

{{/*
smartpath.podDiskBytes: bytes of the disk-backed emptyDirs of a SmartPath pod (dict "root" $
"modelCache" BOOL): volumes.tmp, rayTmp, home and cache, plus modelCache.sizeLimit when the model
cache is mounted as an emptyDir. /dev/shm is memory-backed and counts against memory instead.
*/}}
{{- define "smartpath.podDiskBytes" -}}
{{- $v := .root.Values.volumes }}
{{- $sizes := list $v.tmp.sizeLimit $v.rayTmp.sizeLimit $v.home.sizeLimit $v.cache.sizeLimit }}
{{- if and .modelCache (not .root.Values.modelCache.existingClaim) }}
{{- $sizes = append $sizes .root.Values.modelCache.sizeLimit }}
{{- end }}
{{- $sum := 0.0 }}
{{- range $sizes }}
{{- $sum = addf $sum (include "smartpath.quantityBytes" . | float64) }}
{{- end }}
{{- $sum }}
{{- end }}

{{/*
smartpath.rayStartParams: a rayStartParams map with every value quoted (the CRD wants strings).
*/}}
{{- define "smartpath.rayStartParams" -}}
{{- $params := dict }}
{{- range $key, $value := . }}
{{- $_ := set $params $key (toString $value) }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/*
smartpath.tolerations: a pod's tolerations (dict "tolerations" LIST "gpus" N): the given ones, plus
the `nvidia.com/gpu` NoSchedule taint's when the pod requests GPUs and no given toleration
already covers that key (GPU nodes are usually tainted so that only GPU pods land there).
*/}}
{{- define "smartpath.tolerations" -}}
{{- $tolerations := .tolerations | default list }}
{{- if gt (int .gpus) 0 }}
{{- $covered := false }}
{{- range $tolerations }}
{{- if or (eq (.key | default "") "nvidia.com/gpu") (and (not .key) (eq (.operator | default "") "Exists")) }}
{{- $covered = true }}
{{- end }}
{{- end }}
{{- if not $covered }}
{{- $tolerations = append $tolerations (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule") }}
{{- end }}
{{- end }}
{{- with $tolerations }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/*
smartpath.rayCommand: the Ray container's command. The Ray cluster carries
`ray.io/overwrite-container-cmd: "true"`, so KubeRay leaves the command alone and hands its
generated `ray start … --block` over in $KUBERAY_GEN_RAY_START_CMD. tini runs as PID 1 and
forwards SIGTERM to the process group (-g); bash raises the open-file limit as KubeRay would and
then execs `ray start` (eval keeps KubeRay's quoting), so the signal reaches Ray at once instead
of stopping at a bash PID 1 that ignores it until the grace period ends in SIGKILL.
*/}}
{{- define "smartpath.rayCommand" -}}
- tini
- -g
- --
- bash
- -c
- 'ulimit -n "${RAY_START_ULIMIT_OPEN_FILES:-65536}"; eval "exec ${KUBERAY_GEN_RAY_START_CMD:?KubeRay did not set KUBERAY_GEN_RAY_START_CMD}"'
{{- end }}

{{/*
smartpath.rayPodTemplate: the pod template of a Ray head or worker (dict "root" $ "component" C
"container" NAME "head" BOOL "resources" MAP "gpus" N "ports" LIST "group" MAP-with-scheduling
"configMap" NAME "auth" BOOL "storageRole" "serving"|"training", and optionally "ephemeralStorage"
QTY "modelCache" BOOL "drain" BOOL). Container 0 is the Ray container (smartpath.rayCommand runs
KubeRay's `ray start`). The head mounts the ServiceAccount token when the autoscaler sidecar runs
(it patches the RayCluster); other pods do not need the Kubernetes API. Every pod of one Ray
cluster carries its component label (serving, training-sft, training-grpo): the NetworkPolicies
scope Ray's ports by it.

The pod labels are only the selector labels, the component and the group's podLabels: no
helm.sh/chart, app.kubernetes.io/version or commonLabels. KubeRay hashes the whole Ray cluster
spec (pod templates included) to decide whether a RayService needs a new cluster, so a label that
changes with every chart release would start a whole new Ray cluster, GPUs included, on each
`helm upgrade` (see README, "Upgrades").

"drain" (serving workers): a preStop hook (`python -m smartpath.services.drain`) asks Ray to drain
the node and waits until its Serve proxy has stopped, within drain.timeoutSeconds, and the pod
gets drain.terminationGracePeriodSeconds to do it.
*/}}
{{- define "smartpath.rayPodTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "smartpath.componentSelectorLabels" (dict "root" $root "component" .component) | nindent 4 }}
    smartpath.io/ray: "true"
    {{- with .group.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .group.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "smartpath.serviceAccountName" $root }}
  automountServiceAccountToken: {{ if and .head $root.Values.ray.enableInTreeAutoscaling }}true{{ else }}false{{ end }}
  {{- with .group.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- if .drain }}
  terminationGracePeriodSeconds: {{ $root.Values.drain.terminationGracePeriodSeconds }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with include "smartpath.tolerations" (dict "tolerations" .group.tolerations "gpus" .gpus) }}
  tolerations:
    {{- . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .modelCache }}
  initContainers:
    {{- include "smartpath.modelCache.initContainer" $root | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ include "smartpath.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command:
        {{- include "smartpath.rayCommand" $root | nindent 8 }}
      {{- with .ports }}
      ports:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      env:
        {{- include "smartpath.env" (dict "root" $root "role" (required "smartpath.rayPodTemplate needs storageRole" .storageRole)) | nindent 8 }}
      {{- with $root.Values.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if .drain }}
      lifecycle:
        preStop:
          exec:
            command:
              - python
              - -m
              - smartpath.services.drain
              - --timeout-s
              - {{ $root.Values.drain.timeoutSeconds | quote }}
              - --health-url
              - {{ printf "http://127.0.0.1:%v/-/healthz" $root.Values.config.serve.http_port | quote }}
      {{- end }}
      resources:
        {{- include "smartpath.resources" (dict "resources" .resources "gpus" .gpus "ephemeralStorage" .ephemeralStorage) | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      volumeMounts:
        {{- include "smartpath.volumeMounts" (dict "root" $root "auth" .auth "modelCache" .modelCache) | nindent 8 }}
  volumes:
    {{- include "smartpath.volumes" (dict "root" $root "configMap" .configMap "auth" .auth "modelCache" .modelCache) | nindent 4 }}
{{- end }}

{{/* ============================== checks ============================== */}}

{{/*
smartpath.validate: combinations values.schema.json cannot express; fails the render with the fix.
*/}}
{{- define "smartpath.validate" -}}
{{- $serve := .Values.config.serve | default dict }}
{{- range $service := include "smartpath.services" . | fromJsonArray }}
{{- $app := $service.app }}
{{- $d := get $serve $app | default dict }}
{{- if and (gt (float64 ($d.num_gpus | default 0)) 0.0) (not $.Values.workers.gpu.enabled) }}
{{- fail (printf "config.serve.%s.num_gpus is %v but workers.gpu.enabled=false: no Ray node has a GPU, so its replicas would never start. Enable the GPU worker group or set num_gpus to 0." $app $d.num_gpus) }}
{{- end }}
{{- end }}
{{- /* Each Ray pod's ephemeral-storage covers the emptyDirs it mounts (else the kubelet may evict
  it before any one volume reaches its sizeLimit, and the scheduler would under-count its disk). */}}
{{- $pods := list (dict "key" "head.ephemeralStorage" "size" .Values.head.ephemeralStorage "modelCache" (eq (include "smartpath.headRunsReplicas" .) "true")) }}
{{- range $kind := list "cpu" "gpu" }}
{{- $group := get $.Values.workers $kind }}
{{- if $group.enabled }}
{{- $pods = append $pods (dict "key" (printf "workers.%s.ephemeralStorage" $kind) "size" $group.ephemeralStorage "modelCache" true) }}
{{- end }}
{{- end }}
{{- range $pod := $pods }}
{{- $need := include "smartpath.podDiskBytes" (dict "root" $ "modelCache" $pod.modelCache) | float64 }}
{{- if lt (include "smartpath.quantityBytes" $pod.size | float64) $need }}
{{- fail (printf "%s=%v is less than the %.2fGi of emptyDirs its pod mounts (volumes.tmp/rayTmp/home/cache.sizeLimit%s): raise it or lower those sizes" $pod.key $pod.size (divf $need 1073741824) (ternary " + modelCache.sizeLimit" "" (and $pod.modelCache (not $.Values.modelCache.existingClaim)))) }}
{{- end }}
{{- end }}
{{- with .Values.drain }}
{{- if .enabled }}
{{- if le (int .terminationGracePeriodSeconds) (int .timeoutSeconds) }}
{{- fail (printf "drain.terminationGracePeriodSeconds=%v must exceed drain.timeoutSeconds=%v: the kubelet kills the pod when the grace period ends, preStop hook included" .terminationGracePeriodSeconds .timeoutSeconds) }}
{{- end }}
{{- if lt (float64 .timeoutSeconds) (float64 ($serve.deadline_s | default 0)) }}
{{- fail (printf "drain.timeoutSeconds=%v is less than config.serve.deadline_s=%v: an analysis in flight when its pod is drained could not finish" .timeoutSeconds $serve.deadline_s) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not (or .Values.workers.cpu.enabled .Values.workers.gpu.enabled) }}
{{- fail "workers.cpu.enabled and workers.gpu.enabled are both false: the head runs no replicas (num-cpus 0), so at least one worker group is needed" }}
{{- end }}
{{- if not .Values.minio.enabled }}
{{- $ext := .Values.externalStorage }}
{{- if and (not $ext.existingSecret) (ne (empty $ext.accessKey) (empty $ext.secretKey)) }}
{{- fail "externalStorage.accessKey and externalStorage.secretKey go together: set both (or externalStorage.existingSecret)" }}
{{- end }}
{{- $shared := or $ext.existingSecret (and $ext.accessKey $ext.secretKey) }}
{{- range $role := include "smartpath.storage.roles" . | fromJsonArray }}
{{- if not (or (get $.Values.storage $role).existingSecret $shared) }}
{{- fail (printf "minio.enabled=false needs credentials for the %s pods: set storage.%s.existingSecret (recommended: an account with only that role's rights), or the shared externalStorage.existingSecret (or externalStorage.accessKey and externalStorage.secretKey)" $role $role) }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.minio.enabled }}
{{- range $role := include "smartpath.storage.roles" . | fromJsonArray }}
{{- if not (include "smartpath.minio.grants" (dict "root" $ "role" $role) | fromJson) }}
{{- fail (printf "minio.policies.%s grants no bucket: the %s pods' MinIO user could reach nothing (list its buckets under read, readWrite or write)" $role $role) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (eq .Values.ray.authOptions.mode "token") (not (semverCompare ">=2.52.0-0" (toString .Values.ray.version))) }}
{{- fail (printf "ray.authOptions.mode=token needs Ray 2.52.0 or newer (ray.version is %s)" .Values.ray.version) }}
{{- end }}
{{- if and .Values.ingress.enabled .Values.ingress.tls.enabled (not .Values.ingress.tls.secretName) }}
{{- fail "ingress.tls.enabled needs ingress.tls.secretName (a kubernetes.io/tls Secret, or one cert-manager fills)" }}
{{- end }}
{{- if .Values.training.enabled }}
{{- $dist := (.Values.training.config | default dict).distributed | default dict }}
{{- if and $dist.use_gpu (eq (int .Values.training.workers.gpus) 0) }}
{{- fail "training.config.distributed.use_gpu=true but training.workers.gpus=0: give the training workers GPUs" }}
{{- end }}
{{- end }}
{{- end }}
