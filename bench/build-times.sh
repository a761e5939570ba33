#!/usr/bin/env bash
# Benchmark (run by hand as root, not part of the tests): build times of the
# minimal image cold (empty cache) and warm (cached base and kernel), with
# mmdebstrap and with debootstrap as the base engine; image sizes; seconds from
# qemu start to the readiness marker. Prints a table.
#
#   sudo bench/build-times.sh            # uses target/release/mkimage (built if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x target/release/mkimage ] && [ -x target/release/cps ] || cargo build --release -p mkimage -p runtime
MK=$PWD/target/release/mkimage
WORK=$(mktemp -d /var/tmp/mkimage-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

build() { # name engine cachedir
  local t0 t1
  t0=$(date +%s.%N)
  MKIMAGE_BOOTSTRAP_ENGINE=$2 MKIMAGE_CACHE_DIR=$3 MKIMAGE_STATE_DIR=$WORK/state \
    "$MK" build --size 1536M --output "$1.img" -o "$WORK/out" >/dev/null 2>"$WORK/$1.err" \
    || { cat "$WORK/$1.err"; exit 1; }
  t1=$(date +%s.%N)
  python3 -c "print($t1 - $t0)"
}

printf '%-34s %10s\n' "measurement" "value"
for engine in mmdebstrap debootstrap; do
  cache=$WORK/cache-$engine
  cold=$(build "cold-$engine" "$engine" "$cache")
  warm=$(build "warm-$engine" "$engine" "$cache")
  base=$(python3 -c "import json;m=json.load(open('$WORK/out/cold-$engine.img.manifest.json'));print(round([s['seconds'] for s in m['stages'] if s['name']=='debootstrap'][0],1))")
  printf '%-34s %9.1fs\n' "cold build ($engine)" "$cold" "warm build ($engine)" "$warm" "base stage only ($engine)" "$base"
done
img=$WORK/out/warm-mmdebstrap.img
printf '%-34s %8d MiB\n' "image apparent size" $(( $(stat -c %s "$img") >> 20 ))
printf '%-34s %8d MiB\n' "image allocated" $(( $(stat -c %b "$img") * 512 >> 20 ))
used=$(dumpe2fs -h "$img?offset=1048576" 2>/dev/null | awk -F: '/^Block count/{b=$2}/^Free blocks/{f=$2}/^Block size/{s=$2}END{printf "%d", (b-f)*s/1048576}')
printf '%-34s %8d MiB\n' "filesystem used" "$used"
qemu-img convert -c -O qcow2 "$img" "$WORK/img.qcow2"
printf '%-34s %8d MiB\n' "compressed qcow2" $(( $(stat -c %s "$WORK/img.qcow2") >> 20 ))
ready=$("$MK" boot-test "$img" --timeout 300 2>/dev/null | sed -n 's/^ready after \([0-9.]*\) s under \(.*\)$/\1 s (\2)/p')
printf '%-34s %12s\n' "boot to ready" "$ready"
t0=$(date +%s.%N); "$MK" verify "$img" >/dev/null; t1=$(date +%s.%N)
t2=$(date +%s.%N); md5sum "$img" >/dev/null; t3=$(date +%s.%N)
printf '%-34s %9.1fs\n' "verify (MD5+SHA-256, one read)" "$(python3 -c "print($t1 - $t0)")" "md5sum alone" "$(python3 -c "print($t3 - $t2)")"
