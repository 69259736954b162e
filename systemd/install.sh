#!/bin/sh
# Install planemesh-agent.service, its environment file and a bootstrap into ROOT (default /).
#
#   ROOT=/            where to install (a staging tree for images and tests)
#   PLANEMESH_BIN=    the planemesh executable ExecStart runs (default: the one on PATH, else
#                     /usr/local/bin/planemesh), e.g. /opt/planemesh/venv/bin/planemesh
#   BOOTSTRAP=        a bootstrap YAML to install as /etc/planemesh/bootstrap.yaml if none exists yet
#   ENABLE=1          also `systemctl enable --now` (only when ROOT=/ and systemd is running)
#
# Never overwrites /etc/planemesh/planemesh.env or bootstrap.yaml: those are the operator's.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
ROOT=${ROOT:-/}
ROOT=${ROOT%/}
PLANEMESH_BIN=${PLANEMESH_BIN:-$(command -v planemesh || echo /usr/local/bin/planemesh)}
case "$PLANEMESH_BIN" in
    /*) ;;
    *) echo "install.sh: PLANEMESH_BIN must be an absolute path, got '$PLANEMESH_BIN'" >&2; exit 2 ;;
esac

unit_dir="$ROOT/etc/systemd/system"
conf_dir="$ROOT/etc/planemesh"
doc_dir="$ROOT/usr/local/share/doc/planemesh"
mkdir -p "$unit_dir" "$conf_dir" "$doc_dir"
chmod 0750 "$conf_dir"

# The unit with ExecStart pointing at this installation's executable.
sed "s|^ExecStart=/usr/local/bin/planemesh |ExecStart=$PLANEMESH_BIN |" \
    "$here/planemesh-agent.service" > "$unit_dir/planemesh-agent.service.tmp"
chmod 0644 "$unit_dir/planemesh-agent.service.tmp"
mv "$unit_dir/planemesh-agent.service.tmp" "$unit_dir/planemesh-agent.service"

[ -e "$conf_dir/planemesh.env" ] || install -m 0640 "$here/planemesh.env" "$conf_dir/planemesh.env"
if [ -n "${BOOTSTRAP:-}" ] && [ ! -e "$conf_dir/bootstrap.yaml" ]; then
    install -m 0640 "$BOOTSTRAP" "$conf_dir/bootstrap.yaml"
fi
if [ -e "$here/../docs/operations.md" ]; then
    install -m 0644 "$here/../docs/operations.md" "$doc_dir/operations.md"
fi

if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if [ "${ENABLE:-0}" = 1 ]; then
        systemctl enable --now planemesh-agent.service
    fi
fi
echo "installed planemesh-agent.service into ${ROOT:-/} (ExecStart $PLANEMESH_BIN)"
