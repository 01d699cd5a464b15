#!/usr/bin/env bash
# Build the container image from deploy/Dockerfile with podman (or docker where that is
# what the machine has): `make image` runs this after `make wheels`.
#
#   deploy/build-image.sh [IMAGE]        (default localhost/dnsproxy:latest)
#
# When the Dockerfile's base image (debian:bookworm-slim) is not present locally and no
# registry can be reached, it is made with `mmdebstrap --variant=minbase bookworm` and
# imported under that name; with the base image present this step is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${1:-localhost/dnsproxy:latest}
BASE=docker.io/library/debian:bookworm-slim
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' dnsproxy/__init__.py)
SOURCE=$(git config --get remote.origin.url 2>/dev/null || echo unknown)
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
DIGEST=$(python3 deploy/source_digest.py)
ls build/wheels/dnsproxy-*.whl >/dev/null 2>&1 || { echo "no wheels: run make wheels" >&2; exit 2; }

if command -v podman >/dev/null; then
    ENGINE=podman
    # runc and no default ulimits (see deploy/containers.conf), unless the caller chose.
    export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/containers.conf}
elif command -v docker >/dev/null; then
    ENGINE=docker
else
    echo "neither podman nor docker is installed (apt-get install podman runc)" >&2
    exit 2
fi

if ! $ENGINE image inspect "$BASE" >/dev/null 2>&1 && ! $ENGINE pull -q "$BASE" >/dev/null 2>&1; then
    command -v mmdebstrap >/dev/null || { echo "no $BASE and no mmdebstrap to make it" >&2; exit 2; }
    echo "$BASE not available: making it with mmdebstrap (minbase bookworm)" >&2
    tarball=$(mktemp /tmp/dnsproxy-base-XXXXXX.tar)
    trap 'rm -f "$tarball"' EXIT
    # Slimmed as Debian's own -slim images are: no man pages, docs or translations.
    mmdebstrap --quiet --variant=minbase --format=tar \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/lintian/*' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        bookworm "$tarball"
    $ENGINE import --change 'CMD ["bash"]' "$tarball" "$BASE" >/dev/null
fi

previous=$($ENGINE image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
build=(build)
[ "$ENGINE" = podman ] && build+=(--pull=never)
$ENGINE "${build[@]}" -f deploy/Dockerfile -t "$IMAGE" \
    --build-arg "BASE=$BASE" \
    --build-arg "VERSION=$VERSION" \
    --build-arg "SOURCE=$SOURCE" \
    --build-arg "REVISION=$REVISION" \
    --build-arg "SOURCE_DIGEST=$DIGEST" \
    .
# The image this one replaces under the tag, unless something still uses it.
current=$($ENGINE image inspect --format '{{.Id}}' "$IMAGE")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    $ENGINE rmi "$previous" >/dev/null 2>&1 || true
fi
echo "$IMAGE: $($ENGINE image inspect --format '{{.Size}}' "$IMAGE") bytes"
