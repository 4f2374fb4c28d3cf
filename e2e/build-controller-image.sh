#!/usr/bin/env bash
# Builds the controller's image with no registry: the poolkeeper binary `FROM scratch`, with the
# C library it links (glibc: copied from this machine, as `ldd` lists it), the CA certificates
# (for https notification URLs and API servers) and a non-root user (65532, as the chart runs it).
#
#   e2e/build-controller-image.sh [--binary PATH] [TAG]     (default TAG poolkeeper:0.1.0)
#
# Without --binary it builds `cargo build --release -p poolkeeper` first. Push the tag to your
# own registry and set the chart's image.repository and image.tag (docs/kubernetes.md).
set -euo pipefail
cd "$(dirname "$0")/.."
binary=""
if [[ "${1:-}" == "--binary" ]]; then
  binary="$2"
  shift 2
fi
tag="${1:-poolkeeper:0.1.0}"
if [[ -z "$binary" ]]; then
  cargo build --release -p poolkeeper
  binary=target/release/poolkeeper
fi
[[ -x "$binary" ]] || { echo "no executable at $binary" >&2; exit 1; }
ca=/etc/ssl/certs/ca-certificates.crt
[[ -f "$ca" ]] || { echo "no CA bundle at $ca (apt-get install ca-certificates)" >&2; exit 1; }

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/etc/ssl/certs" "$ctx/rootfs/tmp"
cp "$binary" "$ctx/rootfs/poolkeeper"
cp "$ca" "$ctx/rootfs/etc/ssl/certs/ca-certificates.crt"
# The shared objects the binary loads, at the paths it looks them up.
ldd "$binary" | awk '/=> \// { print $3 } /^\t\/lib/ { print $1 }' | while read -r lib; do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n' > "$ctx/rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$ctx/rootfs/etc/group"
chmod 1777 "$ctx/rootfs/tmp"
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
USER 65532:65532
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
EXPOSE 7080
ENTRYPOINT ["/poolkeeper"]
CMD ["run", "--source=kube", "--runtime=docker"]
DOCKERFILE
DOCKER_BUILDKIT=0 docker build -q -t "$tag" "$ctx" >/dev/null
echo "built $tag from $binary ($(docker image inspect -f '{{.Size}}' "$tag") bytes)"
