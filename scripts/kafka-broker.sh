#!/usr/bin/env bash
# The local Kafka-protocol broker the Kafka tests and the example use: tansu,
# with in-memory storage, on 127.0.0.1 only.
#   scripts/kafka-broker.sh install        build tansu into ~/.cache/sluice/tools
#                                          (once; about 15-20 minutes on 2 cores)
#   scripts/kafka-broker.sh start [PORT]   run a broker in the foreground (default 9092)
#   scripts/kafka-broker.sh topic NAME [PARTITIONS] [PORT]
#                                          make a topic on a running broker
# The install lives outside any checkout, so every clone and CI run on the
# machine shares it. SLUICE_TANSU names another tansu binary.
set -euo pipefail
root="${SLUICE_TOOLS:-$HOME/.cache/sluice/tools}"
tansu="${SLUICE_TANSU:-$root/bin/tansu}"
version=0.6.0

install() {
    if [ -x "$tansu" ] && "$tansu" --version 2>/dev/null | grep -q "$version"; then
        return 0
    fi
    echo "kafka-broker: installing tansu $version into $root (once per machine)" >&2
    # Its own target directory, so the project's build cache is untouched;
    # removed after (cargo install keeps only the binary).
    CARGO_TARGET_DIR="$root/build" cargo install tansu --version "$version" --locked \
        --features dynostore --root "$root"
    rm -rf "$root/build"
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
