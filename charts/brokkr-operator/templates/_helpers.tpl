{{/* Names, labels and the database wiring of the brokkr-operator chart. */}}

{{- define "brokkr-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-brokkr-operator, or the release name when it already contains the chart name. */}}
{{- define "brokkr-operator.fullname" -}}
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

{{- define "brokkr-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "brokkr-operator.labels" -}}
helm.sh/chart: {{ include "brokkr-operator.chart" . }}
app.kubernetes.io/name: {{ include "brokkr-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: brokkr
{{- end }}

{{/* Selector of the operator pods. */}}
{{- define "brokkr-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "brokkr-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "brokkr-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "brokkr-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "brokkr-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "brokkr-operator.leaseName" -}}
{{- default (include "brokkr-operator.fullname" .) .Values.config.leaseName }}
{{- end }}

{{/* ---- PostgreSQL ---- */}}

{{- define "brokkr-operator.postgresql.fullname" -}}
{{- printf "%s-postgresql" (include "brokkr-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "brokkr-operator.postgresql.selectorLabels" -}}
app.kubernetes.io/name: {{ include "brokkr-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: postgresql
{{- end }}

{{/* The Secret and key holding the in-chart PostgreSQL password. */}}
{{- define "brokkr-operator.postgresql.secretName" -}}
{{- default (include "brokkr-operator.postgresql.fullname" .) .Values.postgresql.auth.existingSecret }}
{{- end }}

{{- define "brokkr-operator.postgresql.secretKey" -}}
{{- if .Values.postgresql.auth.existingSecret }}
{{- .Values.postgresql.auth.existingSecretKey }}
{{- else }}
{{- "password" }}
{{- end }}
{{- end }}

{{/* Name of the Secret the chart makes for externalDatabase.url. */}}
{{- define "brokkr-operator.database.secretName" -}}
{{- printf "%s-database" (include "brokkr-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fails with a clear message when the database settings do not add up. */}}
{{- define "brokkr-operator.database.validate" -}}
{{- $ext := .Values.externalDatabase }}
{{- if .Values.postgresql.enabled }}
{{- if or $ext.url $ext.existingSecret }}
{{- fail "postgresql.enabled is true and externalDatabase is set: choose one (set postgresql.enabled=false to use externalDatabase)" }}
{{- end }}
{{- else }}
{{- if and $ext.url $ext.existingSecret }}
{{- fail "externalDatabase: set url or existingSecret, not both" }}
{{- end }}
{{- if not (or $ext.url $ext.existingSecret) }}
{{- fail "no database: with postgresql.enabled=false set externalDatabase.url or externalDatabase.existingSecret" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The container environment that gives the operator DATABASE_URL. */}}
{{- define "brokkr-operator.database.env" -}}
{{- include "brokkr-operator.database.validate" . }}
{{- if .Values.postgresql.enabled }}
- name: BROKKR_POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "brokkr-operator.postgresql.secretName" . }}
      key: {{ include "brokkr-operator.postgresql.secretKey" . }}
{{- /* Kubernetes expands $(VAR) from the variables defined above it. */}}
- name: DATABASE_URL
  value: {{ printf "postgres://%s:$(BROKKR_POSTGRES_PASSWORD)@%s.%s.svc:%v/%s" .Values.postgresql.auth.username (include "brokkr-operator.postgresql.fullname" .) .Release.Namespace .Values.postgresql.service.port .Values.postgresql.auth.database | quote }}
{{- else if .Values.externalDatabase.existingSecret }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalDatabase.existingSecret }}
      key: {{ .Values.externalDatabase.existingSecretKey }}
{{- else }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "brokkr-operator.database.secretName" . }}
      key: url
{{- end }}
{{- end }}
