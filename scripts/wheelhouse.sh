#!/usr/bin/env bash
# Fills wheelhouse/ with every wheel the worker image installs, using this machine's pip (its proxy, certificates
# and package mirrors), so the image builds without any network: PIP_NO_INDEX=1 docker compose build.
# The wheels are for the image, not for this machine: CPython 3.11 on x86-64 Linux (glibc 2.17 or newer), which
# python:3.11-slim and Debian bookworm are. Any machine with pip can fill it (even macOS or another Python).
#   ALLINONE_TORCH_INDEX  where the CPU build of torch comes from, next to pip's own indexes and find-links
#                         (default https://download.pytorch.org/whl/cpu)
#   WHEELHOUSE_PYTHON     the image's Python version (default 3.11)
# Idempotent: wheels already in the folder are not downloaded again, and with --check nothing is downloaded
# while the folder already holds everything IMAGE's Python needs.
#
#   bash scripts/wheelhouse.sh [--check IMAGE]
# pip decides a dependency's environment markers (python_full_version < "3.11.3", python_version < "3.12") with
# this machine's Python, not the image's. --check IMAGE resolves the requirements again with IMAGE's Python,
# offline (a container without network), and downloads what that Python needs too, until nothing is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
check_image=""
if [ "${1:-}" = "--check" ]; then check_image=${2:?--check needs an image}; fi
python=${PYTHON:-python3}
torch_index=${ALLINONE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
py=${WHEELHOUSE_PYTHON:-3.11}
abi=cp${py/./}
dest=wheelhouse
mkdir -p "$dest"

t0=$(date +%s%N)
since() { awk -v a="$1" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'; }

# pip accepts only exact platform tags: list every glibc from bookworm's (2.36) down to manylinux2014's (2.17;
# pip adds manylinux2010 and manylinux1 itself).
platforms=(--platform manylinux2014_x86_64)
for minor in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
target=(--only-binary=:all: --implementation cp --python-version "$py" --abi "$abi" "${platforms[@]}")

# The local version label +cpu is what keeps the CUDA build out: PyPI's torch 2.13.0 (CUDA, several GB with its
# nvidia-* wheels) does not match ==2.13.0+cpu, only a CPU build does, wherever it comes from.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0+cpu" > "$constraints"

# The project's dependencies and its worker, web and metrics extras (what the Dockerfile installs), read from
# pyproject.toml, plus what pip needs to build the project itself inside the image (setuptools, wheel).
requirements=$("$python" - <<'PY'
try:
    import tomllib
except ImportError:  # Python 3.10: pip carries a copy
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    doc = tomllib.load(f)
project = doc["project"]
extras = project["optional-dependencies"]
print("\n".join(["torch==2.13.0"] + project["dependencies"] + extras["worker"] + extras["web"] + extras["metrics"]
                + doc["build-system"]["requires"] + ["wheel"]))
PY
)
mapfile -t reqs <<< "$requirements"

# The folder is a find-links source, so the resolver takes torch from the file downloaded first.
download() { "$python" -m pip download --quiet --dest "$dest" --find-links "$dest" "${target[@]}" -c "$constraints" "$@"; }

# Resolves the requirements with the image's Python, offline; prints pip's complaint when something is missing.
check() {
  docker run --rm -i --network none -v "$PWD/$dest:/wheelhouse:ro" -e PIP_NO_INDEX=1 \
    -e PIP_DISABLE_PIP_VERSION_CHECK=1 --entrypoint sh "$check_image" -c \
    'python3 -m venv /tmp/venv && /tmp/venv/bin/pip install --quiet --dry-run --find-links /wheelhouse \
     -r /dev/stdin' <<< "$requirements" 2>&1
}

if [ -n "$check_image" ] && check > /dev/null; then
  echo "wheelhouse: already complete for $check_image's Python" >&2
else
  if ! compgen -G "$dest/torch-2.13.0+cpu-$abi-*.whl" > /dev/null; then
    t=$(date +%s%N)
    "$python" -m pip download --quiet --no-deps --dest "$dest" "${target[@]}" \
      --extra-index-url "$torch_index" "torch==2.13.0+cpu"
    echo "wheelhouse: torch 2.13.0+cpu in $(since "$t") s" >&2
  fi
  t=$(date +%s%N)
  download "${reqs[@]}"
  echo "wheelhouse: dependencies in $(since "$t") s" >&2
  if [ -n "$check_image" ]; then
    t=$(date +%s%N)
    complete=""
    for _ in $(seq 20); do
      if out=$(check); then
        complete=yes
        break
      fi
      missing=$(sed -n 's/.*No matching distribution found for //p' <<< "$out")
      [ -n "$missing" ] || { echo "$out" >&2; exit 1; }
      echo "wheelhouse: $check_image's Python also needs: $missing" >&2
      download "${missing%%;*}"
    done
    [ -n "$complete" ] || { echo "wheelhouse: still incomplete for $check_image" >&2; exit 1; }
    echo "wheelhouse: complete for $check_image's Python (checked in $(since "$t") s)" >&2
  fi
fi

# Refuse a wheelhouse that could put a GPU build of torch into the image.
if compgen -G "$dest/nvidia_*" > /dev/null || compgen -G "$dest/triton-*" > /dev/null; then
  echo "wheelhouse: CUDA wheels found in $dest (nvidia-*, triton): remove them and run again" >&2
  exit 1
fi
echo "wheelhouse: $(find "$dest" -name '*.whl' | wc -l) wheels, $(du -sh "$dest" | cut -f1), in $(since "$t0") s" >&2
