{{/* Names ------------------------------------------------------------------------------------------------- */}}

{{- define "gsrl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The object-name prefix: the release name, plus the chart name unless the release name already holds it. */}}
{{- define "gsrl.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gsrl.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels: call with (dict "ctx" $ "component" "env-server"). */}}
{{- define "gsrl.labels" -}}
helm.sh/chart: {{ include "gsrl.chart" .ctx }}
{{ include "gsrl.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: gsrl
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "gsrl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gsrl.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{- define "gsrl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gsrl.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gsrl.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Fully-qualified DNS name of a Service of this release: (dict "ctx" $ "service" "policy-server-headless"). */}}
{{- define "gsrl.serviceFQDN" -}}
{{- printf "%s-%s.%s.svc.%s" (include "gsrl.fullname" .ctx) .service .ctx.Release.Namespace .ctx.Values.clusterDomain }}
{{- end }}

{{/* Topology --------------------------------------------------------------------------------------------- */}}

{{/* What env servers dial: under `separate` the headless Service, resolved by gRPC's DNS resolver to one address per
ready pod; where env and policy servers share a pod (shared, hybrid), the policy server next to them. */}}
{{- define "gsrl.policyAddress" -}}
{{- if eq (include "gsrl.preset" .) "separate" }}
{{- printf "dns:///%s:%d" (include "gsrl.serviceFQDN" (dict "ctx" . "service" "policy-server-headless")) (int .Values.policyServer.port) }}
{{- else }}
{{- printf "localhost:%d" (int .Values.policyServer.port) }}
{{- end }}
{{- end }}

{{- define "gsrl.learner.nproc" -}}
{{- max 1 (int .Values.learner.gpus) }}
{{- end }}

{{- define "gsrl.learner.worldSize" -}}
{{- mul (int .Values.learner.replicas) (int (include "gsrl.learner.nproc" .)) }}
{{- end }}

{{/* Learner rank 0's pod: pod 0 of the StatefulSet that runs the learners (learner, or worker under `shared`). */}}
{{- define "gsrl.learner.masterAddr" -}}
{{- printf "%s-%s-0.%s" (include "gsrl.fullname" .) (include "gsrl.hostOf" (dict "ctx" . "role" "learner")) (include "gsrl.serviceFQDN" (dict "ctx" . "service" "learner-headless")) }}
{{- end }}

{{/* Redis ------------------------------------------------------------------------------------------------ */}}

{{- define "gsrl.redis.bundled" -}}
{{- if not .Values.redis.external.url }}true{{ end }}
{{- end }}

{{/* The Secret and key that hold the password, or nothing when there is none. */}}
{{- define "gsrl.redis.secretName" -}}
{{- if .Values.redis.external.url }}
{{- .Values.redis.external.existingSecret }}
{{- else if .Values.redis.auth.enabled }}
{{- default (printf "%s-redis" (include "gsrl.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}
{{- end }}

{{- define "gsrl.redis.secretKey" -}}
{{- if .Values.redis.external.url }}
{{- .Values.redis.external.existingSecretPasswordKey }}
{{- else }}
{{- .Values.redis.auth.existingSecretPasswordKey }}
{{- end }}
{{- end }}

{{/* REDIS_PASSWORD from the Secret, then GSRL_REDIS_URL built from it with Kubernetes' $(VAR) interpolation, so
the password never appears in the pod spec. */}}
{{- define "gsrl.redis.env" -}}
{{- $secret := include "gsrl.redis.secretName" . }}
{{- $auth := "" }}
{{- if $secret }}
{{- $auth = ":$(REDIS_PASSWORD)@" -}}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ include "gsrl.redis.secretKey" . }}
{{- end }}
- name: GSRL_REDIS_URL
{{- if .Values.redis.external.url }}
  value: {{ regexReplaceAll "^(rediss?://)" .Values.redis.external.url (printf "${1}%s" $auth) | quote }}
{{- else }}
  value: {{ printf "redis://%s%s:%d/%d" $auth (include "gsrl.serviceFQDN" (dict "ctx" . "service" "redis")) (int .Values.redis.port) (int (dig "redis" "db" 0 .Values.run)) | quote }}
{{- end }}
{{- end }}

{{/* Pods ------------------------------------------------------------------------------------------------- */}}

{{/* Requests and limits with the role's GPUs added to both: (dict "ctx" $ "role" .Values.learner), or with "gpus" N
to request N instead (a co-located pod requests its GPUs on one container). */}}
{{- define "gsrl.resources" -}}
{{- $res := deepCopy (default (dict) .role.resources) }}
{{- $gpus := int (ternary .gpus .role.gpus (hasKey . "gpus")) }}
{{- if gt $gpus 0 }}
{{- $requests := default (dict) (get $res "requests") }}
{{- $limits := default (dict) (get $res "limits") }}
{{- $_ := set $requests .ctx.Values.gpuResourceName $gpus }}
{{- $_ := set $limits .ctx.Values.gpuResourceName $gpus }}
{{- $_ := set $res "requests" $requests }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* Pod-level fields every gsrl role shares: (dict "ctx" $ "role" .Values.envServer). */}}
{{- define "gsrl.podSpecCommon" -}}
serviceAccountName: {{ include "gsrl.serviceAccountName" .ctx }}
automountServiceAccountToken: {{ .ctx.Values.serviceAccount.automountToken }}
enableServiceLinks: false
terminationGracePeriodSeconds: {{ .role.terminationGracePeriodSeconds }}
securityContext:
  {{- toYaml .ctx.Values.podSecurityContext | nindent 2 }}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .role.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod metadata: labels and the run-config checksum (a changed run.yaml restarts the pods). */}}
{{- define "gsrl.podMetadata" -}}
labels:
  {{- include "gsrl.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 2 }}
  {{- with .role.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  checksum/run-config: {{ toYaml .ctx.Values.run | sha256sum }}
  {{- with .role.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Environment every gsrl container gets. */}}
{{- define "gsrl.env.common" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: HOME
  value: /home/gsrl
{{- $gpu := default (dict "visible" (ternary "void" "" (eq (int .role.gpus) 0))) .gpu }}
{{- if eq $gpu.visible "void" }}
# CUDA images set NVIDIA_VISIBLE_DEVICES=all: a CPU pod on a GPU node would otherwise see every GPU there.
- name: NVIDIA_VISIBLE_DEVICES
  value: void
{{- else if eq $gpu.visible "all" }}
# Another container of this pod requests the GPUs; the NVIDIA runtime shows them here too
# (co-located pods own whole nodes: docs/placement.md).
- name: NVIDIA_VISIBLE_DEVICES
  value: all
{{- end }}
{{- with $gpu.cuda }}
# Co-located roles start on different GPUs of the pod: this container's own GPU first (its cuda:0).
- name: CUDA_VISIBLE_DEVICES
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{- define "gsrl.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{/* Writable scratch (/tmp, ~/.cache) for a read-only root filesystem, the run config, and /dev/shm. */}}
{{- define "gsrl.volumes.common" -}}
- name: run-config
  configMap:
    name: {{ include "gsrl.fullname" .ctx }}-run
- name: tmp
  emptyDir:
    sizeLimit: {{ .ctx.Values.scratchSizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: {{ .ctx.Values.scratchSizeLimit }}
{{- if .role.shmSize }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .role.shmSize }}
{{- end }}
{{- end }}

{{- define "gsrl.volumeMounts.common" -}}
- name: run-config
  mountPath: /etc/gsrl
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /home/gsrl/.cache
{{- if .role.shmSize }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- end }}

{{/* An HTTP probe on a metrics port: (dict "port" "metrics" "timing" .Values.envServer.probes.liveness). */}}
{{- define "gsrl.httpProbe" -}}
httpGet:
  path: /healthz
  port: {{ .port }}
periodSeconds: {{ .timing.periodSeconds }}
failureThreshold: {{ .timing.failureThreshold }}
timeoutSeconds: 5
{{- end }}

{{/* A native gRPC probe (grpc.health.v1): (dict "port" 50051 "timing" .Values.policyServer.probes.liveness). */}}
{{- define "gsrl.grpcProbe" -}}
grpc:
  port: {{ .port }}
periodSeconds: {{ .timing.periodSeconds }}
failureThreshold: {{ .timing.failureThreshold }}
timeoutSeconds: 5
{{- end }}

{{- define "gsrl.pdb" -}}
{{- if and .role.pdb.enabled (or (gt (int .role.replicas) 0) (dig "autoscaling" "enabled" false .role)) }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "gsrl.fullname" .ctx }}-{{ .component }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "gsrl.labels" (dict "ctx" .ctx "component" .component) | nindent 4 }}
spec:
  maxUnavailable: {{ .role.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "gsrl.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 6 }}
{{- end }}
{{- end }}

{{/* Names of the learner pod's metrics ports (one per local rank), as a JSON list. */}}
{{- define "gsrl.learner.metricsPortNames" -}}
{{- $names := list }}
{{- range $rank := until (int (include "gsrl.learner.nproc" .)) }}
{{- $names = append $names (printf "metrics-%d" $rank) }}
{{- end }}
{{- toJson $names }}
{{- end }}
