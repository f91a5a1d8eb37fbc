{{- define "ct3d.name" -}}
{{- .Values.name | default .Release.Name -}}
{{- end -}}

{{- define "ct3d.labels" -}}
app.kubernetes.io/name: ct3d
app.kubernetes.io/instance: {{ include "ct3d.name" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "ct3d.claim" -}}
{{- .claim.name | default (printf "%s-%s" (include "ct3d.name" .root) .role) -}}
{{- end -}}
