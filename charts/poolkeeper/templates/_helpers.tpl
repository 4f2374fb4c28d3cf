{{- define "poolkeeper.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "poolkeeper.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "poolkeeper.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "poolkeeper.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "poolkeeper.labels" -}}
app.kubernetes.io/name: {{ include "poolkeeper.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "poolkeeper.selector" -}}
app.kubernetes.io/name: {{ include "poolkeeper.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The rules of the reconciled kinds: exactly those of `poolkeeper rbac` (a test compares them). */}}
{{- define "poolkeeper.watchRules" -}}
- apiGroups: [poolkeeper.dev]
  resources: [pools, claims, users, deployments]
  verbs: [get, list, watch, patch]
- apiGroups: [poolkeeper.dev]
  resources: [claims]
  verbs: [create, delete]
- apiGroups: [poolkeeper.dev]
  resources: [users]
  verbs: [delete]
- apiGroups: [poolkeeper.dev]
  resources: [pools/status, claims/status, users/status, deployments/status]
  verbs: [patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- if .Values.console.allowRegistration }}
- apiGroups: [poolkeeper.dev]
  resources: [users]
  verbs: [create]
{{- end }}
{{- end -}}
