{{/*
Chart name, shortened to the 63 characters a DNS-1123 label allows.
*/}}
{{- define "perseus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name alone when it already contains the chart name
(release "perseus" -> "perseus"), otherwise "<release>-<chart>".
*/}}
{{- define "perseus.fullname" -}}
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
Chart name and version, for the helm.sh/chart label (never used in selectors: it changes on
every chart upgrade, and selectors are immutable).
*/}}
{{- define "perseus.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "perseus.labels" -}}
helm.sh/chart: {{ include "perseus.chart" . }}
{{ include "perseus.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: perseus
{{- end }}

{{/*
Selector labels: stable across upgrades.
*/}}
{{- define "perseus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "perseus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Per-component selector labels; call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "perseus.componentSelectorLabels" -}}
{{ include "perseus.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Per-component labels; call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "perseus.componentLabels" -}}
{{ include "perseus.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The image both workloads run (one image, two entry points).
*/}}
{{- define "perseus.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
ServiceAccount names.
*/}}
{{- define "perseus.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "perseus.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "perseus.sidecar.serviceAccountName" -}}
{{- if .Values.sidecar.serviceAccount.create }}
{{- default (printf "%s-sidecar" (include "perseus.fullname" .)) .Values.sidecar.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.sidecar.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secret holding the operator's bearer token (key "token"): the chart's own, or an existing one.
*/}}
{{- define "perseus.operatorTokenSecretName" -}}
{{- default (printf "%s-operator-token" (include "perseus.fullname" .)) .Values.operatorToken.existingSecret }}
{{- end }}

{{/*
Namespaces the operator serves, comma-separated; empty means the whole cluster. A restricted
operator also watches its own namespace, where the sidecar pods it indexes by node run.
*/}}
{{- define "perseus.operator.namespaces" -}}
{{- if .Values.operator.watchNamespaces }}
{{- append .Values.operator.watchNamespaces .Release.Namespace | uniq | join "," }}
{{- end }}
{{- end }}
