{{/* Name of the chart, overridable. */}}
{{- define "pricestream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified name: the release name, with the chart name appended unless it is in it. */}}
{{- define "pricestream.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "pricestream.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "pricestream.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "pricestream.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "pricestream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pricestream
{{- end }}

{{- define "pricestream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pricestream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels kube-prometheus-stack selects on (monitoring.labels), plus the standard ones. */}}
{{- define "pricestream.monitoringLabels" -}}
{{ include "pricestream.labels" . }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "pricestream.monitoringEnabled" -}}
{{- if and .Values.monitoring.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}true{{ end }}
{{- end }}

{{/*
The rules file (files/rules/pricestream.rules.yaml) with its ${parameters} replaced by
monitoring.rules.params and ${selector} by the PromQL matchers of this release's targets.
The same text is what `promtool test rules` and the end-to-end test load.
*/}}
{{- define "pricestream.rules" -}}
{{- $rules := .Files.Get "files/rules/pricestream.rules.yaml" }}
{{- $selector := .Values.monitoring.rules.selector | default (printf "job=\"%s\",namespace=\"%s\"" (include "pricestream.fullname" .) .Release.Namespace) }}
{{- $rules = $rules | replace "${selector}" $selector }}
{{- $rules = $rules | replace "${runbookUrl}" (.Values.monitoring.rules.runbookUrl | trimSuffix "/") }}
{{- range $name, $value := .Values.monitoring.rules.params }}
{{- $rules = $rules | replace (printf "${%s}" $name) (toString $value) }}
{{- end }}
{{- $rules = $rules | fromYaml | toYaml }}
{{- if contains "${" $rules }}
{{- fail (printf "monitoring.rules.params lacks a value for a parameter of the rules file: %s" (regexFind "\\$\\{[A-Za-z]+\\}" $rules)) }}
{{- end }}
{{- $rules }}
{{- end }}

{{/*
spec.replicas of the server Deployment. Without the HPA: replicaCount. With it, the HPA owns the
count, but dropping the field from a live Deployment makes the API server reset it to 1 (killing
serving pods before the HPA acts), so: the live Deployment's count when `lookup` finds it (every
upgrade then re-applies what the HPA set); else autoscaling.replicasWithoutLookup when set (for
`helm template`, `--dry-run` and GitOps renderers, where lookup sees no cluster); else nothing (a
fresh install starts at 1 and the HPA raises it to minReplicas).
*/}}
{{- define "pricestream.replicas" -}}
{{- if not .Values.autoscaling.enabled }}
{{- .Values.replicaCount }}
{{- else }}
{{- $live := lookup "apps/v1" "Deployment" .Release.Namespace (include "pricestream.fullname" .) }}
{{- $liveReplicas := dig "spec" "replicas" nil $live }}
{{- if not (kindIs "invalid" $liveReplicas) }}
{{- int64 $liveReplicas }}
{{- else if .Values.autoscaling.replicasWithoutLookup }}
{{- .Values.autoscaling.replicasWithoutLookup }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Value combinations of redis.persistence that cannot work fail the render with one sentence. The
StorageClass checks need a cluster (`lookup`; under `helm template` they are skipped) and the
right to list StorageClasses (cluster-scoped): redis.persistence.checkStorageClass turns them off.
*/}}
{{- define "pricestream.redisPersistenceChecks" -}}
{{- $p := .Values.redis.persistence }}
{{- if and $p.enabled (not .Values.redis.enabled) }}
{{- fail "redis.persistence.enabled applies to the in-chart Redis only: set redis.enabled=true or turn redis.persistence off (an external Redis keeps its own data)" }}
{{- end }}
{{- if and $p.enabled .Values.redis.enabled }}
{{- $claim := lookup "v1" "PersistentVolumeClaim" .Release.Namespace (include "pricestream.redisName" .) }}
{{- $claimClass := dig "spec" "storageClassName" "" $claim }}
{{- if and $claim $p.storageClassName (ne $claimClass $p.storageClassName) }}
{{- fail (printf "redis.persistence.storageClassName is %q but the existing claim %s/%s uses %q, and a claim's class cannot change: keep %q or delete the claim" $p.storageClassName .Release.Namespace (include "pricestream.redisName" .) $claimClass $claimClass) }}
{{- end }}
{{- if and $p.checkStorageClass (not $claim) }}
{{- $classes := lookup "storage.k8s.io/v1" "StorageClass" "" "" }}
{{- if $classes }}{{/* a list answers only when a cluster does */}}
{{- $names := list }}
{{- $defaults := list }}
{{- range $classes.items }}
{{- $names = append $names .metadata.name }}
{{- $annotations := .metadata.annotations | default dict }}
{{- if or (eq (get $annotations "storageclass.kubernetes.io/is-default-class") "true") (eq (get $annotations "storageclass.beta.kubernetes.io/is-default-class") "true") }}
{{- $defaults = append $defaults .metadata.name }}
{{- end }}
{{- end }}
{{- if and $p.storageClassName (not (has $p.storageClassName $names)) }}
{{- fail (printf "redis.persistence.storageClassName %q names no StorageClass of this cluster (it has: %s), so the claim would stay Pending" $p.storageClassName (join ", " $names | default "none")) }}
{{- else if and (not $p.storageClassName) (not $defaults) }}
{{- fail (printf "redis.persistence.enabled needs a StorageClass and this cluster has no default one: set redis.persistence.storageClassName (it has: %s)" (join ", " $names | default "none")) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Every Secret named by values must exist, with the keys the pods read, or the pods sit in
ContainerCreating until `--wait` times out. At install/upgrade `lookup` reads each one and the
render fails with one sentence naming it. Under `helm template` (no cluster) lookup returns
nothing for a Secret and for the list of Secrets alike, and the render goes on; against a
cluster the list (read only when the Secret is not found) is never empty, so "not found" is told
from "no cluster" with the permission Helm's own release storage needs.
*/}}
{{- define "pricestream.requireSecret" -}}
{{- $ns := .root.Release.Namespace }}
{{- $secret := lookup "v1" "Secret" $ns .name }}
{{- if $secret }}
{{- $data := merge (dict) ($secret.data | default dict) ($secret.stringData | default dict) }}
{{- range .keys }}
{{- if not (hasKey $data .) }}
{{- fail (printf "Secret %q in namespace %q, named by %s, has no key %q" $.name $ns $.value .) }}
{{- end }}
{{- end }}
{{- else if lookup "v1" "Secret" $ns "" }}
{{- fail (printf "Secret %q, named by %s, does not exist in namespace %q: create it before installing" .name .value $ns) }}
{{- end }}
{{- end }}

{{- define "pricestream.secretChecks" -}}
{{- with .Values.auth.existingSecret }}
{{- include "pricestream.requireSecret" (dict "root" $ "name" . "value" "auth.existingSecret" "keys" (list $.Values.auth.secretKey)) }}
{{- end }}
{{- with .Values.tls.existingSecret }}
{{- $keys := list "tls.crt" "tls.key" }}
{{- if $.Values.tls.requireClientCertificate }}{{ $keys = append $keys "ca.crt" }}{{ end }}
{{- include "pricestream.requireSecret" (dict "root" $ "name" . "value" "tls.existingSecret" "keys" $keys) }}
{{- end }}
{{- if not .Values.redis.enabled }}
{{- $r := .Values.redis }}
{{- if eq $r.mode "sentinel" }}
{{- with $r.sentinel.existingSecret }}
{{- include "pricestream.requireSecret" (dict "root" $ "name" . "value" "redis.sentinel.existingSecret" "keys" (list $r.sentinel.sentinelsKey $r.sentinel.masterNameKey $r.sentinel.urlKey)) }}
{{- end }}
{{- else if eq $r.mode "cluster" }}
{{- with $r.cluster.existingSecret }}
{{- include "pricestream.requireSecret" (dict "root" $ "name" . "value" "redis.cluster.existingSecret" "keys" (list $r.cluster.urlKey)) }}
{{- end }}
{{- else }}
{{- with $r.external.existingSecret }}
{{- include "pricestream.requireSecret" (dict "root" $ "name" . "value" "redis.external.existingSecret" "keys" (list $r.external.existingSecretKey)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pricestream.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion }}
{{- if eq $tag "latest" }}{{ fail "image.tag must name a version, not latest" }}{{ end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "pricestream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pricestream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pricestream.redisName" -}}
{{- printf "%s-redis" (include "pricestream.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* How serve and feed reach Redis. standalone: PRICESTREAM_REDIS_URL from the in-chart Redis,
an existing Secret (by reference) or a URL. sentinel and cluster: PRICESTREAM_REDIS_MODE and the
endpoints from the mode's existing Secret. */}}
{{- define "pricestream.redisEnv" -}}
{{- $r := .Values.redis }}
{{- if and $r.enabled (ne $r.mode "standalone") }}
{{- fail (printf "redis.mode=%s needs redis.enabled=false: the in-chart Redis is one standalone server" $r.mode) }}
{{- end }}
{{- if eq $r.mode "sentinel" }}
{{- if not $r.sentinel.existingSecret }}
{{- fail "redis.mode=sentinel: set redis.sentinel.existingSecret (sentinels, master name and URL)" }}
{{- end }}
- name: PRICESTREAM_REDIS_MODE
  value: sentinel
{{- range $name, $key := dict "PRICESTREAM_REDIS_SENTINELS" $r.sentinel.sentinelsKey "PRICESTREAM_REDIS_SENTINEL_MASTER" $r.sentinel.masterNameKey "PRICESTREAM_REDIS_URL" $r.sentinel.urlKey }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $r.sentinel.existingSecret }}
      key: {{ $key }}
{{- end }}
{{- else if eq $r.mode "cluster" }}
{{- if not $r.cluster.existingSecret }}
{{- fail "redis.mode=cluster: set redis.cluster.existingSecret (the seed node URL)" }}
{{- end }}
- name: PRICESTREAM_REDIS_MODE
  value: cluster
- name: PRICESTREAM_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $r.cluster.existingSecret }}
      key: {{ $r.cluster.urlKey }}
{{- else }}
- name: PRICESTREAM_REDIS_URL
{{- if .Values.redis.enabled }}
  value: {{ printf "redis://%s:6379/0" (include "pricestream.redisName" .) | quote }}
{{- else if .Values.redis.external.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- else if .Values.redis.external.url }}
  value: {{ .Values.redis.external.url | quote }}
{{- else }}
{{- fail "redis.enabled is false: set redis.external.existingSecret (or redis.external.url)" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Egress rule(s) of a pod that talks to Redis: the in-chart Redis, or the external nodes on
networkPolicy.redisPort (and the sentinels on sentinelPort in sentinel mode). */}}
{{- define "pricestream.redisEgress" -}}
{{- $np := .Values.networkPolicy -}}
- ports:
    - port: {{ if .Values.redis.enabled }}6379{{ else }}{{ $np.redisPort }}{{ end }}
      protocol: TCP
    {{- if and (not .Values.redis.enabled) (eq .Values.redis.mode "sentinel") }}
    - port: {{ $np.sentinelPort }}
      protocol: TCP
    {{- end }}
  {{- if .Values.redis.enabled }}
  to:
    - podSelector:
        matchLabels:
          {{- include "pricestream.selectorLabels" . | nindent 10 }}
          app.kubernetes.io/component: redis
  {{- else if $np.externalRedisTo }}
  to:
    {{- toYaml $np.externalRedisTo | nindent 4 }}
  {{- end }}
{{- end }}

{{- define "pricestream.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "pricestream.containerSecurityContext" -}}
{{ toYaml .Values.securityContext }}
{{- end }}
