{{/* Generated from nmm.compile.pods (chart_helpers): edit there, then `make golden`. */}}

{{/* Pod security context: Pod Security Standards "restricted". */}}
{{- define "nmm-platform.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container security context: restricted + read-only root filesystem. */}}
{{- define "nmm-platform.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop:
  - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}
