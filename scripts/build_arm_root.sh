#!/usr/bin/env bash
# Build, once, the arm64 Debian bookworm root that the `arm64-emulated` validation target runs in.
#
# Usage: scripts/build_arm_root.sh [ROOT]   (default: ${SLIMFORMER_HOME:-~/.cache/slimformer}/arm64-root)
# Needs root (debootstrap, chroot, binfmt_misc) and network access to Debian and PyPI. About 4-6 minutes
# and 450 MB. Built in ROOT.partial and renamed into place when complete; a root that carries the marker
# file is left alone, so re-running is free. The aarch64 wheels are downloaded on the host (pip inside
# the emulator is slow and needs the network) and installed inside with --no-index into /opt/venv.
# Host python for `pip download`: $HOST_PYTHON, else python3. Versions: $ORT_VERSION, $NUMPY_VERSION.
set -euo pipefail

ROOT=${1:-${SLIMFORMER_HOME:-$HOME/.cache/slimformer}/arm64-root}
ROOT=${ROOT%/}
PARTIAL="$ROOT.partial"
MARKER=.slimformer-arm-root
ORT_VERSION=${ORT_VERSION:-1.32.0}
NUMPY_VERSION=${NUMPY_VERSION:-2.3.5}
HOST_PYTHON=${HOST_PYTHON:-python3}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
QEMU=/usr/bin/qemu-aarch64-static

say() { printf '[build_arm_root] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

if [ -f "$ROOT/$MARKER" ]; then
    say "already built: $ROOT ($(tr '\n' ' ' < "$ROOT/$MARKER"))"
    exit 0
fi
[ "$(id -u)" = 0 ] || die "needs root (debootstrap and chroot); run it with sudo"
[ -e "$ROOT" ] && die "$ROOT exists but has no $MARKER (not built by this script?); move it away first"

# --- host tools -------------------------------------------------------------------------------------
if ! command -v debootstrap >/dev/null || [ ! -x "$QEMU" ] || ! command -v update-binfmts >/dev/null; then
    say "installing qemu-user-static binfmt-support debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        qemu-user-static binfmt-support debootstrap
fi
# debootstrap's second stage runs arm64 programs (dpkg, maintainer scripts) through binfmt_misc.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
        || die "cannot mount binfmt_misc (an unprivileged container?); run on a host or a privileged container"
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 \
    || die "cannot register qemu-aarch64 with binfmt_misc"
grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "binfmt entry qemu-aarch64 is disabled"

# --- a clean partial folder (an interrupted run may have left mounts inside it) ---------------------
cleanup_mounts() {
    findmnt -rn -o TARGET | awk -v p="$PARTIAL/" 'index($0, p) == 1' | sort -r | while read -r m; do
        umount -l "$m" || true
    done
}
if [ -e "$PARTIAL" ]; then
    say "removing the unfinished $PARTIAL"
    cleanup_mounts
    rm -rf --one-file-system "$PARTIAL"
fi
mkdir -p "$(dirname "$ROOT")"
trap cleanup_mounts EXIT

# --- Debian arm64 bookworm --------------------------------------------------------------------------
say "debootstrap arm64 bookworm into $PARTIAL (a few minutes)"
debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip \
    bookworm "$PARTIAL" "$MIRROR" > "$PARTIAL.log" 2>&1 \
    || { tail -20 "$PARTIAL.log" >&2; die "debootstrap failed (full log: $PARTIAL.log)"; }
# The emulator itself lives in the root so targets can run `chroot ROOT qemu-aarch64-static -cpu X`,
# which selects the core explicitly instead of relying on QEMU_CPU reaching binfmt's interpreter.
install -m 0755 "$QEMU" "$PARTIAL/usr/bin/qemu-aarch64-static"

# --- onnxruntime and numpy from aarch64 wheels --------------------------------------------------------
say "downloading aarch64 wheels: onnxruntime==$ORT_VERSION numpy==$NUMPY_VERSION"
mkdir -p "$PARTIAL/opt/wheels"
"$HOST_PYTHON" -m pip download --quiet --disable-pip-version-check --dest "$PARTIAL/opt/wheels" \
    --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp --abi cp311 \
    --only-binary=:all: "onnxruntime==$ORT_VERSION" "numpy==$NUMPY_VERSION"
say "installing them into /opt/venv inside the root (under emulation)"
chroot "$PARTIAL" /usr/bin/python3 -m venv /opt/venv
chroot "$PARTIAL" /opt/venv/bin/python3 -m pip install --quiet --disable-pip-version-check --no-index \
    --find-links /opt/wheels "onnxruntime==$ORT_VERSION" "numpy==$NUMPY_VERSION"
rm -rf "$PARTIAL/opt/wheels" "$PARTIAL/var/cache/apt/archives/"*.deb
mkdir -p "$PARTIAL/work"

# --- check: onnxruntime imports on the cores we validate on, and QEMU really gave each core -----------
for cpu in cortex-a53 cortex-a76; do
    out=$(chroot "$PARTIAL" /usr/bin/qemu-aarch64-static -cpu "$cpu" /opt/venv/bin/python3 -c '
import ctypes, platform, numpy, onnxruntime
hwcap = ctypes.CDLL(None).getauxval(16)
print(platform.machine(), onnxruntime.__version__, numpy.__version__, "asimddp" if hwcap >> 20 & 1 else "no-dotprod")
') || die "onnxruntime does not import under QEMU -cpu $cpu"
    say "$cpu: $out"
    case "$cpu:$out" in
        cortex-a53:*no-dotprod*|cortex-a76:*asimddp*) ;;
        *) die "QEMU -cpu $cpu reported the wrong features: $out" ;;
    esac
done

printf 'onnxruntime=%s\nnumpy=%s\nbuilt=%s\n' "$ORT_VERSION" "$NUMPY_VERSION" "$(date -u +%FT%TZ)" \
    > "$PARTIAL/$MARKER"
trap - EXIT
mv "$PARTIAL" "$ROOT"
mv "$PARTIAL.log" "$ROOT.debootstrap.log" 2>/dev/null || true
say "done: $ROOT ($(du -sh --one-file-system "$ROOT" | cut -f1))"
