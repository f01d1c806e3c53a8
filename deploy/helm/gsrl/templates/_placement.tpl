{{/* Placement: which pods run which roles, and how a pod's containers share its GPUs (docs/placement.md).

separate: env-server, policy-server and learner pods, each role requesting its own GPUs (the role blocks' `gpus`).
shared:   worker pods (a StatefulSet: learner.replicas torchrun nodes) each running a learner, a policy server and an
          env server container.
hybrid:   rollout pods (a Deployment: envServer.replicas) each running a policy server and an env server container,
          and the learners' own StatefulSet.

A co-located pod gets the most GPUs any of its roles asks for (`gpus`), requested by one container: the first of
(learner, policy server, env server) whose own `gpus` is > 0. The other containers of roles with `gpus` > 0 see them
through NVIDIA_VISIBLE_DEVICES=all (the NVIDIA container runtime's variable; it shows every GPU of the node, hence
whole-node pods), and a role with `gpus: 0` sees none. Pod-level settings (replicas, scheduling, PDB, labels) come
from the host role: the learner for worker pods, the env server for rollout pods; tolerations and node selectors of
all the pod's roles are merged, the grace period is the longest, /dev/shm the host's (or the first role's that sets
one). */}}

{{- define "gsrl.preset" -}}
{{- dig "preset" "separate" (default (dict) .Values.placement) }}
{{- end }}

{{/* The component whose pods run a role: (dict "ctx" $ "role" "env-server") -> env-server | rollout | worker. */}}
{{- define "gsrl.hostOf" -}}
{{- $preset := include "gsrl.preset" .ctx }}
{{- if eq $preset "shared" }}
{{- "worker" }}
{{- else if and (eq $preset "hybrid") (ne .role "learner") }}
{{- "rollout" }}
{{- else }}
{{- .role }}
{{- end }}
{{- end }}

{{/* Fill .out with the plan of one workload's pods: (dict "ctx" $ "component" "rollout" "out" $plan). Sets
roles (containers in order), podRole (the values pod-level fields are read from), gpus (the pod's), colocated, and
per role: gpu (request: GPUs this container requests, visible: void | all | "", cuda: CUDA_VISIBLE_DEVICES, useGpu)
and metricsPort (the name of its metrics port; unique within the pod). */}}
{{- define "gsrl.podPlan" -}}
{{- $ctx := .ctx }}
{{- $values := dict "env-server" $ctx.Values.envServer "policy-server" $ctx.Values.policyServer "learner" $ctx.Values.learner }}
{{- $roles := list .component }}
{{- $host := .component }}
{{- if eq .component "worker" }}
{{- $roles = list "learner" "policy-server" "env-server" }}
{{- $host = "learner" }}
{{- else if eq .component "rollout" }}
{{- $roles = list "policy-server" "env-server" }}
{{- $host = "env-server" }}
{{- end }}
{{- $colocated := gt (len $roles) 1 }}
{{- $gpu := dict }}
{{- $metricsPort := dict }}
{{- if not $colocated }}
{{- $role := index $values $host }}
{{- $gpus := int $role.gpus }}
{{- $_ := set .out "podRole" $role }}
{{- $_ := set .out "gpus" $gpus }}
{{- $_ := set $gpu $host (dict "request" $gpus "visible" (ternary "void" "" (eq $gpus 0)) "cuda" "" "useGpu" (gt $gpus 0)) }}
{{- $_ := set $metricsPort $host "metrics" }}
{{- else }}
{{- /* Pod-level values: the host role's, with what every role of the pod needs merged in (host first). */}}
{{- $pod := deepCopy (index $values $host) }}
{{- $gpus := 0 }}
{{- $grace := 0 }}
{{- $tolerations := list }}
{{- $shm := "" }}
{{- range $name := prepend (without $roles $host) $host }}
{{- $r := index $values $name }}
{{- $gpus = max $gpus (int $r.gpus) }}
{{- $grace = max $grace (int $r.terminationGracePeriodSeconds) }}
{{- $tolerations = concat $tolerations (default (list) $r.tolerations) }}
{{- range $field := list "nodeSelector" "podLabels" "podAnnotations" }}
{{- $_ := set $pod $field (merge (default (dict) (get $pod $field)) (deepCopy (default (dict) (get $r $field)))) }}
{{- end }}
{{- if and (not $shm) $r.shmSize }}
{{- $shm = $r.shmSize }}
{{- end }}
{{- end }}
{{- $gpus = int $gpus }}
{{- $_ := set $pod "gpus" $gpus }}
{{- $_ := set $pod "terminationGracePeriodSeconds" (int $grace) }}
{{- $_ := set $pod "tolerations" (uniq $tolerations) }}
{{- $_ := set $pod "shmSize" $shm }}
{{- $_ := set .out "podRole" $pod }}
{{- $_ := set .out "gpus" $gpus }}
{{- /* One container requests the pod's GPUs; policy server, then env server, start on the last GPU and go down
(learner ranks take the first ones by LOCAL_RANK), as gsrl.placement does for `gsrl train`. */}}
{{- $requester := "" }}
{{- range $name := $roles }}
{{- if and (not $requester) (gt (int (index $values $name).gpus) 0) }}
{{- $requester = $name }}
{{- end }}
{{- end }}
{{- $slot := 0 }}
{{- range $name := $roles }}
{{- $useGpu := gt (int (index $values $name).gpus) 0 }}
{{- $cuda := "" }}
{{- if and $useGpu (ne $name "learner") (gt $gpus 1) }}
{{- $first := mod (sub (sub $gpus 1) $slot) $gpus }}
{{- $ids := list }}
{{- range $i := until $gpus }}
{{- $ids = append $ids (toString (mod (add $first $i) $gpus)) }}
{{- end }}
{{- $cuda = join "," $ids }}
{{- $slot = add1 $slot }}
{{- end }}
{{- $visible := ternary "" (ternary "all" "void" $useGpu) (eq $name $requester) }}
{{- $_ := set $gpu $name (dict "request" (ternary $gpus 0 (eq $name $requester)) "visible" $visible "cuda" $cuda "useGpu" $useGpu) }}
{{- $_ := set $metricsPort $name (ternary "metrics" (printf "%s-metrics" (trimSuffix "-server" $name)) (eq $name "learner")) }}
{{- end }}
{{- end }}
{{- $_ := set .out "roles" $roles }}
{{- $_ := set .out "component" .component }}
{{- $_ := set .out "colocated" $colocated }}
{{- $_ := set .out "gpu" $gpu }}
{{- $_ := set .out "metricsPort" $metricsPort }}
{{- end }}

{{/* The containers of a pod plan, in order: (dict "ctx" $ "plan" $plan). */}}
{{- define "gsrl.containers" -}}
{{- $ctx := .ctx }}
{{- $plan := .plan }}
{{- range $i, $name := $plan.roles }}
{{- if $i }}{{ "\n" }}{{ end }}
{{- include (printf "gsrl.container.%s" $name) (dict "ctx" $ctx "plan" $plan "gpu" (index $plan.gpu $name) "metricsPort" (index $plan.metricsPort $name)) | trim }}
{{- end }}
{{- end }}

{{/* Co-located containers share one network namespace: refuse two of them on one port before the pod would fail. */}}
{{- define "gsrl.checkPodPorts" -}}
{{- $ctx := .ctx }}
{{- $ports := dict }}
{{- range $name := .plan.roles }}
{{- $named := dict }}
{{- if eq $name "env-server" }}
{{- $named = dict "envServer.metricsPort" $ctx.Values.envServer.metricsPort }}
{{- else if eq $name "policy-server" }}
{{- $named = dict "policyServer.port" $ctx.Values.policyServer.port "policyServer.metricsPort" $ctx.Values.policyServer.metricsPort }}
{{- else }}
{{- $l := $ctx.Values.learner }}
{{- $named = dict "learner.masterPort" $l.masterPort "learner.broadcastPort" $l.broadcastPort }}
{{- range $rank := until (int (include "gsrl.learner.nproc" $ctx)) }}
{{- $_ := set $named (printf "learner.metricsPort + %d" $rank) (add $l.metricsPort $rank) }}
{{- end }}
{{- end }}
{{- range $key, $port := $named }}
{{- $seen := get $ports (toString (int $port)) }}
{{- if $seen }}
{{- fail (printf "placement.preset %s puts %s and %s in one pod, and both use port %d" (include "gsrl.preset" $ctx) $seen $key (int $port)) }}
{{- end }}
{{- $_ := set $ports (toString (int $port)) $key }}
{{- end }}
{{- end }}
{{- end }}
