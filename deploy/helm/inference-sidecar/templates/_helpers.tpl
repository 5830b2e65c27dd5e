{{/* The name of every object: fullnameOverride, else the release name (the application's). */}}
{{- define "inference-sidecar.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* What selects the pods: never changes over a release's life. */}}
{{- define "inference-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inference-sidecar.fullname" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "inference-sidecar.labels" -}}
{{ include "inference-sidecar.selectorLabels" . }}
app.kubernetes.io/part-of: inference
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The labels of the sidecar's own objects (metrics Service, ServiceMonitor, ...). */}}
{{- define "inference-sidecar.sidecarLabels" -}}
{{ include "inference-sidecar.labels" . }}
app.kubernetes.io/component: inference-sidecar
{{- end -}}

{{- define "inference-sidecar.configMapName" -}}
{{- .Values.existingConfigMap | default (printf "%s-sidecar-config" (include "inference-sidecar.fullname" .)) -}}
{{- end -}}

{{/* The port of a HOST:PORT listener address. */}}
{{- define "inference-sidecar.portOf" -}}
{{- splitList ":" . | last -}}
{{- end -}}

{{/* Checks what the chart cannot leave to the cluster to find out. */}}
{{- define "inference-sidecar.validate" -}}
{{- if not .Values.existingConfigMap -}}
{{- range $listener, $port := dict "health_listen" .Values.sidecar.ports.health "ops_listen" .Values.sidecar.ports.metrics -}}
{{- $address := index $.Values.config $listener | default "" -}}
{{- if not $address -}}
{{- fail (printf "config.%s is not set: the probes and the metrics scrape reach the sidecar there (set it to 0.0.0.0:%v)" $listener $port) -}}
{{- end -}}
{{- if ne (include "inference-sidecar.portOf" $address) (toString $port) -}}
{{- fail (printf "config.%s is %s but its container port (sidecar.ports) is %v: make them the same" $listener $address $port) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not .Values.service.enabled) -}}
{{- fail "ingress.enabled needs service.enabled: the Ingress routes to the app's Service" -}}
{{- end -}}
{{- if and .Values.certificate.enabled (not .Values.sidecar.tlsSecretName) -}}
{{- fail "certificate.enabled needs sidecar.tlsSecretName: the Secret the certificate is issued into" -}}
{{- end -}}
{{- end -}}

{{/* The environment ConfigMap's data: sidecar.env plus LIMITS_EXPECTED_REPLICAS. */}}
{{- define "inference-sidecar.envData" -}}
{{- $env := deepCopy .Values.sidecar.env -}}
{{- if not (hasKey $env "LIMITS_EXPECTED_REPLICAS") -}}
{{- $replicas := ternary .Values.autoscaling.minReplicas .Values.replicaCount .Values.autoscaling.enabled -}}
{{- $_ := set $env "LIMITS_EXPECTED_REPLICAS" $replicas -}}
{{- end -}}
{{- range $name, $value := $env }}
{{ $name }}: {{ $value | toString | quote }}
{{- end -}}
{{- end -}}
