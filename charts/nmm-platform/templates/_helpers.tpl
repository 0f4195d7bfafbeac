{{/* The chart's short name, at most 63 characters. */}}
{{- define "nmm-platform.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release-qualified base name of every object, at most 63 characters. */}}
{{- define "nmm-platform.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's objects: <fullname>-<component>, at most 63 characters. */}}
{{- define "nmm-platform.component" -}}
{{- printf "%s-%s" (include "nmm-platform.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "nmm-platform.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "nmm-platform.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component. */}}
{{- define "nmm-platform.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nmm-platform.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The platform image: repository@digest when a digest is set, else repository:tag (never latest). */}}
{{- define "nmm-platform.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if eq $tag "latest" -}}{{- fail "image.tag must not be 'latest': pin a version or a digest" -}}{{- end -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The security contexts: templates/_security.tpl, generated from nmm.compile.pods. */}}

{{/* The S3 credentials Secret; rendering fails without one (no default credentials). */}}
{{- define "nmm-platform.s3Secret" -}}
{{- required "s3.existingSecret is required: the name of a Secret with keys accessKey and secretKey (nmm never ships default credentials)" .Values.s3.existingSecret -}}
{{- end -}}

{{/* The Secret of the read-only S3 key model servers read their model folder with; required. */}}
{{- define "nmm-platform.servingS3Secret" -}}
{{- required "serving.s3.existingSecret is required: the name of a Secret with keys accessKey and secretKey of a READ-ONLY S3 key (model servers hold no key that can write; see the nmm-serving-s3-policy ConfigMap)" .Values.serving.s3.existingSecret -}}
{{- end -}}

{{/* The label a namespace carries when its pipelines and services may use nmm (the operator writes there, MLflow answers its steps). */}}
{{- define "nmm-platform.tenantLabel" -}}nmm.dev/tenant{{- end -}}

{{/* The S3 endpoint; rendering fails without one. */}}
{{- define "nmm-platform.s3Endpoint" -}}
{{- required "s3.endpoint is required: the URL of MinIO or S3, e.g. http://minio.nmm.svc:9000" .Values.s3.endpoint -}}
{{- end -}}

{{/* The MLflow tracking URI the platform uses: the in-chart server or mlflow.externalUri. */}}
{{- define "nmm-platform.mlflowUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s.%s.svc:%d" (include "nmm-platform.component" (dict "root" . "component" "mlflow")) .Release.Namespace (int .Values.mlflow.port) -}}
{{- else -}}
{{- required "mlflow.externalUri is required when mlflow.enabled is false" .Values.mlflow.externalUri -}}
{{- end -}}
{{- end -}}

{{/* The Secret (keys username, password) of MLflow's basic auth; empty when auth is off. */}}
{{- define "nmm-platform.mlflowAuthSecret" -}}
{{- if and .Values.mlflow.enabled .Values.mlflow.auth.enabled -}}
{{- required "mlflow.auth.existingSecret is required when mlflow.auth.enabled: a Secret with keys username and password (MLflow's admin; the platform's clients sign in with it) and flaskSecretKey" .Values.mlflow.auth.existingSecret -}}
{{- else if not .Values.mlflow.enabled -}}
{{- .Values.mlflow.auth.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* Env pointing a pod at MLflow and the object store (credentials by secretKeyRef only). */}}
{{- define "nmm-platform.platformEnv" -}}
- name: HOME
  value: /tmp
- name: MLFLOW_TRACKING_URI
  value: {{ include "nmm-platform.mlflowUri" . | quote }}
{{- with include "nmm-platform.mlflowAuthSecret" . }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: username}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: password}
{{- end }}
- name: NMM_S3_ENDPOINT
  value: {{ include "nmm-platform.s3Endpoint" . | quote }}
- name: NMM_S3_BUCKET
  value: {{ .Values.s3.bucket | quote }}
- name: NMM_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "nmm-platform.s3Secret" . }}
      key: accessKey
- name: NMM_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "nmm-platform.s3Secret" . }}
      key: secretKey
{{- end -}}
