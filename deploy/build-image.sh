#!/usr/bin/env bash
# Build the planemesh agent image offline, with one command:  deploy/build-image.sh [--tag NAME:TAG]
#
# Nothing is pulled from a container registry. The root filesystem comes from Debian packages (debootstrap
# from the Debian mirror this machine's apt is configured with) plus the project's wheel and its PyPI
# dependencies (pip, binary wheels for the image's Python); deploy/Containerfile adds it to an empty image
# (`buildah build`, FROM scratch). debootstrap and buildah are Debian packages: installed here if missing.
# The image is what deploy/planemesh-daemonset.yaml runs (default tag: localhost/planemesh:<version>).
# Env: PLANEMESH_IMAGE (tag), PLANEMESH_MIRROR (Debian mirror URL), PLANEMESH_IMAGE_WORK (scratch dir, kept
# if set), PYTHON (the interpreter that builds the wheel and runs pip; default the repo's .venv).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
suite=bookworm
pyver=3.11  # bookworm's python3: the wheels are chosen for it
PYTHON=${PYTHON:-$repo/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/pyproject.toml" | head -1)
tag=${PLANEMESH_IMAGE:-localhost/planemesh:$version}
if [ "${1:-}" = "--tag" ]; then tag=$2; fi

log() { printf '[build-image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# The first Debian (not -security) mirror in apt's sources, deb822 or one-line format.
debian_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        awk '/^URIs:/ {u=$2} /^Suites:/ && u ~ /\/debian\/?$/ {print u; exit}' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -e "$f" ] || continue
        awk '$1 == "deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' "$f" | grep -v '\[' || true
    done
}
mirror=${PLANEMESH_MIRROR:-$(debian_mirror | head -1)}
[ -n "$mirror" ] || { echo "build-image: no Debian mirror in /etc/apt/sources.list*; set PLANEMESH_MIRROR" >&2; exit 2; }

missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v buildah >/dev/null || missing+=(buildah)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

work=${PLANEMESH_IMAGE_WORK:-$(mktemp -d /var/tmp/planemesh-image.XXXXXX)}
[ -n "${PLANEMESH_IMAGE_WORK:-}" ] || trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
mkdir -p "$work/dist" "$work/ctx"
started=$(date +%s)

log "wheel of $repo"
# From a copy, so setuptools' build/ and egg-info land in the work directory, not in the repository.
rm -rf "$work/src" "$work/dist"/* && mkdir -p "$work/src"
tar -C "$repo" --exclude=./.venv --exclude=./.git --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ -cf - . | tar -C "$work/src" -xf -
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$work/src" >"$work/wheel.log" 2>&1 \
    || { cat "$work/wheel.log" >&2; exit 1; }
wheel=$(ls "$work"/dist/planemesh-*.whl)

if [ ! -x "$rootfs/usr/bin/python3" ]; then
    log "debootstrap $suite from $mirror"
    # minbase: essential packages + apt; python3-bpfcc brings libbcc and the LLVM/clang libraries it compiles
    # with (no clang or gcc binaries); recommends are not installed.
    debootstrap --variant=minbase --include=python3,python3-bpfcc,iproute2 "$suite" "$rootfs" "$mirror" \
        >"$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
fi

log "pip: $(basename "$wheel") and its dependencies (binary wheels for cp${pyver/./})"
site=$rootfs/usr/local/lib/python$pyver/dist-packages
# pip does not widen a manylinux_2_Y platform to older ones: list every glibc up to bookworm's 2.36.
platforms=()
for y in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${y}_x86_64"); done
"$PYTHON" -m pip install -q --no-cache-dir --disable-pip-version-check --upgrade \
    --target "$site" --only-binary=:all: "${platforms[@]}" --platform manylinux2014_x86_64 \
    --python-version "$pyver" --implementation cp --abi "cp${pyver/./}" \
    "$wheel" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
rm -rf "$site/bin"  # console scripts written for the build host's interpreter; ours is below
cat >"$rootfs/usr/local/bin/planemesh" <<'PY'
#!/usr/bin/python3
import sys

from planemesh.agent.cli import main

sys.exit(main())
PY
chmod 0755 "$rootfs/usr/local/bin/planemesh"

# Debug symbols of the wheels' extension modules (uvloop's is 13.6 MB, 1.6 MB stripped); Debian's are stripped.
if command -v strip >/dev/null; then
    find "$site" -name '*.so*' -type f -exec strip --strip-unneeded {} +
fi

log "byte-compile (the root filesystem is read-only at run time)"
# Plain and opt-2 .pyc: the agent and its children run with -OO (Containerfile PYTHONOPTIMIZE=2, module_argv),
# which reads only .opt-2.pyc, for the stdlib and Debian's packages (bcc, yaml) as much as for ours. A file that
# does not compile (a Python 2 era example in a package) is reported and skipped: nothing imports it.
chroot "$rootfs" /usr/bin/python3 -m compileall -q -j 0 -o 0 -o 2 \
    -x '/(test|tests|idlelib|tkinter|lib2to3|turtledemo)/' \
    /usr/local/lib/python$pyver/dist-packages /usr/lib/python$pyver /usr/lib/python3/dist-packages || true

log "trim: docs, man pages, locales, apt lists and caches, logs, tests"
rm -rf "$rootfs"/usr/share/{doc,man,info,lintian,linda,bash-completion,bug,common-licenses}/* \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/var/tmp/*
find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
find "$site" -depth -type d \( -name tests -o -name test \) -path '*/dist-packages/*/*' -exec rm -rf {} +
for tool in gcc cc c++ clang ld ld.bfd as make; do  # a compiler toolchain must not have crept in
    if [ -e "$rootfs/usr/bin/$tool" ]; then echo "build-image: $tool is in the image" >&2; exit 1; fi
done
# /run/planemesh, /sys/fs/bpf, /host/proc: mount points of the DaemonSet's volumes
mkdir -p "$rootfs/run/planemesh" "$rootfs/etc/planemesh" "$rootfs/host/proc"

log "rootfs $(du -sh --apparent-size "$rootfs" | cut -f1); buildah build -> $tag"
tar -C "$rootfs" --numeric-owner -cf "$work/ctx/rootfs.tar" .
cp "$repo/deploy/Containerfile" "$work/ctx/Containerfile"
buildah build --quiet --layers=false -f "$work/ctx/Containerfile" -t "$tag" "$work/ctx" >/dev/null
rm -f "$work/ctx/rootfs.tar"
size=$(buildah images --format '{{.Size}}' "$tag" | head -1)
log "built $tag: $size in $(( $(date +%s) - started )) s"
echo "$tag"
