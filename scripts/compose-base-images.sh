#!/usr/bin/env bash
# Local stand-ins for the public base images, for a machine whose Docker cannot pull from a registry (the compose
# test runs on such machines). Built from Debian's own packages with debootstrap, then `docker import`:
#   allinone-local/python:3.11-bookworm  Debian 12 minbase + python3 (3.11), python3-venv, python3-pip,
#                                        ca-certificates: the worker's BASE_IMAGE, like python:3.11-slim
#   allinone-local/redis:7.0-bookworm    the same + Debian's redis-server (7.0), run as user redis in /data,
#                                        like redis:7-alpine: the compose file's REDIS_IMAGE
# Use them with:  BASE_IMAGE=allinone-local/python:3.11-bookworm REDIS_IMAGE=allinone-local/redis:7.0-bookworm
# Needs root (debootstrap), the debootstrap package and a Docker daemon. Images already there are kept; --force
# builds them again.
#   DEBIAN_MIRROR  default http://deb.debian.org/debian
set -euo pipefail
cd "$(dirname "$0")/.."
python_image=allinone-local/python:3.11-bookworm
redis_image=allinone-local/redis:7.0-bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
force=""
[ "${1:-}" = "--force" ] && force=yes

since() { awk -v a="$1" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'; }
have() { [ -z "$force" ] && docker image inspect "$1" > /dev/null 2>&1; }

if have "$python_image"; then
  echo "base-images: $python_image already there" >&2
else
  command -v debootstrap > /dev/null || { echo "base-images: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
  root=$(mktemp -d) log=$(mktemp)
  trap 'rm -rf "$root" "$log"' EXIT
  t=$(date +%s%N)
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "$mirror" > "$log" 2>&1 || { tail -20 "$log" >&2; exit 1; }
  # What a docker import does not bring: no apt lists or caches in the image.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
  echo "base-images: debootstrap in $(since "$t") s" >&2
  t=$(date +%s%N)
  # An imported image has no configuration: set what python:3.11-slim sets (a Dockerfile's ENV PATH=...:$PATH
  # would otherwise lose /usr/bin).
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$python_image" > /dev/null
  echo "base-images: $python_image imported in $(since "$t") s" >&2
fi

if have "$redis_image"; then
  echo "base-images: $redis_image already there" >&2
else
  t=$(date +%s%N)
  # Debian's mirrors answer over plain HTTP (packages are checked against Debian's keys), so apt works inside
  # a container even where a TLS-inspecting proxy breaks pip there.
  docker build --quiet -t "$redis_image" - > /dev/null <<EOF
FROM $python_image
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \\
    && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
VOLUME /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
EOF
  echo "base-images: $redis_image built in $(since "$t") s" >&2
fi
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep '^allinone-local/' >&2
