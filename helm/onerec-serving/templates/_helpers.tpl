{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "onerec-serving.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name when it already contains the chart name. */}}
{{- define "onerec-serving.fullname" -}}
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

{{- define "onerec-serving.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "onerec-serving.selectorLabels" -}}
app.kubernetes.io/name: {{ include "onerec-serving.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "onerec-serving.labels" -}}
helm.sh/chart: {{ include "onerec-serving.chart" . }}
{{ include "onerec-serving.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference
{{- end }}

{{- define "onerec-serving.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "onerec-serving.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "onerec-serving.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}
{{- end }}

{{/* The env Secret the server reads (envFrom): the rendered one (envSecret.create) or an existing one; "" = none. */}}
{{- define "onerec-serving.envSecretName" -}}
{{- if .Values.envSecret.create }}
{{- default (printf "%s-env" (include "onerec-serving.fullname" .) | trunc 63 | trimSuffix "-") .Values.envSecret.name }}
{{- else }}
{{- .Values.envSecret.name }}
{{- end }}
{{- end }}
