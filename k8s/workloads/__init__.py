"""One module per workload kind, each with `objects(cfg)`: the objects that run the training (or the sweep,
the cache fill, the embeddings) on the pod that k8s/pod.py builds. batch.py holds what the batch/v1 Jobs share,
runtime.py the ClusterTrainingRuntime a TrainJob runs on."""
