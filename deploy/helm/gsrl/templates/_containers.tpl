{{/* The three gsrl containers, one definition each, used by whatever pods run the role (gsrl.podPlan):
(dict "ctx" $ "plan" $plan "gpu" <the role's gpu plan> "metricsPort" <its metrics port name>). */}}

{{- define "gsrl.container.env-server" -}}
{{- $ctx := .ctx }}
{{- $role := $ctx.Values.envServer }}
{{- $gsrlArgs := list "--config" "/etc/gsrl/run.yaml" "--index" "0"
      (printf "env_server.policy_address=%s" (include "gsrl.policyAddress" $ctx))
      (printf "env_server.metrics_port=%d" (int $role.metricsPort)) }}
{{- $gsrlArgs = concat $gsrlArgs $role.extraArgs }}
- name: env-server
  image: {{ include "gsrl.image" $ctx }}
  imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
  {{- if $role.seedFromPodName }}
  # A Deployment's pods have no ordinal, so all run --index 0; the shell gives each its own env seed.
  args:
    - /bin/sh
    - -c
    - exec gsrl env-server "$@" run.seed="$(printf '%s/%s' "$RUN_SEED" "$POD_NAME" | cksum | cut -d ' ' -f 1)"
    - gsrl-env-server
    {{- toYaml $gsrlArgs | nindent 4 }}
  {{- else }}
  args:
    - gsrl
    - env-server
    {{- toYaml $gsrlArgs | nindent 4 }}
  {{- end }}
  env:
    {{- include "gsrl.env.common" (dict "ctx" $ctx "role" $role "gpu" .gpu) | nindent 4 }}
    - name: RUN_SEED
      value: {{ dig "run" "seed" 0 $ctx.Values.run | int | quote }}
    {{- if .gpu.useGpu }}
    # SAPIEN renders through Vulkan: the NVIDIA runtime must mount the graphics libraries too.
    - name: NVIDIA_DRIVER_CAPABILITIES
      value: compute,utility,graphics
    {{- end }}
    {{- with $role.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: {{ .metricsPort }}
      containerPort: {{ $role.metricsPort }}
      protocol: TCP
  startupProbe:
    {{- include "gsrl.httpProbe" (dict "port" .metricsPort "timing" $role.probes.startup) | nindent 4 }}
  livenessProbe:
    {{- include "gsrl.httpProbe" (dict "port" .metricsPort "timing" $role.probes.liveness) | nindent 4 }}
  readinessProbe:
    {{- include "gsrl.httpProbe" (dict "port" .metricsPort "timing" $role.probes.readiness) | nindent 4 }}
  resources:
    {{- include "gsrl.resources" (dict "ctx" $ctx "role" $role "gpus" .gpu.request) | nindent 4 }}
  securityContext:
    {{- include "gsrl.containerSecurityContext" $ctx | nindent 4 }}
  volumeMounts:
    {{- include "gsrl.volumeMounts.common" (dict "ctx" $ctx "role" .plan.podRole) | nindent 4 }}
{{- end }}

{{- define "gsrl.container.policy-server" -}}
{{- $ctx := .ctx }}
{{- $role := $ctx.Values.policyServer }}
{{- $args := list "gsrl" "policy-server" "--config" "/etc/gsrl/run.yaml"
      (printf "policy_server.host=%s" $role.bindAddress)
      (printf "policy_server.port=%d" (int $role.port))
      (printf "policy_server.metrics_port=%d" (int $role.metricsPort))
      (printf "policy_server.device=%s" (ternary "cuda" "cpu" .gpu.useGpu)) }}
{{- $args = concat $args $role.extraArgs }}
- name: policy-server
  image: {{ include "gsrl.image" $ctx }}
  imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
  # The Redis URL (with its password) comes from GSRL_REDIS_URL, the default of --redis-url, so the
  # password is not on the command line.
  args:
    {{- toYaml $args | nindent 4 }}
  env:
    {{- include "gsrl.env.common" (dict "ctx" $ctx "role" $role "gpu" .gpu) | nindent 4 }}
    {{- include "gsrl.redis.env" $ctx | nindent 4 }}
    {{- with $role.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: grpc
      containerPort: {{ $role.port }}
      protocol: TCP
    - name: {{ .metricsPort }}
      containerPort: {{ $role.metricsPort }}
      protocol: TCP
  # Native gRPC probes: the server implements grpc.health.v1 ("" and gsrl.v1.PolicyService).
  startupProbe:
    {{- include "gsrl.grpcProbe" (dict "port" $role.port "timing" $role.probes.startup) | nindent 4 }}
  livenessProbe:
    {{- include "gsrl.grpcProbe" (dict "port" $role.port "timing" $role.probes.liveness) | nindent 4 }}
  readinessProbe:
    {{- include "gsrl.grpcProbe" (dict "port" $role.port "timing" $role.probes.readiness) | nindent 4 }}
  resources:
    {{- include "gsrl.resources" (dict "ctx" $ctx "role" $role "gpus" .gpu.request) | nindent 4 }}
  securityContext:
    {{- include "gsrl.containerSecurityContext" $ctx | nindent 4 }}
  volumeMounts:
    {{- include "gsrl.volumeMounts.common" (dict "ctx" $ctx "role" .plan.podRole) | nindent 4 }}
{{- end }}

{{- define "gsrl.container.learner" -}}
{{- $ctx := .ctx }}
{{- $role := $ctx.Values.learner }}
{{- $nproc := int (include "gsrl.learner.nproc" $ctx) }}
{{- $worldSize := int (include "gsrl.learner.worldSize" $ctx) }}
{{- $useCuda := gt (int $role.gpus) 0 }}
{{- $broadcast := dig "learner" "broadcast_backend" "auto" $ctx.Values.run }}
{{- if eq $broadcast "auto" }}
{{- /* NCCL only when both ends hold a GPU; a CPU policy server can only join a gloo group. Nor can NCCL put two
members on one GPU: a shared pod with one GPU runs its policy server on learner rank 0's. */}}
{{- $policyOnRankZeroGpu := and (eq (include "gsrl.preset" $ctx) "shared") (eq (int .plan.gpus) 1) }}
{{- $broadcast = ternary "nccl" "gloo" (and $useCuda (gt (int $ctx.Values.policyServer.gpus) 0) (not $policyOnRankZeroGpu)) }}
{{- end }}
{{- $runName := dig "run" "name" "gsrl" $ctx.Values.run }}
{{- $args := list "/bin/sh" "-c"
      (printf "exec torchrun \"$@\" learner.metrics_port=\"$((%d - POD_INDEX * %d))\"" (int $role.metricsPort) $nproc)
      "gsrl-learner"
      (printf "--nnodes=%d" (int $role.replicas))
      (printf "--nproc-per-node=%d" $nproc)
      "--node-rank=$(POD_INDEX)"
      (printf "--master-addr=%s" (include "gsrl.learner.masterAddr" $ctx))
      (printf "--master-port=%d" (int $role.masterPort))
      "--max-restarts=0"
      "-m" "services.learner"
      "--config" "/etc/gsrl/run.yaml"
      (printf "learner.world_size=%d" $worldSize)
      "learner.advertise_host=$(POD_IP)"
      (printf "learner.master_port=%d" (int $role.masterPort))
      (printf "learner.broadcast_port=%d" (int $role.broadcastPort))
      (printf "learner.device=%s" (ternary "cuda" "cpu" $useCuda))
      (printf "learner.broadcast_backend=%s" $broadcast) }}
{{- $args = concat $args $role.extraArgs }}
- name: learner
  image: {{ include "gsrl.image" $ctx }}
  imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
  # torchrun starts max(gpus, 1) ranks per pod; node rank = the pod's ordinal. The learner serves metrics on
  # learner.metrics_port + global rank, so the shell shifts the base by node_rank x nproc: local rank r of
  # every pod listens on metricsPort + r, and the probes and Service ports are the same for all pods.
  args:
    {{- toYaml $args | nindent 4 }}
  env:
    {{- include "gsrl.env.common" (dict "ctx" $ctx "role" $role "gpu" .gpu) | nindent 4 }}
    - name: POD_INDEX
      valueFrom:
        fieldRef:
          fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
    - name: GSRL_RUN_DIR
      value: /runs/{{ $runName }}
    {{- include "gsrl.redis.env" $ctx | nindent 4 }}
    # On SIGTERM torchrun passes it on and SIGKILLs its ranks after this many seconds (default 30): leave
    # them the pod's grace period, less a margin, to finish the update and checkpoint.
    - name: TORCH_ELASTIC_SHUTDOWN_TIMEOUT
      value: {{ max 1 (sub (int .plan.podRole.terminationGracePeriodSeconds) 15) | quote }}
    # A timed-out NCCL broadcast to a dead policy server must raise, not tear the rank down.
    - name: TORCH_NCCL_ASYNC_ERROR_HANDLING
      value: "2"
    {{- with $role.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: rendezvous
      containerPort: {{ $role.masterPort }}
      protocol: TCP
    - name: broadcast
      containerPort: {{ $role.broadcastPort }}
      protocol: TCP
    {{- range $rank := until $nproc }}
    - name: metrics-{{ $rank }}
      containerPort: {{ add $role.metricsPort $rank }}
      protocol: TCP
    {{- end }}
  startupProbe:
    {{- include "gsrl.httpProbe" (dict "port" "metrics-0" "timing" $role.probes.startup) | nindent 4 }}
  livenessProbe:
    {{- include "gsrl.httpProbe" (dict "port" "metrics-0" "timing" $role.probes.liveness) | nindent 4 }}
  readinessProbe:
    {{- include "gsrl.httpProbe" (dict "port" "metrics-0" "timing" $role.probes.readiness) | nindent 4 }}
  resources:
    {{- include "gsrl.resources" (dict "ctx" $ctx "role" $role "gpus" .gpu.request) | nindent 4 }}
  securityContext:
    {{- include "gsrl.containerSecurityContext" $ctx | nindent 4 }}
  volumeMounts:
    {{- include "gsrl.volumeMounts.common" (dict "ctx" $ctx "role" .plan.podRole) | nindent 4 }}
    - name: run-dir
      mountPath: /runs
{{- end }}
