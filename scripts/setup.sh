#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine (run as root): system packages, kernel headers
# for bcc (with the header link when the running kernel ships none), bpffs, and the project venv.
# Quick when everything is already in place: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    say "planemesh needs root (netns, BPF, netlink); re-run as root"; exit 1
fi

# --- system packages --------------------------------------------------------------------------
APT_PKGS=(python3-bpfcc python3-venv linux-headers-amd64 iproute2 curl openssl wrk nghttp2-client
          nginx-light iptables nftables ethtool procps)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# nginx from the package starts a system service on :80 of the machine; we only use the binary.
if systemctl is-active --quiet nginx 2>/dev/null; then systemctl disable --now nginx >/dev/null 2>&1 || true; fi

# --- kernel headers for bcc -------------------------------------------------------------------
# Where the running kernel has no headers of its own, point its build/source links at the newest
# Debian headers: TC, sockops and cgroup programs only use UAPI headers, which this is enough for.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    [ -n "$hdr" ] || { say "no linux-headers-*-amd64 under /usr/src"; exit 1; }
    common="${hdr%-amd64}-common"
    say "linking $kdir/build -> $hdr"
    mkdir -p "$kdir"
    ln -sfn "$hdr" "$kdir/build"
    ln -sfn "$common" "$kdir/source"
fi

# --- bpffs, for pinned maps that survive agent restarts --------------------------------------
if ! mountpoint -q /sys/fs/bpf; then
    mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf
fi

# --- Python venv: Debian's python3 (bcc's python module lives in its dist-packages) ----------
stamp_src=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$stamp_src" ]; then
    say "creating venv and installing Python dependencies"
    [ -x .venv/bin/python ] || /usr/bin/python3 -m venv --system-site-packages .venv
    .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$stamp_src" > .venv/.setup-stamp
fi
.venv/bin/python -c 'import bcc, pyroute2, grpc, httptools, uvloop' \
    || { say "venv is incomplete; remove .venv and re-run"; exit 1; }

# --- opt-2 byte code: the agent and every process it starts run with -OO (planemesh.module_argv) ------------
# -OO leaves docstrings out of memory (~0.8 MB of RSS per process), but it reads `.opt-2.pyc` files only: where
# they are missing (pip and Debian write plain .pyc; this machine sets PYTHONDONTWRITEBYTECODE) every start
# compiles each module from source, slower and larger. They are written here for the product (each run: only
# changed files are compiled), the venv and Python's own library (once per venv and Python version). The
# files under /usr/lib are caches (__pycache__), as Debian's own .pyc are: removing them costs start time only.
opt2() { .venv/bin/python -OO -m compileall -q -j 0 -x '/(test|tests|idlelib|tkinter|lib2to3|turtledemo)/' "$@"; }
opt2 agent model ebpf netplanes xds planemesh labs >/dev/null || say "opt-2 byte-compile of the product failed"
py_key="$stamp_src $(/usr/bin/python3 -VV) $(dpkg-query -W -f='${Version}' python3.11-minimal python3-bpfcc 2>/dev/null)"
if [ "$(cat .venv/.opt2-stamp 2>/dev/null)" != "$py_key" ]; then
    say "writing opt-2 byte code (-OO) of the venv, /usr/lib/python3/dist-packages and /usr/lib/python3.11"
    # Some packages there ship files that do not compile (Python 2 era examples): those are never imported.
    opt2 .venv/lib/python3.11/site-packages /usr/lib/python3/dist-packages /usr/lib/python3.11 >/dev/null || true
    echo "$py_key" > .venv/.opt2-stamp
fi
