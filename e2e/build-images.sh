#!/usr/bin/env bash
# Builds the nginx, apache, python, node and ssh images of the quickstart pools from Debian
# packages, with no registry: one `debootstrap --variant=minbase` root with every package,
# configured, imported once as a base, then a metadata-only build per type (all share one
# layer). Cached by tag: images already present are kept unless --force is given.
#
#   e2e/build-images.sh [--force]      (needs root for debootstrap, and Docker)
#
# Images: poolkeeper/{nginx,apache,python,node,ssh,redis}:bookworm. Every web type serves /srv/www
# (where the pools put a claim's files); ssh runs sshd with fresh host keys per container.
set -euo pipefail
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# The base tag names its package set: a new set gets a new tag, so that it is rebuilt.
BASE="poolkeeper/debian-base:$SUITE-2"
TYPES=(nginx apache python node ssh redis)
force=0
[[ "${1:-}" == "--force" ]] && force=1

missing=()
for t in "${TYPES[@]}"; do
  docker image inspect "poolkeeper/$t:$SUITE" >/dev/null 2>&1 || missing+=("$t")
done
if [[ $force == 0 && ${#missing[@]} == 0 ]]; then
  echo "images present: ${TYPES[*]/#/poolkeeper/} (:$SUITE); --force rebuilds"
  exit 0
fi

if [[ $force == 1 ]] || ! docker image inspect "$BASE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
  root="$(mktemp -d /var/tmp/poolkeeper-rootfs.XXXXXX)"
  trap 'rm -rf "$root"' EXIT
  echo "debootstrap $SUITE into $root (about a minute)"
  debootstrap --variant=minbase \
    --include=nginx-light,apache2,python3,nodejs,openssh-server,redis-server,ca-certificates \
    "$SUITE" "$root" "$MIRROR" >/dev/null

  # One document root for every web type: /srv/www.
  mkdir -p "$root/srv/www" "$root/data"
  echo "fresh instance" > "$root/srv/www/index.html"
  # nginx: Debian's default site is not enabled after debootstrap; serve /srv/www on :80.
  rm -f "$root/etc/nginx/sites-enabled/default"
  cat > "$root/etc/nginx/conf.d/poolkeeper.conf" <<'CONF'
server {
    listen 80 default_server;
    root /srv/www;
    index index.html;
}
CONF
  # apache: the same root.
  cat > "$root/etc/apache2/sites-available/000-default.conf" <<'CONF'
<VirtualHost *:80>
    DocumentRoot /srv/www
    <Directory /srv/www>
        Require all granted
    </Directory>
</VirtualHost>
CONF
  # node: a small static file server.
  mkdir -p "$root/opt/poolkeeper"
  cat > "$root/opt/poolkeeper/server.js" <<'JS'
const http = require('http'), fs = require('fs'), path = require('path');
const root = '/srv/www';
process.on('SIGTERM', () => process.exit(0));
http.createServer((req, res) => {
  let p = path.normalize(decodeURIComponent(req.url.split('?')[0]));
  if (p.endsWith('/')) p += 'index.html';
  const file = path.join(root, p);
  if (!file.startsWith(root)) { res.writeHead(403); return res.end(); }
  fs.readFile(file, (err, data) => {
    if (err) { res.writeHead(404); return res.end('not found\n'); }
    res.writeHead(200); res.end(data);
  });
}).listen(3000);
JS
  # ssh: no shared host keys in the image (each container makes its own), keys only.
  rm -f "$root"/etc/ssh/ssh_host_*
  cat > "$root/etc/ssh/sshd_config.d/poolkeeper.conf" <<'CONF'
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
CONF
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  echo "importing $BASE"
  tar -C "$root" -c . | docker import - "$BASE" >/dev/null
fi

build() { # type, then Dockerfile lines
  local t="$1"; shift
  local ctx; ctx="$(mktemp -d)"
  { echo "FROM $BASE"; printf '%s\n' "$@"; } > "$ctx/Dockerfile"
  local out; out="$(DOCKER_BUILDKIT=0 docker build -q -t "poolkeeper/$t:$SUITE" "$ctx" 2>&1)" || { echo "$out" >&2; exit 1; }
  rm -rf "$ctx"
  echo "built poolkeeper/$t:$SUITE"
}
build nginx 'EXPOSE 80' 'STOPSIGNAL SIGQUIT' 'CMD ["/usr/sbin/nginx", "-g", "daemon off;"]'
build apache 'EXPOSE 80' 'STOPSIGNAL SIGWINCH' 'CMD ["/usr/sbin/apache2ctl", "-D", "FOREGROUND"]'
build python 'EXPOSE 8000' 'WORKDIR /srv/www' 'CMD ["/usr/bin/python3", "-m", "http.server", "8000", "--directory", "/srv/www"]'
build node 'EXPOSE 3000' 'CMD ["/usr/bin/node", "/opt/poolkeeper/server.js"]'
build redis 'EXPOSE 6379' 'WORKDIR /data' 'CMD ["/usr/bin/redis-server", "--protected-mode", "no"]'
build ssh 'EXPOSE 22' 'CMD ["/bin/sh", "-c", "ssh-keygen -A >/dev/null && mkdir -p /run/sshd && exec /usr/sbin/sshd -D -e"]'
