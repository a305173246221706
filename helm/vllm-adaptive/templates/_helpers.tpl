{{/* Names, labels, the image, the vllm serve command line, and checks across keys. */}}

{{- define "vllm-adaptive.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vllm-adaptive.fullname" -}}
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

{{- define "vllm-adaptive.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vllm-adaptive.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vllm-adaptive.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vllm-adaptive.labels" -}}
{{ include "vllm-adaptive.chartLabels" . }}
{{ include "vllm-adaptive.selectorLabels" . }}
app.kubernetes.io/component: inference
{{- end }}

{{/* Labels of everything the chart renders, without the ones the Service selects pods by. */}}
{{- define "vllm-adaptive.chartLabels" -}}
helm.sh/chart: {{ include "vllm-adaptive.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ include "vllm-adaptive.name" . }}
{{- end }}

{{- define "vllm-adaptive.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vllm-adaptive.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository@digest when a digest is given, else repository:tag (tag defaults to appVersion). */}}
{{- define "vllm-adaptive.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* A StatefulSet when each replica keeps its own cache PVC. */}}
{{- define "vllm-adaptive.statefulset" -}}
{{- if and .Values.cache.persistence.enabled .Values.cache.persistence.perReplica }}true{{ end }}
{{- end }}

{{- define "vllm-adaptive.configPath" -}}/etc/vllm-adaptive/adaptive.yaml{{- end }}
{{- define "vllm-adaptive.modelMount" -}}/models{{- end }}
{{- define "vllm-adaptive.cacheMount" -}}/cache{{- end }}

{{/* What `vllm serve` is given as the model: the hub id, or the folder inside the model volume. */}}
{{- define "vllm-adaptive.modelArg" -}}
{{- if eq .Values.model.source "hub" }}
{{- .Values.model.id }}
{{- else }}
{{- printf "%s/%s" (include "vllm-adaptive.modelMount" .) (trimPrefix "/" .Values.model.path) | trimSuffix "/" }}
{{- end }}
{{- end }}

{{- define "vllm-adaptive.servedModelName" -}}
{{- if .Values.model.servedModelName }}
{{- .Values.model.servedModelName }}
{{- else if eq .Values.model.source "hub" }}
{{- .Values.model.id }}
{{- else }}
{{- base (include "vllm-adaptive.modelArg" .) }}
{{- end }}
{{- end }}

{{/* Whether the speculation dashboard is rendered. */}}
{{- define "vllm-adaptive.speculativeDashboard" -}}
{{- $choice := .Values.monitoring.grafanaDashboard.speculative }}
{{- if kindIs "bool" $choice }}{{ if $choice }}true{{ end }}
{{- else if (((.Values.adaptive).speculative).enabled) }}true{{ end }}
{{- end }}

{{/* vLLM's draft tokens per step: numSpeculativeTokens, or max_draft_tokens with adaptive drafting. */}}
{{- define "vllm-adaptive.numSpeculativeTokens" -}}
{{- $spec := .Values.speculative }}
{{- $adaptiveSpec := ((.Values.adaptive).speculative) | default dict }}
{{- if not (kindIs "invalid" $spec.numSpeculativeTokens) }}
{{- $spec.numSpeculativeTokens | int }}
{{- else if $adaptiveSpec.enabled }}
{{- dig "max_draft_tokens" 8 $adaptiveSpec | int }}
{{- end }}
{{- end }}

{{/* The --speculative-config JSON. */}}
{{- define "vllm-adaptive.speculativeConfig" -}}
{{- $spec := .Values.speculative }}
{{- $config := dict "method" $spec.method "model" $spec.draftModel }}
{{- $k := include "vllm-adaptive.numSpeculativeTokens" . }}
{{- if $k }}{{ $_ := set $config "num_speculative_tokens" ($k | int) }}{{ end }}
{{- toJson (merge $config (deepCopy $spec.extraConfig)) }}
{{- end }}

{{/* The container's arguments after `vllm serve`, one per line (a YAML list). */}}
{{- define "vllm-adaptive.args" -}}
- {{ include "vllm-adaptive.modelArg" . | quote }}
- "--plugin"
- "adaptive"
- "--adaptive-config"
- {{ include "vllm-adaptive.configPath" . | quote }}
- "--host"
- "0.0.0.0"
- "--port"
- {{ .Values.server.port | toString | quote }}
- "--served-model-name"
- {{ include "vllm-adaptive.servedModelName" . | quote }}
{{- if and (eq .Values.model.source "hub") .Values.model.revision }}
- "--revision"
- {{ .Values.model.revision | quote }}
{{- end }}
- "--tensor-parallel-size"
- {{ .Values.parallelism.tensorParallelSize | toString | quote }}
{{- if gt (int .Values.parallelism.pipelineParallelSize) 1 }}
- "--pipeline-parallel-size"
- {{ .Values.parallelism.pipelineParallelSize | toString | quote }}
{{- end }}
{{- with .Values.server.maxModelLen }}
- "--max-model-len"
- {{ . | toString | quote }}
{{- end }}
{{- with .Values.server.gpuMemoryUtilization }}
- "--gpu-memory-utilization"
- {{ . | toString | quote }}
{{- end }}
{{- with .Values.server.kvCacheMemoryBytes }}
- "--kv-cache-memory-bytes"
- {{ . | int64 | toString | quote }}
{{- end }}
{{- with .Values.server.maxNumSeqs }}
- "--max-num-seqs"
- {{ . | toString | quote }}
{{- end }}
{{- with .Values.server.dtype }}
- "--dtype"
- {{ . | quote }}
{{- end }}
{{- if .Values.speculative.enabled }}
- "--speculative-config"
- {{ include "vllm-adaptive.speculativeConfig" . | quote }}
{{- end }}
{{- range .Values.server.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Checks that span several keys (the schema checks single keys and types). Each failure names the
key to change.
*/}}
{{- define "vllm-adaptive.validate" -}}
{{- $v := .Values }}
{{- $tp := int $v.parallelism.tensorParallelSize }}
{{- $pp := int $v.parallelism.pipelineParallelSize }}
{{- $gpus := int $v.gpu.count }}
{{- if eq $v.device "gpu" }}
{{- if lt $gpus 1 }}
{{- fail (printf "gpu.count must be at least 1 with device: gpu (got %d); use device: cpu and the CPU image for a pod without GPUs" $gpus) }}
{{- end }}
{{- if ne (mul $tp $pp) $gpus }}
{{- fail (printf "gpu.count (%d) must equal parallelism.tensorParallelSize (%d) * parallelism.pipelineParallelSize (%d) = %d" $gpus $tp $pp (mul $tp $pp)) }}
{{- end }}
{{- else if gt $gpus 0 }}
{{- fail (printf "gpu.count must be 0 with device: cpu (got %d); use device: gpu and the GPU image to request GPUs" $gpus) }}
{{- end }}
{{- if eq $v.model.source "hub" }}
{{- if not $v.model.id }}{{ fail "model.id is required with model.source: hub" }}{{ end }}
{{- else if eq $v.model.source "pvc" }}
{{- if not $v.model.existingClaim }}{{ fail "model.existingClaim is required with model.source: pvc" }}{{ end }}
{{- else if eq $v.model.source "hostPath" }}
{{- if not $v.model.hostPath }}{{ fail "model.hostPath is required with model.source: hostPath" }}{{ end }}
{{- end }}
{{- if and $v.cache.prefetch.enabled (ne $v.model.source "hub") }}
{{- fail "cache.prefetch.enabled needs model.source: hub (pvc and hostPath models are already local)" }}
{{- end }}
{{- if and $v.cache.persistence.perReplica $v.cache.persistence.existingClaim }}
{{- fail "cache.persistence.existingClaim is one claim for all replicas; it cannot be used with cache.persistence.perReplica: true" }}
{{- end }}
{{- /* Tokens: only from Secrets. */}}
{{- $tokenPattern := "hf_[A-Za-z0-9]{20,}" }}
{{- range $i, $e := $v.server.env }}
{{- if and (has $e.name (list "HF_TOKEN" "HUGGING_FACE_HUB_TOKEN" "HUGGINGFACE_HUB_TOKEN" "VLLM_API_KEY")) (hasKey $e "value") }}
{{- fail (printf "server.env[%d] (%s) holds a literal secret; set model.hfToken.secretName / server.apiKey.secretName to an existing Secret instead" $i $e.name) }}
{{- end }}
{{- if and (hasKey $e "value") (regexMatch $tokenPattern (toString $e.value)) }}
{{- fail (printf "server.env[%d] (%s) holds what looks like a literal hub token; reference a Secret with valueFrom.secretKeyRef" $i $e.name) }}
{{- end }}
{{- end }}
{{- $owned := list "--plugin" "--adaptive-config" "--host" "--port" "--served-model-name" "--tensor-parallel-size" "-tp" "--pipeline-parallel-size" "-pp" "--speculative-config" "--hf-token" "--api-key" "--model" "--revision" }}
{{- range $i, $arg := $v.server.extraArgs }}
{{- $flag := first (splitList "=" (toString $arg)) }}
{{- if has $flag $owned }}
{{- fail (printf "server.extraArgs[%d] (%s) is set by the chart; use its own key (model.*, parallelism.*, speculative.*, server.port, server.apiKey, model.hfToken)" $i $flag) }}
{{- end }}
{{- if regexMatch $tokenPattern (toString $arg) }}
{{- fail (printf "server.extraArgs[%d] holds what looks like a literal hub token; set model.hfToken.secretName to an existing Secret" $i) }}
{{- end }}
{{- end }}
{{- /* Speculation. */}}
{{- $adaptiveSpec := (($v.adaptive).speculative) | default dict }}
{{- if $v.speculative.enabled }}
{{- if not $v.speculative.draftModel }}{{ fail "speculative.draftModel is required with speculative.enabled" }}{{ end }}
{{- end }}
{{- if $adaptiveSpec.enabled }}
{{- if not $v.speculative.enabled }}
{{- fail "adaptive.speculative.enabled needs vLLM's draft-model speculation: set speculative.enabled: true and speculative.draftModel" }}
{{- end }}
{{- if ne $v.speculative.method "draft_model" }}
{{- fail (printf "adaptive.speculative.enabled works with speculative.method: draft_model (got %q)" $v.speculative.method) }}
{{- end }}
{{- if or (gt $tp 1) (gt $pp 1) }}
{{- fail (printf "adaptive.speculative.enabled needs parallelism.tensorParallelSize and parallelism.pipelineParallelSize 1 (got %d and %d)" $tp $pp) }}
{{- end }}
{{- $maxDraft := dig "max_draft_tokens" 8 $adaptiveSpec | int }}
{{- if and (not (kindIs "invalid" $v.speculative.numSpeculativeTokens)) (ne (int $v.speculative.numSpeculativeTokens) $maxDraft) }}
{{- fail (printf "speculative.numSpeculativeTokens (%d) must equal adaptive.speculative.max_draft_tokens (%d) with adaptive draft length; leave it null" (int $v.speculative.numSpeculativeTokens) $maxDraft) }}
{{- end }}
{{- end }}
{{- if and $v.autoscaling.hpa.enabled $v.autoscaling.keda.enabled }}
{{- fail "autoscaling.hpa.enabled and autoscaling.keda.enabled are both true; KEDA creates its own HPA, turn one off" }}
{{- end }}
{{- if and $v.autoscaling.hpa.enabled (gt (int $v.autoscaling.hpa.minReplicas) (int $v.autoscaling.hpa.maxReplicas)) }}
{{- fail "autoscaling.hpa.minReplicas must not exceed autoscaling.hpa.maxReplicas" }}
{{- end }}
{{- if and $v.autoscaling.keda.enabled (gt (int $v.autoscaling.keda.minReplicaCount) (int $v.autoscaling.keda.maxReplicaCount)) }}
{{- fail "autoscaling.keda.minReplicaCount must not exceed autoscaling.keda.maxReplicaCount" }}
{{- end }}
{{- end }}

{{/* The default KEDA query: waiting requests summed over this release's pods. */}}
{{- define "vllm-adaptive.kedaQuery" -}}
{{- if .Values.autoscaling.keda.query }}
{{- .Values.autoscaling.keda.query }}
{{- else }}
{{- printf "sum(vllm:num_requests_waiting{namespace=\"%s\",service=\"%s\"})" .Release.Namespace (include "vllm-adaptive.fullname" .) }}
{{- end }}
{{- end }}

{{/* Environment shared by vLLM and the prefetch step: writable caches on volumes, the hub token. */}}
{{- define "vllm-adaptive.env" -}}
{{- $cache := include "vllm-adaptive.cacheMount" . -}}
- name: HOME
  value: /tmp
- name: XDG_CONFIG_HOME
  value: /tmp/.config
- name: XDG_CACHE_HOME
  value: {{ $cache }}
- name: HF_HOME
  value: {{ $cache }}/huggingface
- name: VLLM_CACHE_ROOT
  value: {{ $cache }}/vllm
- name: TRITON_CACHE_DIR
  value: {{ $cache }}/triton
- name: VLLM_NO_USAGE_STATS
  value: "1"
{{- if and (ne .Values.model.source "hub") (or (not .Values.speculative.enabled) (isAbs .Values.speculative.draftModel)) }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- with .Values.model.hfToken.secretName }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.model.hfToken.secretKey }}
{{- end }}
{{- end }}

{{/* Mounts: the plugin config (read-only), the writable /tmp and cache, /dev/shm, the model. */}}
{{- define "vllm-adaptive.volumeMounts" -}}
- name: adaptive-config
  mountPath: /etc/vllm-adaptive
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: {{ include "vllm-adaptive.cacheMount" . }}
{{- if .Values.shm.enabled }}
- name: shm
  mountPath: /dev/shm
{{- end }}
{{- if ne .Values.model.source "hub" }}
- name: model
  mountPath: {{ include "vllm-adaptive.modelMount" . }}
  readOnly: true
{{- end }}
{{- end }}
