#!/usr/bin/env bash
# Builds poolkeeper's own test image with no registry: the static pk-workload binary put
# FROM scratch. Prints the image tag. Usage: e2e/build-workload-image.sh [TAG]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tag="${1:-poolkeeper-workload:test}"
target="$(rustc -vV | sed -n 's/^host: //p')"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release -p pk-workload \
  --target "$target" --target-dir "$root/target/workload" --manifest-path "$root/Cargo.toml"
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
cp "$root/target/workload/$target/release/pk-workload" "$ctx/pk-workload"
mkdir -p "$ctx/srv"
echo "fresh instance" > "$ctx/srv/index.html"
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY pk-workload /pk-workload
COPY srv /srv
ENV PORT=8080
EXPOSE 8080
ENTRYPOINT ["/pk-workload"]
DOCKERFILE
out="$(DOCKER_BUILDKIT=0 docker build --quiet -t "$tag" "$ctx" 2>&1)" || { echo "$out" >&2; exit 1; }
echo "$tag"
