#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, then every test of the workspace
# (unit, simulation and property tests, loader, directory watcher, CLI, CRD drift and validity,
# and end to end against the Docker Engine here, chaos and a full disk included), then the VM's
# playbook and unit (e2e/vm), then each fuzz target for 60 s (e2e/fuzz.sh).
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
# schemathesis (PyPI) checks that the HTTP API follows its OpenAPI document.
if [ ! -x "$venv/bin/schemathesis" ]; then
  echo "installing schemathesis into $venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check schemathesis==4.32.5
fi
export SCHEMATHESIS="$PWD/$venv/bin/schemathesis"
# Helm's own library (PyPI's helm-python-sdk bundles Helm v4's engine; no helm binary is in the
# registries CI reaches) lints and renders the chart (e2e/chart.py).
if ! "$venv/bin/python" -c 'import helm_python' >/dev/null 2>&1; then
  echo "installing helm-python-sdk into $venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check helm-python-sdk==0.2.2
fi
export HELM_PYTHON="$PWD/$venv/bin/python"

# The quickstart's images, built from Debian packages (cached by tag; about 80 s the first time).
# The Docker end-to-end tests build their own workload image, and fail without these.
e2e/build-images.sh
# Local stand-ins for the public images the Pod Manager examples name.
e2e/tag-pod-manager-images.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
# Every test binary runs, also after one fails, so that the closing count covers them all.
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# The VM (docs/vm.md): ansible-lint, vagrant validate, and ansible/site.yml applied for real to
# Debian containers with systemd as PID 1, with the binary cargo test built (about 2.5 minutes).
python3 e2e/vm/test-vm.py --binary target/debug/poolkeeper 2>&1 | tee -a "$log"
vm_status=${PIPESTATUS[0]}
# Coverage-guided fuzzing (docs/fuzzing.md): each target 60 s from its seeds; any crash fails.
e2e/fuzz.sh 60 2>&1 | tee -a "$log"
fuzz_status=${PIPESTATUS[0]}
set -e
[ "$status" -ne 0 ] || status=$vm_status
[ "$status" -ne 0 ] || status=$fuzz_status
# One closing line for the whole run (cargo prints one per test binary, the VM test its own,
# the fuzzing one per target: a target that ran clean is one test passed).
awk '/^(test result|vm):/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     /^fuzz: .* ok / { p += 1 } /^fuzz: .* FAILED/ { f += 1 }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
