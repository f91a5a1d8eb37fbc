"""The `k8s` section: how `python -m k8s render` (and the Helm chart) places a run on a cluster: the image,
pods, GPUs and nodes, the workload kind, claims and the scheduling knobs. Declared apart from the training
settings (schema.py) because it grows with each workload kind and cluster feature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

from engine.config.fields import DNS_LABEL, QUANTITY, choice, setting

PullPolicy = choice("PullPolicy", "IfNotPresent", "Always", "Never")
# auto: ReadWriteOnce when one pod mounts the claim at a time on one node, ReadWriteMany when pods on several do
AccessMode = choice("AccessMode", "auto", "ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod")
# job: an Indexed Job with torchrun's c10d rendezvous; jobset: a JobSet (kubernetes-sigs; the gang restarts
# together); trainjob: Kubeflow Trainer v2's TrainJob; pytorchjob: Kubeflow Training Operator's PyTorchJob (v1)
K8sKind = choice("K8sKind", "job", "jobset", "trainjob", "pytorchjob")


@dataclass
class VolumeClaimConfig:
    name: str = setting("", pattern=DNS_LABEL)  # claim name; empty: cache <data+preprocessing hash>, output <name>
    existing: bool = False  # true: mount a claim that already exists, render none
    size: str = setting("100Gi", pattern=QUANTITY)  # the claim's requested storage
    access_mode: AccessMode = AccessMode.auto  # several nodes need ReadWriteMany (EFS, Filestore, CephFS, NFS)


@dataclass
class K8sConfig:
    """`python -m k8s render` turns this section (and the rest of the config) into Kubernetes objects."""

    name: str = setting("ct3d-train", pattern=DNS_LABEL)  # Job name; also the run folder on the output claim
    namespace: str = setting("default", pattern=DNS_LABEL)  # namespace of every object
    kind: K8sKind = K8sKind.job  # workload kind: job, jobset, trainjob or pytorchjob (see K8sKind above)
    image: str = "ghcr.io/ct3d/ct3d:0.1.0"  # container image with ct3d installed
    image_pull_policy: PullPolicy = PullPolicy.IfNotPresent  # the containers' imagePullPolicy
    image_pull_secrets: List[str] = setting([])  # Secrets (docker-registry) for a private registry
    service_account: str = setting("", pattern=DNS_LABEL)  # empty: the namespace's default
    nodes: int = setting(1, ge=1)  # pods; more than 1: torchrun's c10d rendezvous at pod 0
    gpus: int = setting(1, ge=0)  # GPUs per pod, also torchrun's --nproc-per-node
    cpu: str = setting("", pattern=QUANTITY)  # per pod; empty: cpu_per_gpu x GPUs (8 without GPUs)
    memory: str = setting("", pattern=QUANTITY)  # per pod; empty: memory_per_gpu x GPUs plus shm (it counts)
    shm_size: str = setting("", pattern=QUANTITY)  # memory-backed /dev/shm; empty: shm_per_gpu x GPUs
    # per GPU, sized so a 1-GPU pod fits a common 1-GPU node (8 vCPU, 32 GiB: g5.2xlarge, g2-standard-8) after
    # the kubelet's reserve; raise them on larger nodes (8 GPUs with 96 vCPU and 1 TB: cpu_per_gpu=11, ...)
    cpu_per_gpu: int = setting(6, ge=1)
    memory_per_gpu: int = setting(22, ge=1)  # GiB
    shm_per_gpu: int = setting(4, ge=1)  # GiB
    labels: Dict[str, str] = setting({})  # added to every object
    annotations: Dict[str, str] = setting({})  # added to the workload and its pods
    queue: str = setting("", pattern=DNS_LABEL)  # Kueue LocalQueue (label kueue.x-k8s.io/queue-name)
    priority_class: str = setting("", pattern=DNS_LABEL)  # the pods' priorityClassName
    node_selector: Dict[str, str] = setting({})  # the training pods' nodeSelector
    affinity: Dict[str, Any] = setting({})  # the pods' affinity, as in a pod spec
    tolerations: List[Dict[str, Any]] = setting([])  # as in a pod spec (tolerationSeconds a number)
    env: Dict[str, str] = setting({})  # extra container env, e.g. NCCL_SOCKET_IFNAME, NCCL_IB_DISABLE
    runtime_class: str = setting("", pattern=DNS_LABEL)  # the training pods' runtimeClassName (e.g. nvidia)
    # per-pod extended resources besides the GPUs, requested and limited, e.g. {vpc.amazonaws.com/efa: 4} or
    # {rdma/ib: 1}: without them multi-node NCCL falls back to TCP
    extra_resources: Dict[str, int] = setting({})
    # kind trainjob: empty: ct3d's own ClusterTrainingRuntime, rendered with the run (gang restarts, exit 2 fails at
    # once); a name: that ClusterTrainingRuntime (e.g. the stock torch-distributed, whose failure policy applies)
    trainjob_runtime: str = setting("", pattern=DNS_LABEL)
    # the cache-fill pods' placement: CPU work, so none of the GPU pods' tolerations, priority or queue; a node
    # selector (e.g. {topology.kubernetes.io/zone: us-east-1a}) binds a zonal disk where the GPUs are
    cache_node_selector: Dict[str, str] = setting({})
    cache_tolerations: List[Dict[str, Any]] = setting([])  # the cache-fill pods' tolerations
    cache_queue: str = setting("", pattern=DNS_LABEL)  # Kueue LocalQueue for the cache-fill Job; empty: none
    storage_class: str = ""  # empty: the cluster's default
    cache: VolumeClaimConfig = setting(VolumeClaimConfig(size="500Gi"))
    output: VolumeClaimConfig = setting(VolumeClaimConfig(size="50Gi"))
    data_claim: str = setting("", pattern=DNS_LABEL)  # an existing claim holding the data set, read-only at /data
    cache_pods: int = setting(1, ge=1)  # the cache-fill Indexed Job's pods (more than 1 need a ReadWriteMany cache)
    # > 0: an embed Indexed Job of this many pods, one GPU each (the training pods' placement), runs the frozen
    # encoder once per volume (model.freeze, merlin / ctfm, augment off) so training starts on cached embeddings
    embed_pods: int = setting(0, ge=0)
    wandb_secret: str = setting("wandb", pattern=DNS_LABEL)  # Secret with key `api-key`; optional for the job
    # failures per pod index (not node disruptions) before the Job fails; pytorchjob: each pod's starts are
    # counted on the output claim and engine.launch ends with exit 3 after backoff_limit + 1
    backoff_limit: int = setting(3, ge=0)
    # job and pytorchjob: torchrun's restarts of the worker group (a lost rank, a replaced pod); jobset and
    # trainjob on ct3d's runtime: the JobSet's restarts of the whole gang (torchrun restarts nothing there)
    max_restarts: int = setting(3, ge=0)
    termination_grace_seconds: int = setting(300, ge=30)  # SIGTERM to kill: time for the interruption checkpoint
    # seconds the run may take (jobset: each attempt, as a gang restart starts the Job's clock again); 0: none
    active_deadline_seconds: int = setting(0, ge=0)
    ttl_seconds_after_finished: int = setting(604800, ge=0)  # finished Jobs are deleted after this
    run_as_user: int = setting(1000, ge=1)  # pods run as this non-root user (0, root, is refused)
    master_port: int = setting(29500, ge=1, le=65535)  # torchrun's rendezvous port on pod 0
    sweep_workers: int = setting(0, ge=0)  # > 0: also render a sweep Job of this many worker pods
