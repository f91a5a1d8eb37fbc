{{- define "ct3d.name" -}}
{{- .Values.name | default .Release.Name -}}
{{- end -}}

{{/* Labels: the user's (.Values.labels) first, ours win on a clash (as in k8s/render.py). */}}
{{- define "ct3d.labels" -}}
{{- $own := dict "app.kubernetes.io/name" "ct3d" "app.kubernetes.io/instance" (include "ct3d.name" .root) "app.kubernetes.io/version" .root.Chart.AppVersion "app.kubernetes.io/component" .component "app.kubernetes.io/managed-by" .root.Release.Service "helm.sh/chart" (printf "%s-%s" .root.Chart.Name .root.Chart.Version) -}}
{{- toYaml (merge $own (deepCopy (.root.Values.labels | default dict))) -}}
{{- end -}}

{{- define "ct3d.claim" -}}
{{- if .claim.name -}}
{{- .claim.name -}}
{{- else if eq .role "cache" -}}
{{- printf "%s-cache" (include "ct3d.name" .root) -}}
{{- else -}}
{{- printf "%s-output" (include "ct3d.name" .root) -}}
{{- end -}}
{{- end -}}

{{/* auto: ReadWriteOnce when one node mounts the claim, ReadWriteMany when several do; a one-node mode
shared by several nodes fails the render. */}}
{{- define "ct3d.accessMode" -}}
{{- $v := .root.Values -}}
{{- $shared := or (gt (int $v.nodes) 1) (gt (int ($v.sweepWorkers | default 0)) 1) (and (eq .role "cache") (gt (int ($v.cachePods | default 1)) 1)) -}}
{{- $mode := .claim.accessMode | default "auto" -}}
{{- if eq $mode "auto" -}}
{{- ternary "ReadWriteMany" "ReadWriteOnce" $shared -}}
{{- else -}}
{{- if and $shared (ne $mode "ReadWriteMany") (not .claim.existing) -}}
{{- fail (printf "%s.accessMode: %s lets one node mount the claim, but several nodes share it: use ReadWriteMany (EFS, Filestore, FSx for Lustre, CephFS, NFS) or auto" .role $mode) -}}
{{- end -}}
{{- $mode -}}
{{- end -}}
{{- end -}}

{{- define "ct3d.jobMetadata" -}}
name: {{ .name }}
namespace: {{ .root.Release.Namespace }}
labels:
  {{- $labels := include "ct3d.labels" (dict "root" .root "component" .component) | fromYaml }}
  {{- if .root.Values.queue }}
  {{- $_ := set $labels "kueue.x-k8s.io/queue-name" .root.Values.queue }}
  {{- end }}
  {{- toYaml $labels | nindent 2 }}
{{- with .root.Values.annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "ct3d.template" -}}
metadata:
  labels:
    {{- include "ct3d.labels" (dict "root" .root "component" .component) | nindent 4 }}
  {{- with .root.Values.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{- define "ct3d.env" -}}
- name: WANDB_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.wandbSecret }}
      key: api-key
      optional: true
- name: WANDB_DIR
  value: /output
- name: PYTHONUNBUFFERED
  value: "1"
- name: CT3D_CACHE
  value: /cache
- name: CT3D_OUTPUT
  value: /output
- name: TORCH_DISABLE_SHARE_RDZV_TCP_STORE
  value: "1"
{{- range $k, $v := .root.Values.env }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- if .indexed }}
- name: JOB_COMPLETION_INDEX
  valueFrom:
    fieldRef:
      fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
{{- end }}
{{- end -}}

{{- define "ct3d.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  capabilities:
    drop: [ALL]
  runAsNonRoot: true
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "ct3d.mounts" -}}
- name: config
  mountPath: /etc/ct3d
  readOnly: true
- name: cache
  mountPath: /cache
{{- if .output }}
- name: output
  mountPath: /output
{{- end }}
{{- if .shm }}
- name: shm
  mountPath: /dev/shm
{{- end }}
{{- if .root.Values.dataClaim }}
- name: data
  mountPath: /data
  readOnly: true
{{- end }}
{{- end -}}

{{- define "ct3d.volumes" -}}
- name: config
  configMap:
    name: {{ include "ct3d.name" .root }}-config
- name: cache
  persistentVolumeClaim:
    claimName: {{ include "ct3d.claim" (dict "root" .root "claim" .root.Values.cache "role" "cache") }}
{{- if .output }}
- name: output
  persistentVolumeClaim:
    claimName: {{ include "ct3d.claim" (dict "root" .root "claim" .root.Values.output "role" "output") }}
{{- end }}
{{- if .shm }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .root.Values.shmSize }}
{{- end }}
{{- if .root.Values.dataClaim }}
- name: data
  persistentVolumeClaim:
    claimName: {{ .root.Values.dataClaim }}
    readOnly: true
{{- end }}
{{- end -}}

{{/* The pod fields every workload shares, up to (not including) its containers. */}}
{{- define "ct3d.podCommon" -}}
{{- $v := .root.Values -}}
restartPolicy: {{ .restart | default "Never" }}
terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
{{- with $v.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ $v.runAsUser }}
  runAsGroup: {{ $v.runAsUser }}
  fsGroup: {{ $v.runAsUser }}
  fsGroupChangePolicy: OnRootMismatch
  seccompProfile:
    type: RuntimeDefault
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "ct3d.checkContainer" -}}
- name: check
  image: {{ .root.Values.image }}
  imagePullPolicy: {{ .root.Values.imagePullPolicy }}
  command: [python, -m, engine.run, check, --quick, --config, /etc/ct3d/config.yaml]
  env:
    {{- include "ct3d.env" (dict "root" .root "indexed" false) | nindent 4 }}
  resources:
    requests:
      cpu: "1"
      memory: 2Gi
    limits:
      cpu: "1"
      memory: 2Gi
  volumeMounts:
    {{- include "ct3d.mounts" (dict "root" .root "output" false "shm" false) | nindent 4 }}
  {{- include "ct3d.containerSecurity" . | nindent 2 }}
{{- end -}}

{{- define "ct3d.resources" -}}
{{- $v := .Values -}}
requests:
  cpu: {{ $v.cpu | quote }}
  memory: {{ $v.memory }}
  {{- if gt (int $v.gpus) 0 }}
  nvidia.com/gpu: {{ int $v.gpus }}
  {{- end }}
limits:
  cpu: {{ $v.cpu | quote }}
  memory: {{ $v.memory }}
  {{- if gt (int $v.gpus) 0 }}
  nvidia.com/gpu: {{ int $v.gpus }}
  {{- end }}
{{- end -}}

{{- define "ct3d.failurePolicy" -}}
rules:
  - action: Ignore
    onPodConditions:
      - type: DisruptionTarget
        status: "True"
  {{- range . }}
  - action: FailJob
    onExitCodes:
      containerName: {{ . }}
      operator: In
      values: [2]
  {{- end }}
{{- end -}}
