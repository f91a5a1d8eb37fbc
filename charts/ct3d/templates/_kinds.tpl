{{/* The training container's command for the Job and JobSet kinds (.restarts: torchrun's --max-restarts;
.host: pod 0's DNS name for several nodes). */}}
{{- define "ct3d.trainCommand" -}}
{{- $v := .root.Values -}}
{{- $nodes := int $v.nodes -}}
{{- $gpus := int $v.gpus -}}
{{- if and (eq $nodes 1) (le $gpus 1) }}
- python
{{- else if eq $nodes 1 }}
- python
- -m
- engine.launch
- --standalone
- --nnodes=1
{{- range (include "ct3d.launchFlags" . | splitList " ") }}
- {{ . }}
{{- end }}
{{- else }}
- sh
- -c
- {{ include "ct3d.rendezvousCommand" . | toJson }}
{{- end }}
{{- if le $nodes 1 }}
- -m
- engine.run
- train
- --config
- /etc/ct3d/config.yaml
{{- end }}
{{- end -}}

{{/* k8s.kind=jobset: one replicated Job of .nodes Indexed pods; the gang restarts together, exit 2 or 3 fails it. */}}
{{- define "ct3d.jobset" -}}
{{- $root := .root -}}
{{- $nodes := .nodes -}}
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  {{- include "ct3d.jobMetadata" (dict "root" $root "name" .name "component" "training") | nindent 2 }}
spec:
  network:
    enableDNSHostnames: true
    publishNotReadyAddresses: true
  successPolicy:
    operator: All
    targetReplicatedJobs: [workers]
  failurePolicy:
    {{- include "ct3d.gangFailurePolicy" $root | nindent 4 }}
  ttlSecondsAfterFinished: {{ $root.Values.ttlSecondsAfterFinished }}
  replicatedJobs:
    - name: workers
      replicas: 1
      template:
        metadata:
          labels:
            {{- include "ct3d.labels" (dict "root" $root "component" "training") | nindent 12 }}
        spec:
          completionMode: Indexed
          completions: {{ $nodes }}
          parallelism: {{ $nodes }}
          backoffLimit: 0
          {{- if $root.Values.activeDeadlineSeconds }}
          activeDeadlineSeconds: {{ $root.Values.activeDeadlineSeconds }}
          {{- end }}
          podFailurePolicy:
            {{- include "ct3d.failurePolicy" (dict "containers" (list "check" "train") "ignoreDisruptions" false) | nindent 12 }}
          template:
            {{- include "ct3d.template" (dict "root" $root "component" "training") | nindent 12 }}
            spec:
              {{- include "ct3d.podCommon" (dict "root" $root) | nindent 14 }}
              initContainers:
                {{- include "ct3d.checkContainer" (dict "root" $root) | nindent 16 }}
              containers:
                - name: train
                  image: {{ $root.Values.image }}
                  imagePullPolicy: {{ $root.Values.imagePullPolicy }}
                  command:
                    {{- include "ct3d.trainCommand" (dict "root" $root "restarts" 0 "host" (printf "%s-workers-0-0.%s" .name .name)) | nindent 20 }}
                  env:
                    {{- include "ct3d.env" (dict "root" $root "indexed" true "trains" true) | nindent 20 }}
                  {{- if gt $nodes 1 }}
                  ports:
                    - name: rendezvous
                      containerPort: {{ $root.Values.masterPort }}
                  {{- end }}
                  resources:
                    {{- include "ct3d.resources" $root | nindent 20 }}
                  volumeMounts:
                    {{- include "ct3d.mounts" (dict "root" $root "output" true "shm" true) | nindent 20 }}
                  {{- include "ct3d.containerSecurity" $root | nindent 18 }}
              volumes:
                {{- include "ct3d.volumes" (dict "root" $root "output" true "shm" true) | nindent 16 }}
{{- end -}}

{{/* The ClusterTrainingRuntime a TrainJob runs on: trainjobRuntime, or ct3d's own for this release (cluster-scoped:
named by the namespace and the name). */}}
{{- define "ct3d.runtimeName" -}}
{{- .Values.trainjobRuntime | default (printf "ct3d.%s.%s" .Release.Namespace (include "ct3d.name" .)) -}}
{{- end -}}

{{/* ct3d's own ClusterTrainingRuntime (trainjobRuntime empty): a JobSet under the gang failure policy of kind
jobset, one `node` Job (backoffLimit 0, a permanent exit fails it), the priority and runtime class. */}}
{{- define "ct3d.trainingRuntime" -}}
{{- $v := .Values -}}
apiVersion: trainer.kubeflow.org/v1alpha1
kind: ClusterTrainingRuntime
metadata:
  name: {{ include "ct3d.runtimeName" . }}
  labels:
    {{- include "ct3d.labels" (dict "root" . "component" "training-runtime") | nindent 4 }}
spec:
  mlPolicy:
    numNodes: {{ int $v.nodes }}
    torch: {}
  template:
    spec:
      failurePolicy:
        {{- include "ct3d.gangFailurePolicy" . | nindent 8 }}
      replicatedJobs:
        - name: node
          template:
            metadata:
              labels:
                trainer.kubeflow.org/trainjob-ancestor-step: trainer
            spec:
              backoffLimit: 0
              podFailurePolicy:
                {{- include "ct3d.failurePolicy" (dict "containers" (list "node") "ignoreDisruptions" false) | nindent 16 }}
              template:
                spec:
                  restartPolicy: Never
                  {{- with $v.priorityClassName }}
                  priorityClassName: {{ . }}
                  {{- end }}
                  {{- with $v.runtimeClassName }}
                  runtimeClassName: {{ . }}
                  {{- end }}
                  containers:
                    - name: node
                      image: {{ $v.image }}
{{- end -}}

{{/* k8s.kind=trainjob: Kubeflow Trainer v2's TrainJob on a ClusterTrainingRuntime; claims and placement as a
runtime patch of its `node` pods. */}}
{{- define "ct3d.trainjob" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
apiVersion: trainer.kubeflow.org/v1alpha1
kind: TrainJob
metadata:
  {{- include "ct3d.jobMetadata" (dict "root" $root "name" .name "component" "training") | nindent 2 }}
spec:
  runtimeRef:
    name: {{ include "ct3d.runtimeName" $root }}
    kind: ClusterTrainingRuntime
    apiGroup: trainer.kubeflow.org
  trainer:
    image: {{ $v.image }}
    command:
      - sh
      - -c
      - {{ printf "python -m engine.run check --quick --config /etc/ct3d/config.yaml && exec python -m engine.launch %s --rdzv-conf=timeout=1800 -m engine.run train --config /etc/ct3d/config.yaml" (include "ct3d.launchFlags" (dict "root" $root "restarts" 0)) }}
    numNodes: {{ .nodes }}
    numProcPerNode: {{ max 1 .gpus }}
    resourcesPerNode:
      {{- include "ct3d.resources" $root | nindent 6 }}
    env:
      {{- include "ct3d.env" (dict "root" $root "indexed" false "trains" true) | nindent 6 }}
  {{- if $v.activeDeadlineSeconds }}
  activeDeadlineSeconds: {{ $v.activeDeadlineSeconds }}
  {{- end }}
  runtimePatches:
    - manager: ct3d
      trainingRuntimeSpec:
        template:
          spec:
            replicatedJobs:
              - name: node
                template:
                  spec:
                    template:
                      metadata:
                        labels:
                          {{- include "ct3d.labels" (dict "root" $root "component" "training") | nindent 26 }}
                      spec:
                        {{- $pod := include "ct3d.podCommon" (dict "root" $root) | fromYaml }}
                        {{- $_ := unset (unset (unset $pod "restartPolicy") "priorityClassName") "runtimeClassName" }}
                        {{- toYaml $pod | nindent 24 }}
                        volumes:
                          {{- include "ct3d.volumes" (dict "root" $root "output" true "shm" true) | nindent 26 }}
                        containers:
                          - name: node
                            volumeMounts:
                              {{- include "ct3d.mounts" (dict "root" $root "output" true "shm" true) | nindent 30 }}
                            {{- include "ct3d.containerSecurity" $root | nindent 28 }}
{{- end -}}
