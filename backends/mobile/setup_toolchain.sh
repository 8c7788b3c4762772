#!/usr/bin/env bash
# Installs what the mobile backend (ember.backends.mobile) needs, idempotently:
#   - Debian: qemu-user, the aarch64 cross g++ and binutils (objdump for the NEON check)
#   - the venv: apache-tvm + apache-tvm-ffi (pinned; x86 compiler side)
#   - the aarch64 TVM runtime libs + tvm-ffi headers, unpacked from the aarch64 wheels into
#     $PREFIX/share/ember/tvm-aarch64 (inside the venv, so nothing lands in the repo)
# Usage: backends/mobile/setup_toolchain.sh [VENV]   (default: .venv next to the repo root)
# Runs as root on CI (apt-get); as non-root it uses sudo when present.
set -euo pipefail

TVM_VERSION="0.27.0.post1"
FFI_VERSION="0.1.14.post1"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${1:-$ROOT/.venv}"
PY="$VENV/bin/python"
DEST="$VENV/share/ember/tvm-aarch64"
STAMP="$DEST/.stamp-$TVM_VERSION-$FFI_VERSION"
log() { echo "[setup_toolchain] $*" >&2; }
start=$(date +%s)

# 1. Debian packages
need_apt=()
command -v qemu-aarch64 >/dev/null || need_apt+=(qemu-user)
command -v aarch64-linux-gnu-g++ >/dev/null || need_apt+=(g++-aarch64-linux-gnu)
command -v aarch64-linux-gnu-objdump >/dev/null || need_apt+=(binutils-aarch64-linux-gnu)
if ((${#need_apt[@]})); then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    log "apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
else
    log "qemu-user and the aarch64 cross toolchain are present"
fi

# 2. TVM (x86 compiler side) in the venv
if [ ! -x "$PY" ]; then
    log "no venv python at $PY"; exit 1
fi
if "$PY" - <<PYEOF 2>/dev/null
import importlib.metadata as m, sys
ok = (m.version("apache-tvm") == "$TVM_VERSION" and m.version("apache-tvm-ffi") == "$FFI_VERSION")
sys.exit(0 if ok else 1)
PYEOF
then
    log "apache-tvm $TVM_VERSION + apache-tvm-ffi $FFI_VERSION already installed"
else
    log "pip install apache-tvm==$TVM_VERSION apache-tvm-ffi==$FFI_VERSION"
    "$PY" -m pip install -q "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION"
fi

# 3. aarch64 runtime from the aarch64 wheels
if [ -f "$STAMP" ]; then
    log "aarch64 TVM runtime present in $DEST"
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    log "downloading the aarch64 wheels"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux_2_28_aarch64 -d "$tmp" \
        "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION"
    rm -rf "$DEST"
    mkdir -p "$DEST/lib" "$DEST/include"
    "$PY" - "$tmp" "$DEST" <<'PYEOF'
import pathlib, shutil, sys, zipfile
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
want_libs = {"tvm/lib/libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so"}
include_roots = ("tvm_ffi/include/", "tvm_ffi/3rdparty/dlpack/include/")
found = set()
for whl in sorted(src.glob("*.whl")):
    with zipfile.ZipFile(whl) as zf:
        for name in zf.namelist():
            if name in want_libs:
                (dest / "lib" / pathlib.Path(name).name).write_bytes(zf.read(name))
                found.add(name)
            for root in include_roots:
                if name.startswith(root) and not name.endswith("/"):
                    out = dest / "include" / name[len(root):]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(zf.read(name))
missing = want_libs - found
if missing:
    sys.exit(f"aarch64 wheels lack {sorted(missing)}")
PYEOF
    touch "$STAMP"
fi
log "done in $(( $(date +%s) - start )) s"
