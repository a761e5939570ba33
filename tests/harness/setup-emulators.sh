#!/usr/bin/env bash
# Installs the cloud emulators the `register` tests start on 127.0.0.1:
#   venv-moto      moto[server]          (EC2, EBS direct, S3)
#   venv-keystone  keystone + gunicorn   (real Keystone, sqlite, fernet tokens)
#   venv-glance    glance + gunicorn     (real Glance, sqlite, file store)
# Idempotent: a venv whose marker file lists the pinned versions is left alone.
# Run as root by CI. Root directory: ${MKIMAGE_EMULATORS:-/opt/mkimage-emulators}.
set -euo pipefail

ROOT="${MKIMAGE_EMULATORS:-/opt/mkimage-emulators}"
PY="${PYTHON:-python3}"

MOTO_VERSION="5.2.5"
KEYSTONE_VERSION="30.0.0"
GLANCE_VERSION="33.0.0"
GUNICORN_SPEC="gunicorn==27.0.1"

log() { printf 'setup-emulators: %s\n' "$*"; }

ensure_venv_support() {
    if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        log "python3-venv is missing; installing it with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    fi
}

# install_venv NAME "PIP SPECS..." CHECK_CMD
install_venv() {
    local name="$1" specs="$2" check="$3"
    local dir="$ROOT/$name" marker="$ROOT/$name/.mkimage-installed"
    local want="$specs"
    if [[ -f "$marker" ]] && [[ "$(cat "$marker")" == "$want" ]] && [[ -x "$dir/bin/$check" ]]; then
        log "$name: already installed ($want), skipping"
        return 0
    fi
    log "$name: installing $want into $dir"
    rm -rf "$dir"
    "$PY" -m venv "$dir"
    "$dir/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
    # shellcheck disable=SC2086
    "$dir/bin/pip" install --quiet --disable-pip-version-check $specs
    if [[ ! -x "$dir/bin/$check" ]]; then
        log "$name: $check was not installed" >&2
        exit 1
    fi
    printf '%s' "$want" > "$marker"
    log "$name: done ($("$dir/bin/pip" --disable-pip-version-check freeze 2>/dev/null | grep -iE "^(moto|keystone|glance|gunicorn)==" | tr '\n' ' '))"
}

mkdir -p "$ROOT"
ensure_venv_support
start=$(date +%s)
install_venv venv-moto "moto[server]==$MOTO_VERSION" moto_server
install_venv venv-keystone "keystone==$KEYSTONE_VERSION $GUNICORN_SPEC" keystone-manage
install_venv venv-glance "glance==$GLANCE_VERSION $GUNICORN_SPEC" glance-manage
log "all emulators ready under $ROOT ($(( $(date +%s) - start )) s)"
