#!/usr/bin/env bash
# The old Pod Manager configs of examples/pod-manager/ name public images (nginx:alpine,
# redis:alpine, hello-world) that no registry here can give. This tags local stand-ins under
# those names, built from Debian packages (e2e/build-images.sh) and the project's own static
# workload (hello-world prints a greeting and exits 0), so that the configs run unchanged.
# A name that already exists (a real image) is left alone.
#
#   e2e/tag-pod-manager-images.sh      (after e2e/build-images.sh)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tag_if_missing() { # source, name
  if docker image inspect "$2" >/dev/null 2>&1; then
    echo "$2 present; kept"
  else
    docker tag "$1" "$2"
    echo "tagged $1 as $2"
  fi
}
tag_if_missing poolkeeper/nginx:bookworm nginx:alpine
tag_if_missing poolkeeper/redis:bookworm redis:alpine
if ! docker image inspect hello-world:latest >/dev/null 2>&1; then
  workload="$("$root/e2e/build-workload-image.sh")"
  ctx="$(mktemp -d)"
  trap 'rm -rf "$ctx"' EXIT
  printf 'FROM %s\nCMD ["hello"]\n' "$workload" > "$ctx/Dockerfile"
  out="$(DOCKER_BUILDKIT=0 docker build --quiet -t hello-world:latest "$ctx" 2>&1)" || { echo "$out" >&2; exit 1; }
  echo "built hello-world:latest from $workload"
else
  echo "hello-world:latest present; kept"
fi
