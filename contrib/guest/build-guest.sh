#!/bin/bash
# Build a tiny test guest (Debian kernel + busybox initramfs) from Debian packages only.
#
#   build-guest.sh [OUTDIR]      OUTDIR defaults to ${KVMNETD_GUEST_DIR:-$HOME/.cache/kvmnetd-guest}
#
# Produces OUTDIR/vmlinux (uncompressed, or the bzImage if extraction failed) and
# OUTDIR/initrd.img. A second run with an unchanged script and init exits at once.
# Exit status 3 means "cannot be built on this machine" (e.g. no apt, no network);
# anything else non-zero is a real failure.
#
# KVMNETD_GUEST_KERNEL_PKG=linux-image-...  picks the kernel package explicitly.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUTDIR=${1:-${KVMNETD_GUEST_DIR:-$HOME/.cache/kvmnetd-guest}}
INIT=$HERE/init
# Load order matters: each needs symbols from the ones before it.
MODULES=(failover net_failover virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev
         virtio_pci virtio_net)

log() { echo "build-guest: $*" >&2; }
impossible() { log "cannot build: $*"; exit 3; }

stamp_of() {
    # The kernel version is deliberately not part of it: a newer Debian kernel is no reason to rebuild.
    cat "${BASH_SOURCE[0]}" "$INIT" | sha256sum | cut -d' ' -f1
}

cached() {
    [[ -s $OUTDIR/vmlinux && -s $OUTDIR/initrd.img && -f $OUTDIR/stamp ]] &&
        [[ $(cat "$OUTDIR/stamp") == "$(stamp_of)" ]]
}

[[ -f $INIT ]] || { log "missing $INIT"; exit 1; }
cached && exit 0

mkdir -p "$OUTDIR"
# Parallel test workers may all ask at once: one builds, the others wait and reuse it.
exec 9>"$OUTDIR/.lock"
if command -v flock >/dev/null; then flock 9; fi
cached && exit 0

for tool in apt-get apt-cache dpkg-deb xz gzip sha256sum; do
    command -v "$tool" >/dev/null || impossible "$tool not found (needs a Debian-like host)"
done

WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

apt_updated=0
apt_update() {
    [[ $apt_updated == 1 ]] && return 1
    apt_updated=1
    [[ $(id -u) == 0 ]] || return 1
    log "running apt-get update"
    apt-get update -qq >&2 || return 1
}

kernel_package() {
    if [[ -n ${KVMNETD_GUEST_KERNEL_PKG:-} ]]; then
        echo "$KVMNETD_GUEST_KERNEL_PKG"
        return
    fi
    # The meta package depends on exactly one versioned image, e.g. linux-image-6.1.0-56-amd64.
    apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1
}

KPKG=$(kernel_package)
if [[ -z $KPKG ]]; then
    apt_update || true
    KPKG=$(kernel_package)
fi
[[ -n $KPKG ]] || impossible "no linux-image-*-amd64 package known to apt (apt-get update needed?)"

download() {
    # As root, fetch as root: _apt cannot reach a cache under /root and would only warn about it.
    local opts=()
    [[ $(id -u) == 0 ]] && opts=(-o APT::Sandbox::User=root)
    (cd "$WORK" && apt-get download -qq "${opts[@]}" "$@" >&2)
}
log "downloading $KPKG and busybox-static"
if ! download "$KPKG" busybox-static; then
    apt_update || impossible "apt-get download $KPKG busybox-static failed"
    KPKG=$(kernel_package)
    download "$KPKG" busybox-static || impossible "apt-get download $KPKG busybox-static failed"
fi

mkdir "$WORK/pkg"
for deb in "$WORK"/*.deb; do
    dpkg-deb -x "$deb" "$WORK/pkg"
done

BUSYBOX=$WORK/pkg/bin/busybox
[[ -x $BUSYBOX ]] || { log "busybox-static did not contain /bin/busybox"; exit 1; }
KVER=$(basename "$(ls -d "$WORK"/pkg/lib/modules/*/ | head -n1)")
BZIMAGE=$WORK/pkg/boot/vmlinuz-$KVER
[[ -f $BZIMAGE ]] || { log "no kernel image in $KPKG"; exit 1; }

# --- kernel: the uncompressed vmlinux boots about twice as fast under TCG ---------------------
is_elf() { [[ $(head -c4 "$1" | od -An -c | tr -d ' ') == '177ELF' ]]; }

extract_vmlinux() {
    local out=$1 magic cmd off
    # Try each compression the bzImage may carry; the first hit that decompresses to an ELF wins.
    for entry in 'xz|\xfd7zXZ\x00|xz -dc --single-stream' \
                 'zstd|\x28\xb5\x2f\xfd|zstd -dcq' \
                 'gzip|\x1f\x8b\x08|gzip -dcq'; do
        IFS='|' read -r _ magic cmd <<<"$entry"
        command -v "${cmd%% *}" >/dev/null || continue
        for off in $(LC_ALL=C grep -obUaP "$magic" "$BZIMAGE" 2>/dev/null | cut -d: -f1); do
            # gzip/zstd complain about the trailing data after the stream: judge by the output.
            tail -c "+$((off + 1))" "$BZIMAGE" | $cmd >"$out" 2>/dev/null || true
            if [[ -s $out ]] && is_elf "$out"; then
                return 0
            fi
        done
    done
    return 1
}

if extract_vmlinux "$WORK/vmlinux"; then
    log "kernel: uncompressed vmlinux from $KVER"
else
    log "WARNING: could not extract vmlinux from the bzImage; using the bzImage (slower boot)"
    cp "$BZIMAGE" "$WORK/vmlinux"
fi

# --- initramfs ----------------------------------------------------------------------------
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,dev,proc,sys,tmp,run,etc,lib/modules}
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [[ $applet == busybox ]] || ln -s busybox "$ROOT/bin/$applet"
done
ln -s bin "$ROOT/sbin"
cp "$INIT" "$ROOT/init"
chmod 755 "$ROOT/init"
# The init doubles as the udhcpc hook, so all guest logic lives in one file.
ln -s init "$ROOT/udhcpc.script"

: >"$ROOT/lib/modules/order"
MODDIR=$WORK/pkg/lib/modules/$KVER/kernel
for mod in "${MODULES[@]}"; do
    # Names in the tree use either - or _; compressed variants must be unpacked for busybox insmod.
    path=$(find "$MODDIR" \( -name "$mod.ko*" -o -name "${mod//_/-}.ko*" \) -print -quit)
    if [[ -z $path ]]; then
        log "module $mod: not a module in $KVER (assumed built in)"
        continue
    fi
    dest=$ROOT/lib/modules/$mod.ko
    case $path in
        *.ko) cp "$path" "$dest" ;;
        *.ko.xz) xz -dc "$path" >"$dest" ;;
        *.ko.gz) gzip -dc "$path" >"$dest" ;;
        *.ko.zst) zstd -dcq "$path" >"$dest" ;;
        *) log "module $mod: unknown format $path"; exit 1 ;;
    esac
    echo "$mod" >>"$ROOT/lib/modules/order"
done
echo "$KVER" >"$ROOT/etc/kernel-version"

# Fixed owner and mtimes keep the archive independent of who built it and when.
find "$ROOT" -exec touch -h -d @0 {} +
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort |
    "$BUSYBOX" cpio -o -H newc -R 0:0 --ignore-devno --renumber-inodes 2>/dev/null) | gzip -9n >"$WORK/initrd.img"

# Publish: images first, stamp last, so a half-done build never counts as cached.
rm -f "$OUTDIR/stamp"
mv -f "$WORK/vmlinux" "$OUTDIR/vmlinux"
mv -f "$WORK/initrd.img" "$OUTDIR/initrd.img"
echo "$KPKG" >"$OUTDIR/kernel-package"
stamp_of >"$OUTDIR/stamp"
log "done: $OUTDIR/vmlinux $OUTDIR/initrd.img ($KPKG)"
