#!/usr/bin/env python3
"""Lints and renders charts/poolkeeper with Helm's own library (PyPI's helm-python-sdk bundles
Helm v4's engine: no helm binary is needed), for the chart's tests.

    e2e/chart.py lint KUBE_VERSION [VALUES.yaml]
    e2e/chart.py render NAMESPACE [VALUES.yaml]      (the manifests on stdout, CRDs first)

Exit 1 with the findings when lint reports a warning or an error, or a template fails.
"""
import json
import sys
from pathlib import Path

import helm_python
from helm_python import chart

CHART = Path(__file__).resolve().parent.parent / "charts" / "poolkeeper"


def values(path):
    if not path:
        return None
    return helm_python.chart.values_from_yaml(Path(path).read_text())


def main(argv):
    if len(argv) < 2 or argv[0] not in ("lint", "render"):
        print(__doc__, file=sys.stderr)
        return 2
    vals = values(argv[2] if len(argv) > 2 else None)
    if argv[0] == "lint":
        report = chart.lint(str(CHART), vals, strict=True, kube_version="v" + argv[1])
        problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
        problems += [{"error": e} for e in report.get("errors", []) or []]
        if problems:
            print(json.dumps(problems, indent=2), file=sys.stderr)
            return 1
        return 0
    c = chart.Chart.load(str(CHART))
    try:
        out = c.render(vals, name="poolkeeper", namespace=argv[1], is_install=True)
    except helm_python.HelmError as e:
        print(f"render failed: {e}", file=sys.stderr)
        return 1
    for crd in c.crds:
        text = crd["data"]
        print(text.strip())
        print("---")
    for path in sorted(out):
        text = out[path].strip()
        if path.endswith("NOTES.txt") or not text:
            continue
        print(f"# Source: {path}")
        print(text)
        print("---")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
