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
{{- $shared := or (gt (int $v.nodes) 1) (gt (int ($v.sweepWorkers | default 0)) 1) (and (eq .role "cache") (or (gt (int ($v.cachePods | default 1)) 1) (gt (int ($v.embedPods | default 0)) 1))) -}}
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

{{/* .queue: the Kueue queue when given (the cache fill's), else .Values.queue. */}}
{{- define "ct3d.jobMetadata" -}}
name: {{ .name }}
namespace: {{ .root.Release.Namespace }}
labels:
  {{- $labels := include "ct3d.labels" (dict "root" .root "component" .component) | fromYaml }}
  {{- $queue := ternary .queue .root.Values.queue (hasKey . "queue") }}
  {{- if $queue }}
  {{- $_ := set $labels "kueue.x-k8s.io/queue-name" $queue }}
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

{{/* OMP_NUM_THREADS of a container that trains: .cpu (a quantity) per rank, .ranks of them (at least 1), at least
1; torch and OpenMP in a container count the node's CPUs, not the pod's limit (as in k8s/pod.py's rank_threads). */}}
{{- define "ct3d.rankThreads" -}}
{{- $cpu := toString .cpu -}}
{{- $cores := 0.0 -}}
{{- if hasSuffix "m" $cpu -}}
{{- $cores = divf (trimSuffix "m" $cpu) 1000 -}}
{{- else -}}
{{- $cores = float64 $cpu -}}
{{- end -}}
{{- max 1 (int (floor (divf $cores (max 1 (int .ranks))))) -}}
{{- end -}}

{{/* The containers' env: .indexed adds the pod index; .trains (the container holding the pod's GPUs: .gpus of
them, .cpu its CPU, where not the training pod's) adds CT3D_EXPECT_GPU, so CUDA missing there is the node's fault
(exit 151), not a config error, and OMP_NUM_THREADS (ct3d.rankThreads) unless .Values.env sets it. */}}
{{- define "ct3d.env" -}}
{{- $gpus := ternary .gpus .root.Values.gpus (hasKey . "gpus") -}}
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
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{- if and .trains (gt (int $gpus) 0) }}
- name: CT3D_EXPECT_GPU
  value: "1"
{{- end }}
{{- if and .trains (not (hasKey (.root.Values.env | default dict) "OMP_NUM_THREADS")) }}
- name: OMP_NUM_THREADS
  value: {{ include "ct3d.rankThreads" (dict "cpu" (.cpu | default .root.Values.cpu) "ranks" $gpus) | quote }}
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

{{/* .shmSize: the /dev/shm size when not .Values.shmSize (an embed pod's). */}}
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
    sizeLimit: {{ .shmSize | default .root.Values.shmSize }}
{{- end }}
{{- if .root.Values.dataClaim }}
- name: data
  persistentVolumeClaim:
    claimName: {{ .root.Values.dataClaim }}
    readOnly: true
{{- end }}
{{- end -}}

{{/* The pod fields every workload shares, up to (not including) its containers. .cpu: the cache fill's CPU
pods (their own node selector and tolerations; no priority, runtime class or affinity). */}}
{{- define "ct3d.podCommon" -}}
{{- $v := .root.Values -}}
{{- $gpu := not .cpu -}}
restartPolicy: {{ .restart | default "Never" }}
terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
{{- /* names quoted: the trainjob kind reads this back with fromYaml, where a bare y or n is a boolean */}}
{{- with $v.serviceAccountName }}
serviceAccountName: {{ . | quote }}
{{- end }}
{{- if and $gpu $v.priorityClassName }}
priorityClassName: {{ $v.priorityClassName }}
{{- end }}
{{- if and $gpu $v.runtimeClassName }}
runtimeClassName: {{ $v.runtimeClassName }}
{{- end }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . | quote }}
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
{{- with (ternary $v.nodeSelector $v.cacheNodeSelector $gpu) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $gpu }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- with (ternary $v.tolerations $v.cacheTolerations $gpu) }}
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
    {{- include "ct3d.mounts" (dict "root" .root "output" true "shm" false) | nindent 4 }}
  {{- include "ct3d.containerSecurity" . | nindent 2 }}
{{- end -}}

{{- define "ct3d.amounts" -}}
{{- $v := .Values -}}
cpu: {{ $v.cpu | quote }}
memory: {{ $v.memory }}
{{- if gt (int $v.gpus) 0 }}
nvidia.com/gpu: {{ int $v.gpus }}
{{- end }}
{{- range $name, $count := $v.extraResources }}
{{ $name }}: {{ int $count }}
{{- end }}
{{- end -}}

{{- define "ct3d.resources" -}}
requests:
  {{- include "ct3d.amounts" . | nindent 2 }}
limits:
  {{- include "ct3d.amounts" . | nindent 2 }}
{{- end -}}

{{/* torchrun's --shutdown-timeout: the grace period less 30 s (half of it below a minute). */}}
{{- define "ct3d.shutdownTimeout" -}}
{{- $grace := int .Values.terminationGracePeriodSeconds -}}
{{- ternary (sub $grace 30) (div $grace 2) (ge $grace 60) -}}
{{- end -}}

{{/* engine.launch's flags shared by every kind: processes per node, restarts (.restarts), shutdown timeout. */}}
{{- define "ct3d.launchFlags" -}}
--nproc-per-node={{ max 1 (int .root.Values.gpus) }} --max-restarts={{ .restarts }} --shutdown-timeout={{ include "ct3d.shutdownTimeout" .root }}
{{- end -}}

{{/* Several nodes meeting at .host (pod 0), through sh (pod 0 hosts the store). */}}
{{- define "ct3d.rendezvousCommand" -}}
{{- $v := .root.Values -}}
{{- $flags := include "ct3d.launchFlags" . | splitList " " -}}
{{- printf "exec python -m engine.launch --nnodes=%d %s --rdzv-backend=c10d --rdzv-endpoint=%s:%v --rdzv-id=%s --rdzv-conf=is_host=$(test \"$JOB_COMPLETION_INDEX\" = 0 && echo 1 || echo 0),join_timeout=1800,read_timeout=1800 %s %s -m engine.run train --config /etc/ct3d/config.yaml" (int $v.nodes) (index $flags 0) .host $v.masterPort (include "ct3d.name" .root) (index $flags 1) (index $flags 2) -}}
{{- end -}}

{{/* A batch/v1 Job's podFailurePolicy: node disruptions do not count (.ignoreDisruptions); a permanent exit
(2: user error, 3: attempts used up) in one of .containers fails the Job; 143, 150, 151 count. */}}
{{- define "ct3d.failurePolicy" -}}
rules:
  {{- if .ignoreDisruptions }}
  - action: Ignore
    onPodConditions:
      - type: DisruptionTarget
        status: "True"
  {{- end }}
  {{- range .containers }}
  - action: FailJob
    onExitCodes:
      containerName: {{ . }}
      operator: In
      values: [2, 3]
  {{- end }}
{{- end -}}

{{/* The JobSet's failurePolicy (a kind jobset run's, and ct3d's ClusterTrainingRuntime's): a Job failed by its
podFailurePolicy or its deadline (per attempt) fails the set; any other failure restarts the gang. */}}
{{- define "ct3d.gangFailurePolicy" -}}
maxRestarts: {{ .Values.maxRestarts }}
restartStrategy: Recreate
rules:
  - name: userError
    action: FailJobSet
    onJobFailureReasons: [PodFailurePolicy]
  - name: deadline
    action: FailJobSet
    onJobFailureReasons: [DeadlineExceeded]
{{- end -}}
