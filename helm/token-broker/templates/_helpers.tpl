{{/* Names and labels shared by every template. */}}

{{- define "token-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: RELEASE-CHART, or RELEASE alone when it already holds the chart's name. */}}
{{- define "token-broker.fullname" -}}
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

{{- define "token-broker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable for the life of a release (a Deployment's selector is immutable). */}}
{{- define "token-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "token-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "token-broker.labels" -}}
helm.sh/chart: {{ include "token-broker.chart" . }}
{{ include "token-broker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: token-broker
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "token-broker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "token-broker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "token-broker.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "token-broker.rolesConfigMap" -}}
{{- default (printf "%s-roles" (include "token-broker.fullname" .)) .Values.roles.existingConfigMap }}
{{- end }}

{{/* Where the pod finds its files (fixed: broker.yaml refers to them). */}}
{{- define "token-broker.configDir" -}}/etc/token-broker/config{{- end }}
{{- define "token-broker.rolesDir" -}}/etc/token-broker/roles{{- end }}
{{- define "token-broker.jwksDir" -}}/etc/token-broker/jwks{{- end }}
{{- define "token-broker.metricsDir" -}}/var/run/token-broker/metrics{{- end }}

{{/*
broker.yaml: .Values.config plus what the chart decides. The schema refuses those keys in
.Values.config, so nothing here overrides a user's value silently.
*/}}
{{- define "token-broker.brokerConfig" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $server := default dict $cfg.server }}
{{- $_ := set $server "bind" (printf "0.0.0.0:%d" (int .Values.containerPort)) }}
{{- $_ := set $cfg "server" $server }}
{{- $redis := default dict $cfg.redis }}
{{- if .Values.redis.url }}
{{- $_ := set $redis "url" .Values.redis.url }}
{{- end }}
{{- $_ := set $cfg "redis" $redis }}
{{- $_ := set $cfg "roles" (dict "source" "file" "file" (printf "%s/%s" (include "token-broker.rolesDir" .) .Values.roles.key)) }}
{{- $cache := default dict $cfg.cache }}
{{- $_ := set $cache "keys_env" "BROKER_CACHE_KEYS" }}
{{- $_ := set $cfg "cache" $cache }}
{{- $audit := default dict $cfg.audit }}
{{- $_ := set $audit "signing_key_env" "BROKER_AUDIT_SIGNING_KEY" }}
{{- $_ := set $cfg "audit" $audit }}
{{- toYaml $cfg }}
{{- end }}
