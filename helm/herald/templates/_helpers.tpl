{{/* Chart name, truncated to a DNS label. */}}
{{- define "herald.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; short enough for "-coordinator" and a pod hash to fit in 63. */}}
{{- define "herald.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "herald.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "herald.labels" -}}
helm.sh/chart: {{ include "herald.chart" . }}
{{ include "herald.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: herald
{{- end }}

{{- define "herald.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component: (dict "ctx" $ "component" "worker"). */}}
{{- define "herald.componentLabels" -}}
{{ include "herald.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "herald.componentSelector" -}}
{{ include "herald.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "herald.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "herald.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "herald.secretName" -}}
{{- default (include "herald.fullname" .) .Values.secret.existingSecret }}
{{- end }}

{{- define "herald.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* A TOML basic string (the schema keeps control characters out of the values). */}}
{{- define "herald.tomlString" -}}
"{{ toString . | replace "\\" "\\\\" | replace "\"" "\\\"" }}"
{{- end }}

{{/* A TOML array of strings. */}}
{{- define "herald.tomlStrings" -}}
{{- $out := list }}
{{- range . }}{{ $out = append $out (include "herald.tomlString" .) }}{{ end }}
{{- printf "[%s]" (join ", " $out) }}
{{- end }}

{{/* A checksum of what the Secret is made of, without its generated tokens. */}}
{{- define "herald.secretChecksum" -}}
{{- $urls := list }}
{{- range .Values.chains }}{{ $urls = append $urls (dict "id" .chainId "urls" .rpcUrls) }}{{ end }}
{{- toJson (dict "secret" .Values.secret "auth" .Values.auth "rpc" $urls) | sha256sum }}
{{- end }}

{{/* The [etcd] table both binaries share. */}}
{{- define "herald.etcdToml" -}}
[etcd]
endpoints = {{ include "herald.tomlStrings" .Values.etcd.endpoints }}
prefix = {{ include "herald.tomlString" .Values.etcd.prefix }}
connect_timeout = {{ include "herald.tomlString" .Values.etcd.connectTimeout }}
request_timeout = {{ include "herald.tomlString" .Values.etcd.requestTimeout }}
{{- if .Values.etcd.user }}
user = {{ include "herald.tomlString" .Values.etcd.user }}
password_file = "/etc/herald/etcd-auth/password"
{{- end }}
{{- if .Values.etcd.tls.enabled }}

[etcd.tls]
ca_file = "/etc/herald/etcd-tls/ca.crt"
{{- if .Values.etcd.tls.clientCert }}
cert_file = "/etc/herald/etcd-tls/tls.crt"
key_file = "/etc/herald/etcd-tls/tls.key"
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes and mounts both binaries share: (dict "ctx" $ "mounts" true|false). */}}
{{- define "herald.etcdVolumes" -}}
{{- $ := .ctx }}
{{- if $.Values.etcd.user }}
{{- if .mounts }}
- name: etcd-auth
  mountPath: /etc/herald/etcd-auth
  readOnly: true
{{- else }}
- name: etcd-auth
  secret:
    secretName: {{ $.Values.etcd.passwordSecret.name }}
    defaultMode: 0440
    items:
      - key: {{ $.Values.etcd.passwordSecret.key }}
        path: password
{{- end }}
{{- end }}
{{- if $.Values.etcd.tls.enabled }}
{{- if .mounts }}
- name: etcd-tls
  mountPath: /etc/herald/etcd-tls
  readOnly: true
{{- else }}
- name: etcd-tls
  secret:
    secretName: {{ $.Values.etcd.tls.secretName }}
    defaultMode: 0440
    items:
      - key: ca.crt
        path: ca.crt
      {{- if $.Values.etcd.tls.clientCert }}
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
      {{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The secret volume items of the RPC URL files. */}}
{{- define "herald.rpcUrlItems" -}}
{{- range .Values.chains }}
- key: rpc-urls-{{ int .chainId }}
  path: rpc-urls-{{ int .chainId }}
{{- end }}
{{- end }}

{{/* Soft anti-affinity default: spread a component's pods over nodes. */}}
{{- define "herald.affinity" -}}
{{- if .values.affinity }}
{{- toYaml .values.affinity }}
{{- else }}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "herald.componentSelector" (dict "ctx" .ctx "component" .component) | nindent 12 }}
{{- end }}
{{- end }}
