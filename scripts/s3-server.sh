#!/usr/bin/env bash
# The local S3-compatible server the object-storage tests use: moto's
# server (PyPI's `moto`), in a virtualenv of its own, on 127.0.0.1 only.
#   scripts/s3-server.sh install        put moto into ~/.cache/sluice/tools/moto (once per
#                                       machine; about 30 s from PyPI)
#   scripts/s3-server.sh start [PORT]   run a server in the foreground (default 9000)
# The install lives outside any checkout, so every clone and CI run on the
# machine shares it. SLUICE_MOTO_SERVER names another moto_server binary.
set -euo pipefail
root="${SLUICE_TOOLS:-$HOME/.cache/sluice/tools}"
server="${SLUICE_MOTO_SERVER:-$root/moto/bin/moto_server}"
version=5.2.6

install() {
    if [ -x "$server" ] && "$root/moto/bin/python" -c "import moto, sys; sys.exit(moto.__version__ != '$version')" 2>/dev/null; then
        return 0
    fi
    echo "s3-server: installing moto $version into $root/moto (once per machine)" >&2
    rm -rf "$root/moto"
    mkdir -p "$root"
    python3 -m venv "$root/moto"
    "$root/moto/bin/pip" install --quiet --disable-pip-version-check "moto[s3,server]==$version"
}

case "${1:-}" in
install)
    install
    ;;
start)
    exec "$server" -H 127.0.0.1 -p "${2:-9000}"
    ;;
*)
    echo "usage: scripts/s3-server.sh install | start [PORT]" >&2
    exit 2
    ;;
esac
