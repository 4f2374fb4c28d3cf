#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, then every test of the workspace
# (unit, simulation and property tests, loader, directory watcher, CLI, CRD drift and validity).
set -euo pipefail
cd "$(dirname "$0")/.."

# kubernetes-validate (PyPI) checks the generated CRDs; it lives in a venv under target/ so that
# nothing outside the checkout changes.
venv=target/tools/venv
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  echo "installing kubernetes-validate into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate
fi
export KUBERNETES_VALIDATE="$PWD/$venv/bin/kubernetes-validate"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
