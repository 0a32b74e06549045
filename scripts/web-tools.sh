#!/usr/bin/env bash
# What the HTTP endpoint's tests need beside the engine:
#   - Chromium and ChromeDriver (Debian's chromium and chromium-driver
#     packages, /usr/bin/chromium and /usr/bin/chromedriver) for the page's
#     test in a real headless browser;
#   - promtool (from Debian's prometheus package, unpacked into
#     ~/.cache/sluice/tools/prometheus, not installed: no daemon is set up)
#     to check the /metrics text with Prometheus's own parser.
#   scripts/web-tools.sh install     install whatever is missing (once per machine)
# SLUICE_CHROMIUM, SLUICE_CHROMEDRIVER and SLUICE_PROMTOOL name other binaries.
set -euo pipefail
root="${SLUICE_TOOLS:-$HOME/.cache/sluice/tools}"
promtool="${SLUICE_PROMTOOL:-$root/prometheus/usr/bin/promtool}"

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

install_browser() {
    if [ -x "${SLUICE_CHROMIUM:-/usr/bin/chromium}" ] && [ -x "${SLUICE_CHROMEDRIVER:-/usr/bin/chromedriver}" ]; then
        return 0
    fi
    echo "web-tools: installing Debian's chromium and chromium-driver (once per machine)" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver >/dev/null
}

install_promtool() {
    if [ -x "$promtool" ]; then
        return 0
    fi
    echo "web-tools: unpacking promtool from Debian's prometheus package into $root/prometheus (once per machine)" >&2
    local tmp
    tmp="$(mktemp -d)"
    chmod 777 "$tmp"
    (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1 || (as_root apt-get update -qq && apt-get download prometheus >/dev/null))
    mkdir -p "$root/prometheus"
    dpkg -x "$tmp"/prometheus_*.deb "$root/prometheus"
    rm -rf "$tmp"
    "$promtool" --version >/dev/null
}

case "${1:-}" in
install)
    install_browser
    install_promtool
    ;;
*)
    echo "usage: scripts/web-tools.sh install" >&2
    exit 2
    ;;
esac
