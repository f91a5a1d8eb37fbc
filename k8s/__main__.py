"""`python -m k8s render --config FILE [key=value ...]`: a YAML stream for `kubectl apply -f -`.
`python -m k8s values --config FILE [key=value ...]`: the same run as Helm values for charts/ct3d."""

from __future__ import annotations

import argparse
import sys

from engine.config import DEFAULT_CONFIG, load_config
from engine.errors import CT3DError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k8s", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("render", "values"))
    parser.add_argument("--config", help="ct3d YAML config (default: configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        from k8s.render import helm_values, render

        text = render(cfg) if args.action == "render" else helm_values(cfg)
    except CT3DError as exc:
        print(f"ct3d: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
