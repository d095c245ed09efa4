#!/usr/bin/env bash
# `make test-arm`: builds DeColla in an emulated Debian bookworm arm64 chroot (qemu-user,
# CPU model cortex-a72 as in a Raspberry Pi 4) and runs the kernel, fused-block, forward
# and wire tests and `decolla demo` there, checking that the NEON build is the one picked.
#
# Cached: the chroot, its Debian packages and its virtualenv stay in $DECOLLA_ARM_CACHE
# (default /var/cache/decolla-arm) and the checkout is synced into it keeping the last
# build, so a warm run recompiles only the kernels whose sources changed. Needs root on
# an x86-64 Debian host (chroot, mounts, binfmt); installs qemu-user-static,
# binfmt-support, debootstrap and rsync when missing. Logs: $DECOLLA_ARM_CACHE/logs.
# DECOLLA_ARM_MIRROR: the Debian mirror for debootstrap (default: the host's apt source).
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${DECOLLA_ARM_CACHE:-/var/cache/decolla-arm}
ROOT=$CACHE/root
LOGS=$CACHE/logs
CPU=${DECOLLA_ARM_CPU:-cortex-a72}
HOST_PKGS="qemu-user-static binfmt-support debootstrap rsync"
# Build and test dependencies inside the chroot (Python 3.11 is bookworm's).
CHROOT_PKGS="python3 python3-venv python3-dev gcc libc6-dev libgomp1 binutils"
TESTS="tests/test_kernels.py tests/test_kernels_isa.py tests/test_kernels_fused.py
       tests/test_graph_kernels.py tests/test_graph_program.py tests/test_fusion.py tests/test_forward.py
       tests/test_runtime_wire.py"
T0=$(date +%s)

say() { printf '[test-arm %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { echo "test-arm: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, binfmt_misc); run it as root"
case "$(uname -m)" in x86_64|amd64) ;; *) die "runs on an x86-64 host (emulates aarch64)";; esac
mkdir -p "$LOGS"
exec 9>"$CACHE/lock"
flock 9   # one run at a time per cache

missing=""
for p in $HOST_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
    say "installing host packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >"$LOGS/host-apt.log"
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
    || die "binfmt handler qemu-aarch64 is not enabled (update-binfmts --enable qemu-aarch64)"

unmount() {
    for m in dev/pts dev sys proc; do
        mountpoint -q "$ROOT/$m" && umount "$ROOT/$m" || true
    done
}

if [ ! -e "$ROOT/.decolla-bootstrapped" ]; then
    mirror=${DECOLLA_ARM_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null \
              || true)}
    [ -n "$mirror" ] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$mirror" ] || die "no Debian mirror in the host's apt sources: set DECOLLA_ARM_MIRROR"
    say "debootstrap bookworm arm64 from $mirror (first run only)"
    unmount   # never delete through a mount of the host's /dev
    rm -rf --one-file-system "$ROOT"
    debootstrap --arch=arm64 --foreign --variant=minbase --include=ca-certificates \
        bookworm "$ROOT" "$mirror" >"$LOGS/debootstrap.log" 2>&1 \
        || die "debootstrap failed: see $LOGS/debootstrap.log"
    cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"
    chroot "$ROOT" /debootstrap/debootstrap --second-stage >>"$LOGS/debootstrap.log" 2>&1 \
        || die "debootstrap (second stage) failed: see $LOGS/debootstrap.log"
    touch "$ROOT/.decolla-bootstrapped"
fi

trap unmount EXIT
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
mountpoint -q "$ROOT/sys" || mount -t sysfs sys "$ROOT/sys"
mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
mountpoint -q "$ROOT/dev/pts" || mount -t devpts devpts "$ROOT/dev/pts"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# the host's extra CA certificates (a proxy's), so pip and apt inside trust the same
cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/" 2>/dev/null || true
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$(hostname)" >"$ROOT/etc/hosts"

# A command inside the chroot, in the checkout, on the emulated Cortex-A72.
IN() {
    chroot "$ROOT" /usr/bin/env -i PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 QEMU_CPU="$CPU" PIP_DISABLE_PIP_VERSION_CHECK=1 \
        DEBIAN_FRONTEND=noninteractive /bin/bash -c "cd /opt/decolla 2>/dev/null; $1"
}

if [ "$(cat "$ROOT/.decolla-pkgs" 2>/dev/null)" != "$CHROOT_PKGS" ]; then
    say "apt-get install in the chroot: $CHROOT_PKGS"
    IN "update-ca-certificates >/dev/null && apt-get update -qq &&
        apt-get install -y -qq --no-install-recommends $CHROOT_PKGS" >"$LOGS/chroot-apt.log" 2>&1 \
        || die "apt-get in the chroot failed: see $LOGS/chroot-apt.log"
    echo "$CHROOT_PKGS" >"$ROOT/.decolla-pkgs"
fi

say "syncing $SRC into the chroot"
mkdir -p "$ROOT/opt/decolla"
# Ignored files (the last arm64 build: *.so, kernels/*.c, build/) stay on the receiving side.
rsync -a --delete --exclude=/.git --exclude=/.venv --filter=':- .gitignore' "$SRC/" "$ROOT/opt/decolla/"

# The virtualenv: the project's runtime and build requirements (pyproject.toml), the
# `onnx` extra and the test tools; reinstalled only when that list changes.
REQS=$(IN 'python3 -c "
import tomllib
p = tomllib.load(open(\"pyproject.toml\", \"rb\"))
dev = [r for r in p[\"project\"][\"optional-dependencies\"][\"dev\"]
       if r.split(\">\")[0].split(\"=\")[0] in (\"pytest\", \"pytest-timeout\", \"hypothesis\")]
onnx = p[\"project\"][\"optional-dependencies\"][\"onnx\"]
print(\" \".join(sorted(set(p[\"build-system\"][\"requires\"] + p[\"project\"][\"dependencies\"] + dev + onnx))))
"')
if [ "$(cat "$ROOT/opt/.decolla-venv" 2>/dev/null)" != "$REQS" ]; then
    say "virtualenv: $REQS"
    IN "[ -x /opt/venv/bin/python ] || python3 -m venv /opt/venv
        pip install -q --prefer-binary $(printf '"%s" ' $REQS)" >"$LOGS/venv.log" 2>&1 \
        || die "pip in the chroot failed: see $LOGS/venv.log"
    echo "$REQS" >"$ROOT/opt/.decolla-venv"
fi

say "building the kernels (log: $LOGS/build.log)"
IN "gcc --version | head -1 && python setup.py build_ext --inplace -j $(nproc)" >"$LOGS/build.log" 2>&1 \
    || { tail -30 "$LOGS/build.log"; die "build failed: see $LOGS/build.log"; }
# the warnings of the NEON headers (Cython's generated C has some of its own)
grep "_neon\.h.*warning:" "$LOGS/build.log" | sort -u || true

# qemu gives the emulated CPU's features (an A72: no fphp/asimdhp of ARMv8.2, no sve) and
# raises SIGILL on any instruction beyond them.
hwcap=$(IN 'python -c "
import ctypes
getauxval = ctypes.CDLL(None).getauxval
getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
bits = getauxval(16)
print(\" \".join(n for b, n in [(0, \"fp\"), (1, \"asimd\"), (9, \"fphp\"), (10, \"asimdhp\"),
                                 (22, \"sve\")] if bits >> b & 1))"')
isa=$(IN 'python -c "from decolla import kernels; print(kernels.ISA)"')
say "kernel build picked on $CPU (AT_HWCAP: $hwcap): $isa"
[ "$isa" = neon ] || die "expected the NEON build to be picked on aarch64, got $isa"

say "assembly of the NEON micro-kernels"
IN 'python tools/neon_asm_check.py' | tee "$LOGS/asm.log" \
    || die "the NEON inner loops spill to the stack: see $LOGS/asm.log"

say "pytest $(echo $TESTS)"
IN "python -m pytest -q -rs -p no:cacheprovider --timeout=1800 $(echo $TESTS)" \
    >"$LOGS/pytest.log" 2>&1 || { tail -40 "$LOGS/pytest.log"; die "tests failed: see $LOGS/pytest.log"; }
tail -1 "$LOGS/pytest.log"

say "decolla demo"
IN 'cd /tmp && PYTHONPATH=/opt/decolla python -m decolla demo --runs 3' >"$LOGS/demo.log" 2>&1 \
    || { tail -20 "$LOGS/demo.log"; die "decolla demo failed: see $LOGS/demo.log"; }
tail -6 "$LOGS/demo.log"
say "done: all passed on emulated aarch64 ($CPU)"
