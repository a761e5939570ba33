#!/usr/bin/env bash
# Benchmark against vmdb2 (run by hand as root, not by cargo test).
#
# Both tools build the same content on the same machine from the same mirror (the one in
# the host's apt sources, as mkimage reads it): Debian minbase of the host's release, the
# cloud kernel (linux-image-cloud-amd64) with initramfs-tools, systemd, openssh-server,
# curl and ca-certificates, GRUB for BIOS with a serial console, a 2 GiB raw disk with one
# ext4 partition. Runs alternate (vmdb2, mkimage, vmdb2, mkimage, ...), N rounds:
#
#   vmdb2 cold   fresh rootfs tarball path: debootstrap + apt, then cache-rootfs
#   vmdb2 warm   the rootfs tarball of the cold run (unpack-rootfs skips debootstrap + apt)
#   mk cold      MKIMAGE_CACHE_DIR = a fresh empty directory
#   mk warm      the same cache again
#   mk svc       the same cache, one service layer added (--services helloworld)
#   mk min-cold  our minimal image (--optimize true) from another fresh empty cache
#   mk min-svc   that cache, the minimal image with one service layer added
#
# Then the image of each tool is booted under qemu (mkimage boot-test) until `login:` on
# the serial console, and ours also until its agent answers over mutual TLS (an agent
# with an in-guest CA, started by user-data from a config drive).
#
# vmdb2 needs kpartx, and kpartx needs device-mapper, which this kind of machine may not
# have. A stand-in `kpartx` is put first on vmdb2's PATH: it attaches the image with
# losetup, registers its partitions with `partx -a` (the kernel makes /dev/loopNpM) and
# links /dev/mapper/loopNpM to them, the names vmdb2 expects. Everything is undone on exit.
#
#   sudo bench/vs-vmdb2.sh                 N=2 rounds
#   sudo N=3 bench/vs-vmdb2.sh
#   sudo MKIMAGE=target/debug/mkimage bench/vs-vmdb2.sh    (default: target/release/mkimage)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2}
[ "$(id -u)" = 0 ] || { echo "run as root (vmdb2 and mkimage build need it)" >&2; exit 2; }

export DEBIAN_FRONTEND=noninteractive
missing=()
for tool in vmdb2:vmdb2 zerofree:zerofree parted:parted debootstrap:debootstrap partx:util-linux genisoimage:genisoimage; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} from the Debian archive" >&2
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -z "${MKIMAGE:-}" ]; then
  [ -x target/release/mkimage ] && [ -x target/release/cps ] || cargo build --release -p mkimage -p runtime
  MKIMAGE=$PWD/target/release/mkimage
fi
MK=$(readlink -f "$MKIMAGE")
CPS=$(dirname "$MK")/cps
[ -x "$CPS" ] || { echo "no cps next to $MK" >&2; exit 2; }

WORK=$(mktemp -d /var/tmp/mkimage-vs-vmdb2.XXXXXX)
STATE=$WORK/standin-state       # /dev entries made by the stand-in and the spec
touch "$STATE"
# grub-install's libdevmapper makes /dev/mapper/control even where the kernel has no
# device-mapper; remove it afterwards if /dev/mapper did not exist before.
MAPPER_EXISTED=$([ -d /dev/mapper ] && echo yes || echo no)

cleanup() {
  set +e
  # Mounts vmdb2 left (it mounts under /tmp) of loop devices backed by our images.
  for l in $(losetup -n -O NAME,BACK-FILE -l | awk -v w="$WORK" 'index($2, w) == 1 {print $1}'); do
    for m in $(findmnt -rn -o TARGET -S "${l}p1" 2>/dev/null | sort -r); do umount -l "$m"; done
    partx -d "$l" 2>/dev/null
    losetup -d "$l"
  done
  while read -r path; do [ -L "$path" ] && rm -f "$path"; done < "$STATE"
  if [ "$MAPPER_EXISTED" = no ] && [ -d /dev/mapper ]; then
    [ -c /dev/mapper/control ] && rm -f /dev/mapper/control
    rmdir /dev/mapper 2>/dev/null
  fi
  rmdir /dev/disk/by-uuid /dev/disk 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the kpartx stand-in -------------------------------------------------------------
mkdir -p "$WORK/shim"
cat > "$WORK/shim/kpartx" <<EOF
#!/bin/sh
# kpartx stand-in for vmdb2 on a kernel without device-mapper (see bench/vs-vmdb2.sh).
#   kpartx -a[sv] IMAGE   attach, partx -a, link /dev/mapper/loopNpM -> /dev/loopNpM
#   kpartx -d[sv] IMAGE   remove the links, partx -d (vmdb2 detaches the loop itself)
set -e
case "\$1" in
  -a*)
    l=\$(losetup -f --show "\$2"); n=\${l#/dev/}
    partx -a "\$l"
    mkdir -p /dev/mapper
    for p in /sys/block/\$n/\${n}p*; do
      [ -e "\$p" ] || continue
      m=\${p##*/}
      i=0; while [ ! -b /dev/\$m ] && [ \$i -lt 50 ]; do sleep 0.1; i=\$((i+1)); done
      ln -sf /dev/\$m /dev/mapper/\$m
      echo /dev/mapper/\$m >> "$STATE"
      echo "add map \$m (\$(cat \$p/dev)): 0 \$(cat \$p/size) linear \$l \$(cat \$p/start)"
    done ;;
  -d*)
    for l in \$(losetup -n -O NAME -j "\$2"); do
      n=\${l#/dev/}
      for m in /dev/mapper/\${n}p*; do [ -L "\$m" ] && rm -f "\$m" && echo "del devmap : \${m##*/}"; done
      partx -d "\$l" || true
    done ;;
  *) echo "kpartx stand-in: unsupported arguments: \$*" >&2; exit 1 ;;
esac
EOF
chmod 755 "$WORK/shim/kpartx"

# --- the same content for both -------------------------------------------------------
DIST=$(. /etc/os-release; echo "$VERSION_CODENAME")
MIRROR=$("$MK" plan 2>/dev/null | sed -n 's/.* from \(https\?:[^ ]*\)$/\1/p' | head -n1)
[ -n "$MIRROR" ] || { echo "could not read the mirror from \`mkimage plan\`" >&2; exit 1; }
# The packages of mkimage's base, kernel and core stages.
PKGS="linux-image-cloud-amd64 initramfs-tools systemd-sysv udev kmod iproute2 locales ca-certificates openssh-server curl"

cat > "$WORK/image.vmdb" <<EOF
# bench/vs-vmdb2.sh: $DIST minbase + cloud kernel + GRUB BIOS, like mkimage's default image
steps:
  - mkimg: "{{ output }}"
    size: 2G
  - mklabel: msdos
    device: "{{ output }}"
  - mkpart: primary
    device: "{{ output }}"
    start: 1M
    end: 100%
    tag: root
  - kpartx: "{{ output }}"
  - mkfs: ext4
    partition: root
  - mount: root
  - unpack-rootfs: root
  - debootstrap: $DIST
    mirror: $MIRROR
    target: root
    variant: minbase
    unless: rootfs_unpacked
  - apt: install
    packages: [$(echo "$PKGS" | sed 's/ /, /g')]
    recommends: false
    tag: root
    unless: rootfs_unpacked
  - cache-rootfs: root
    unless: rootfs_unpacked
  - fstab: root
  # Without udev there is no /dev/disk/by-uuid, and grub-mkconfig would then write
  # root=/dev/loopNp1, which the booted kernel does not have.
  - shell: |
      dev=\$(readlink -f "\$(findmnt -n -o SOURCE "\$ROOT")")
      uuid=\$(blkid -s UUID -o value "\$dev")
      mkdir -p /dev/disk/by-uuid
      ln -sf "\$dev" /dev/disk/by-uuid/\$uuid
      echo /dev/disk/by-uuid/\$uuid >> "$STATE"
    root-fs: root
  - grub: bios
    tag: root
    console: serial
EOF

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.1f}')"; }
alloc() { echo $(( $(stat -c %b "$1") * 512 )); }

declare -A T           # T[kind,round] = seconds
# Every run starts with nothing left to write back from the one before (outside the
# timing): otherwise whichever tool runs after the other pays for its writeback.
vmdb2_run() { # kind round tarball
  local img=$WORK/vmdb2-$1-$2.img t0 t1
  sync
  t0=$(now)
  if ! PATH=$WORK/shim:$PATH vmdb2 --output "$img" --rootfs-tarball "$3" \
       --log "$WORK/vmdb2-$1-$2.log" "$WORK/image.vmdb" >"$WORK/vmdb2-$1-$2.out" 2>&1; then
    echo "vmdb2 $1 (round $2) FAILED; last lines of its output:" >&2
    tail -n 25 "$WORK/vmdb2-$1-$2.out" >&2
    echo "VMDB2_FAILED" > "$WORK/vmdb2-failed"
    return 1
  fi
  t1=$(now)
  T[vmdb2-$1,$2]=$(secs "$t0" "$t1")
  VMDB2_IMG=$img
}
mk_run() { # kind round cachedir [build args...]
  local kind=$1 round=$2 cache=$3 t0 t1; shift 3
  sync
  t0=$(now)
  MKIMAGE_CACHE_DIR=$cache MKIMAGE_STATE_DIR=$WORK/state \
    "$MK" build --output "mk-$kind-$round.img" -o "$WORK/out" "$@" >"$WORK/mk-$kind-$round.out" 2>&1 \
    || { tail -n 25 "$WORK/mk-$kind-$round.out" >&2; exit 1; }
  t1=$(now)
  T[mk-$kind,$round]=$(secs "$t0" "$t1")
  # The base stage alone (mmdebstrap: the mirror download and dpkg), from the manifest:
  # it varies most from run to run, with the mirror.
  T[mk-$kind-base,$round]=$(python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(next((f\"{s['seconds']:.1f}\" for s in m['stages'] if s['name']=='debootstrap' and not s['cached']), ''))" "$WORK/out/mk-$kind-$round.img.manifest.json")
}

echo "vmdb2 $(dpkg-query -W -f '${Version}' vmdb2) vs $("$MK" --version 2>/dev/null || echo mkimage); $DIST from $MIRROR; N=$N" >&2
for r in $(seq 1 "$N"); do
  echo "round $r/$N" >&2
  tar=$WORK/rootfs-$r.tar      # uncompressed: the fastest cache vmdb2 offers
  vmdb2_run cold "$r" "$tar" || break
  mk_run cold "$r" "$WORK/cache-$r"
  vmdb2_run warm "$r" "$tar" || break
  mk_run warm "$r" "$WORK/cache-$r"
  mk_run svc "$r" "$WORK/cache-$r" --services helloworld
  mk_run min-cold "$r" "$WORK/cache-min-$r" --optimize true
  mk_run min-svc "$r" "$WORK/cache-min-$r" --optimize true --services helloworld
  rm -rf "$WORK/cache-min-$r"
  # keep the last images for the boot tests and sizes; drop the rest
  [ "$r" -lt "$N" ] && rm -f "$WORK"/vmdb2-*-"$r".img "$WORK"/out/mk-*-"$r".img*
done

# Our minimal image: the same content with `--optimize` (apt's leftovers, docs, man
# pages and locales pruned; the disk sized to the tree plus 256 MiB; the mkimage-growroot
# unit takes the rest of a larger disk at boot).
mk_run min "$N" "$WORK/cache-$N" --optimize true

# --- boot ----------------------------------------------------------------------------
boot_secs() { # image marker [boot-test args]; prints seconds, or nothing when not ready
  local img=$1 m=$2 out; shift 2
  if out=$("$MK" boot-test "$img" --ready-marker "$m" --timeout 300 "$@" 2>"$img.boot.err"); then
    sed -n 's/^ready after \([0-9.]*\) s under .*$/\1/p' <<<"$out"
  else
    echo "boot-test of ${img##*/} (marker '$m') failed:" >&2
    tail -n 20 "$img.boot.err" >&2
  fi
}
# Agent-ready: user-data (config drive) makes a CA, an agent and a manager certificate in
# the guest, starts the helloworld agent and prints a marker once the agent answers
# check_process over mutual TLS.
mkdir -p "$WORK/ctx"
cat > "$WORK/ctx/user_data" <<'EOF'
#!/bin/sh
D=/run/bench; mkdir -p $D/var
cps() { /usr/local/bin/cps "$@"; }
cps ca init --dir $D/ca >/dev/null
cps ca issue --dir $D/ca --role agent --uid 1 --app 1 --out $D/agent >/dev/null
cps ca issue --dir $D/ca --role manager --uid 1 --app 1 --out $D/mgr >/dev/null
printf '[agent]\nTYPE = helloworld\nUSER_ID = 1\nAPP_ID = 1\nNODE_ID = bench\nMY_IP = 127.0.0.1\nBIND = 127.0.0.1\nPORT = 5555\nLOG_FILE = %s/agent.log\nETC = %s\nCERT_DIR = %s/agent\nVAR_TMP = %s/var\nVAR_CACHE = %s/var\nVAR_RUN = %s/var\nSTRING_TO_GENERATE = hi\n' $D $D $D $D $D $D > $D/agent.cfg
nohup /usr/local/bin/cps agent -c $D/agent.cfg >$D/agent.out 2>&1 &
i=0
until cps client --manager https://127.0.0.1:5555 --cert-dir $D/mgr call check_process >/dev/null 2>&1; do
  i=$((i+1)); [ $i -gt 300 ] && exit 1; sleep 0.2
done
for t in /dev/ttyS0 /dev/hvc0; do [ -c $t ] && echo "bench-agent-ready" > $t; done
EOF

OURS=$WORK/out/mk-warm-$N.img
[ -f "$OURS" ] || OURS=$(ls "$WORK"/out/mk-warm-*.img | tail -n1)
SVC=$WORK/out/mk-svc-$N.img
[ -f "$SVC" ] || SVC=$(ls "$WORK"/out/mk-svc-*.img | tail -n1)
boot_ours=$(boot_secs "$OURS" "login:")
boot_agent=$(boot_secs "$SVC" "bench-agent-ready" --context "$WORK/ctx")
boot_vmdb2=""
if [ -n "${VMDB2_IMG:-}" ] && [ -f "$VMDB2_IMG" ]; then
  boot_vmdb2=$(boot_secs "$VMDB2_IMG" "login:")
  [ -n "$boot_vmdb2" ] || { echo "vmdb2 image did not reach login: (see below)" >&2; tail -n 15 "$VMDB2_IMG.boot.err" >&2; }
fi

# --- table ---------------------------------------------------------------------------
mean() { python3 -c "import sys; v=[float(x) for x in sys.argv[1:] if x]; print(f'{sum(v)/len(v):.1f}' if v else '-')" "$@"; }
runs() { local k=$1 out=(); for r in $(seq 1 "$N"); do out+=("${T[$k,$r]:-}"); done; echo "${out[*]}"; }
ratio() { python3 -c "import sys; a,b=sys.argv[1:3]; print(f'{float(a)/float(b):.2f}' if a not in ('','-') and b not in ('','-') else '-')" "$1" "$2"; }

vc=$(mean $(runs vmdb2-cold)); vw=$(mean $(runs vmdb2-warm))
mc=$(mean $(runs mk-cold)); mw=$(mean $(runs mk-warm)); ms=$(mean $(runs mk-svc))
mnc=$(mean $(runs mk-min-cold)); mns=$(mean $(runs mk-min-svc))
va=""; [ -n "${VMDB2_IMG:-}" ] && [ -f "$VMDB2_IMG" ] && va=$(alloc "$VMDB2_IMG")
ma=$(alloc "$OURS")
mm=$(alloc "$WORK/out/mk-min-$N.img")
mib() { [ -n "$1" ] && echo "$(( $1 >> 20 )) MiB" || echo "-"; }

printf '\n%-44s %-18s %-18s %s\n' "measurement (mean of N=$N; runs)" "vmdb2" "mkimage" "ours/vmdb2"
printf '%-44s %-18s %-18s %s\n' "build, cold (s)" "$vc ($(runs vmdb2-cold))" "$mc ($(runs mk-cold))" "$(ratio "$mc" "$vc")"
printf '%-44s %-18s %-18s %s\n' "  of which the base stage (mmdebstrap) (s)" "-" "$(mean $(runs mk-cold-base)) ($(runs mk-cold-base))" "-"
printf '%-44s %-18s %-18s %s\n' "build, warm (s)" "$vw ($(runs vmdb2-warm))" "$mw ($(runs mk-warm))" "$(ratio "$mw" "$vw")"
printf '%-44s %-18s %-18s %s\n' "build, warm, service layer changed (s)" "n/a (a)" "$ms ($(runs mk-svc))" "$(ratio "$ms" "$mc") of our cold"
printf '%-44s %-18s %-18s %s\n' "build, cold, --optimize (s)" "-" "$mnc ($(runs mk-min-cold))" "$(ratio "$mnc" "$vc")"
printf '%-44s %-18s %-18s %s\n' "  of which the base stage (mmdebstrap) (s)" "-" "$(mean $(runs mk-min-cold-base)) ($(runs mk-min-cold-base))" "-"
printf '%-44s %-18s %-18s %s\n' "  service layer changed, --optimize (s)" "n/a (a)" "$mns ($(runs mk-min-svc))" "$(ratio "$mns" "$mnc") of our cold"
printf '%-44s %-18s %-18s %s\n' "image allocated (2 GiB raw)" "$(mib "$va")" "$(mib "$ma")" "$(ratio "$ma" "$va")"
printf '%-44s %-18s %-18s %s\n' "image allocated, ours with --optimize" "$(mib "$va")" "$(mib "$mm")" "$(ratio "$mm" "$va")"
printf '%-44s %-18s %-18s %s\n' "boot to login: under qemu (s)" "${boot_vmdb2:--}" "${boot_ours:--}" "$(ratio "$boot_ours" "$boot_vmdb2")"
printf '%-44s %-18s %-18s %s\n' "boot to agent answering mTLS (s)" "-" "${boot_agent:--}" "-"
echo
echo "(a) vmdb2's rootfs tarball caches the whole tree; a spec change needs a cold build."
[ -f "$WORK/vmdb2-failed" ] && echo "vmdb2 FAILED; see the messages above."
echo "machine: $(nproc) cores, $(( $(awk '/MemTotal/{print $2}' /proc/meminfo) >> 20 )) GiB, kernel $(uname -r), $(date -u +%FT%TZ)"
