"""`python -m k8s render --config FILE [--part claims|cache|embed|train|bench] [key=value ...]`: a YAML stream for
`kubectl apply -f -` (all parts: the claims, the ConfigMap, the cache-fill Job, the embed Job, the training
workload; bench, never in all: a one-GPU Job running `python -m bench gpu`, its results on the output claim).
`python -m k8s script --config FILE [key=value ...]`: a shell script that applies them in order, waiting
for the cache-fill Job, then the embed Job, to complete before the training starts.
`python -m k8s values --config FILE [key=value ...]`: the same run as Helm values for charts/ct3d."""

from __future__ import annotations

import argparse
import sys

from engine.config import DEFAULT_CONFIG
from engine.utils import CT3DError
from k8s.render import render
from k8s.settings import load_pod_config
from k8s.values import helm_values


def script(cfg) -> str:
    """Apply the claims, the cache-fill Job, wait for it, the embed Job, wait for it, then the training workload."""
    k = cfg.k8s
    lines = ["#!/bin/sh", f"# ct3d {k.name}: claims, cache fill, embeddings, then training", "set -eu"]
    steps = [("claims", None), ("cache", f"job/{k.name}-cache"), ("embed", f"job/{k.name}-embed"), ("train", None)]
    absent = {"cache": not cfg.cache.disk, "embed": not k.embed_pods}  # the part would be the ConfigMap alone
    for part, wait in steps:
        text = render(cfg, part)
        if not text.strip() or absent.get(part):
            continue
        lines += [f"kubectl apply -f - <<'CT3D_{part.upper()}'", text.rstrip("\n"), f"CT3D_{part.upper()}"]
        if wait:  # `kubectl wait --for=condition=complete` would wait out its timeout on a failed Job
            lines += [f"echo 'waiting for {wait}'",
                      f"until state=$(kubectl -n {k.namespace} get {wait} -o "
                      "jsonpath='{.status.conditions[?(@.status==\"True\")].type}') && case \"$state\" in "
                      f"*Complete*) true ;; *Failed*) echo '{wait} failed: kubectl -n {k.namespace} logs {wait}' >&2; "
                      "exit 1 ;; *) false ;; esac; do sleep 20; done"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k8s", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("render", "script", "values"))
    parser.add_argument("--config", help="ct3d YAML config (default: configs/default.yaml)")
    parser.add_argument("--part", choices=("all", "claims", "cache", "embed", "train", "bench"), default="all",
                        help="render: only these objects (claims once; cache, embed, then train; bench on its own)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_pod_config(args.config or DEFAULT_CONFIG, args.overrides)
        if args.action == "render":
            text = render(cfg, args.part)
        else:
            text = script(cfg) if args.action == "script" else helm_values(cfg)
    except CT3DError as exc:
        print(f"ct3d: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
