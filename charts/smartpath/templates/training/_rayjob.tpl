{{/*
smartpath.rayjob: a training RayJob (dict "root" $ "kind" "sft"|"grpo"), the manifest
`smartpath train submit` builds (training/rayjob.py): entrypoint
`python -m smartpath.training.<kind> --config /etc/smartpath/config.yaml` in K8sJobMode, storage
env from the training role's Secret (its own MinIO user, not the root account), the training
config from a ConfigMap at /etc/smartpath, a fixed worker group (replicas = min = max), and the
cluster deleted ttlSecondsAfterFinished after the job ends (only with shutdownAfterJobFinishes:
KubeRay refuses a TTL without it). The job's name carries the run name (training.config.name),
so a new run is a new RayJob: KubeRay never re-runs a finished one, whatever its spec says.
The head has num-cpus 0, so Train workers (and their CPUs) always land on the worker pods; Ray
Train's controller actor asks for no CPU and runs next to the driver on the head.
*/}}
{{- define "smartpath.rayjob" -}}
{{- $root := .root -}}
{{- $t := $root.Values.training -}}
{{- $component := printf "training-%s" .kind -}}
{{- $config := include "smartpath.componentName" (dict "root" $root "suffix" "training-config") -}}
{{- $workerGroup := ternary "gpu-workers" "cpu-workers" (gt (int $t.workers.gpus) 0) -}}
apiVersion: ray.io/v1
kind: RayJob
metadata:
  name: {{ include "smartpath.rayJobName" (dict "root" $root "kind" .kind) }}
  labels:
    {{- include "smartpath.componentLabels" (dict "root" $root "component" $component) | nindent 4 }}
    smartpath.io/run: {{ include "smartpath.runSlug" $root | quote }}
  annotations:
    # KubeRay keeps the Ray containers' command (smartpath.rayCommand: tini, then its `ray start`).
    ray.io/overwrite-container-cmd: "true"
spec:
  entrypoint: python -m smartpath.training.{{ .kind }} --config /etc/smartpath/config.yaml
  submissionMode: K8sJobMode
  shutdownAfterJobFinishes: {{ $t.shutdownAfterJobFinishes }}
  {{- if $t.shutdownAfterJobFinishes }}
  ttlSecondsAfterFinished: {{ $t.ttlSecondsAfterFinished }}
  {{- end }}
  {{- with $t.activeDeadlineSeconds }}
  activeDeadlineSeconds: {{ . }}
  {{- end }}
  {{- with $t.runtimeEnv }}
  runtimeEnvYAML: |
    {{- toYaml . | nindent 4 }}
  {{- end }}
  # The pod that runs `ray job submit` (KubeRay fills in the command); restricted like the rest.
  submitterPodTemplate:
    metadata:
      labels:
        {{- include "smartpath.componentLabels" (dict "root" $root "component" $component) | nindent 8 }}
        smartpath.io/ray-submitter: "true"
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-job-submitter
          image: {{ include "smartpath.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          resources:
            {{- toYaml $t.submitter.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: cache
              mountPath: /home/smartpath/.cache
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 256Mi
        - name: cache
          emptyDir:
            sizeLimit: 256Mi
  rayClusterSpec:
    rayVersion: {{ $root.Values.ray.version | quote }}
    {{- if eq $root.Values.ray.authOptions.mode "token" }}
    # Ray token auth: KubeRay makes a token Secret for the job's cluster (submitter included).
    authOptions:
      mode: token
    {{- end }}
    headGroupSpec:
      # No CPUs for Ray tasks: Train workers must not land on the head (as in training/rayjob.py).
      rayStartParams:
        num-cpus: "0"
      template:
        {{- include "smartpath.rayPodTemplate" (dict
          "root" $root "component" $component "container" "ray-head" "head" false
          "resources" $t.head.resources "gpus" 0
          "ports" (list (dict "name" "gcs-server" "containerPort" 6379) (dict "name" "dashboard" "containerPort" 8265) (dict "name" "client" "containerPort" 10001) (dict "name" "metrics" "containerPort" 8080))
          "group" (dict "priorityClassName" $t.priorityClassName) "configMap" $config "auth" false "storageRole" "training") | nindent 8 }}
    workerGroupSpecs:
      - groupName: {{ $workerGroup }}
        replicas: {{ $t.workers.replicas }}
        minReplicas: {{ $t.workers.replicas }}
        maxReplicas: {{ $t.workers.replicas }}
        rayStartParams: {}
        template:
          {{- include "smartpath.rayPodTemplate" (dict
            "root" $root "component" $component "container" "ray-worker" "head" false
            "resources" $t.workers.resources "gpus" $t.workers.gpus
            "ports" (list (dict "name" "metrics" "containerPort" 8080))
            "group" (merge (dict "priorityClassName" $t.priorityClassName) $t.workers) "configMap" $config
            "auth" false "storageRole" "training") | nindent 10 }}
{{- end }}
