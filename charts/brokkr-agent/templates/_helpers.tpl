{{/* Names and labels of the brokkr-agent chart. */}}

{{- define "brokkr-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-brokkr-agent, or the release name when it already contains the chart name. */}}
{{- define "brokkr-agent.fullname" -}}
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

{{- define "brokkr-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "brokkr-agent.labels" -}}
helm.sh/chart: {{ include "brokkr-agent.chart" . }}
app.kubernetes.io/name: {{ include "brokkr-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: brokkr
{{- end }}

{{- define "brokkr-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "brokkr-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "brokkr-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "brokkr-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "brokkr-agent.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Secret holding the agent key. */}}
{{- define "brokkr-agent.keySecretName" -}}
{{- if .Values.agentKey.existingSecret }}
{{- .Values.agentKey.existingSecret }}
{{- else }}
{{- printf "%s-key" (include "brokkr-agent.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Fails with a clear message when a required value is missing or values contradict. */}}
{{- define "brokkr-agent.validate" -}}
{{- $_ := required "agentName is required: the name of this cluster's Agent on the hub (--set agentName=...)" .Values.agentName }}
{{- $_ := required "hub.url is required: the hub's agent API, e.g. --set hub.url=https://brokkr.example.com" .Values.hub.url }}
{{- if and .Values.agentKey.value .Values.agentKey.existingSecret }}
{{- fail "agentKey: set value or existingSecret, not both" }}
{{- end }}
{{- if not (or .Values.agentKey.value .Values.agentKey.existingSecret) }}
{{- fail "agentKey is required: --set agentKey.value=<key> or --set agentKey.existingSecret=<secret name> (read the key on the hub: kubectl get secret brokkr-agent-<agentName> -n <hub namespace> -o jsonpath='{.data.pak}' | base64 -d)" }}
{{- end }}
{{- if and .Values.hub.caBundle .Values.hub.caConfigMap }}
{{- fail "hub: set caBundle or caConfigMap, not both" }}
{{- end }}
{{- if and (eq .Values.rbac.scope "namespaces") (not .Values.rbac.namespaces) }}
{{- fail "rbac.scope=namespaces needs rbac.namespaces: the namespaces the agent may write to" }}
{{- end }}
{{- if and (eq .Values.rbac.scope "namespaces") .Values.config.allowedNamespaces }}
{{- fail "rbac.scope=namespaces confines the agent to rbac.namespaces: leave config.allowedNamespaces empty" }}
{{- end }}
{{- end }}

{{/* The ConfigMap holding the hub's CA certificates, if any. */}}
{{- define "brokkr-agent.caConfigMapName" -}}
{{- if .Values.hub.caConfigMap }}
{{- .Values.hub.caConfigMap }}
{{- else if .Values.hub.caBundle }}
{{- printf "%s-hub-ca" (include "brokkr-agent.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* --allowed-namespaces: rbac.namespaces with rbac.scope=namespaces, else
config.allowedNamespaces (empty: every namespace). */}}
{{- define "brokkr-agent.allowedNamespaces" -}}
{{- if eq .Values.rbac.scope "namespaces" }}
{{- join "," .Values.rbac.namespaces }}
{{- else }}
{{- join "," .Values.config.allowedNamespaces }}
{{- end }}
{{- end }}

{{/* --allow-cluster-scoped: false with rbac.scope=namespaces (a namespaced Role cannot
grant cluster-scoped objects), else config.allowClusterScoped. */}}
{{- define "brokkr-agent.allowClusterScoped" -}}
{{- if eq .Values.rbac.scope "namespaces" }}
{{- "false" }}
{{- else }}
{{- .Values.config.allowClusterScoped | toString }}
{{- end }}
{{- end }}
