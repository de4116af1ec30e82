#!/bin/bash
# bench-oci.sh: berth's streaming OCI import against the unpack-then-create
# baseline, in the same run, on the same layers.
#
# The image (>= 1 GB, >= 50,000 files, 4 uncompressed layers) is built from
# the Debian trixie root filesystem the VM lane uses (test/guest/build-rootfs.sh)
# plus copies of host directories. Baseline: tar -x of each layer into a
# directory, then `berth composefs create --digest-store` on it. berth:
# `berth image pull oci:LAYOUT` into an empty store, then the same pull again
# (every layer known: must take < 5% of the first). Each side runs
# BENCH_RUNS times (default 3), interleaved; medians are compared.
#
# Needs root (tar -x keeps owners and device nodes; dropping caches). Env:
# ROOTFS (default /var/cache/berth-e2e/trixie-rootfs), BENCH_DIR (default
# /var/tmp/berth-bench-oci), BERTH (a berth binary; default: built here),
# BENCH_RUNS, SETTLE (seconds to wait before each run; default just over
# vm.dirty_expire_centisecs), KEEP=1 keeps the work dir. Other heavy work
# on the machine skews the numbers: run it under the lock other
# benchmarks and VM tests take (flock /tmp/berth-vm.lock make bench).
set -euo pipefail
cd "$(dirname "$0")/.."

ROOTFS=${ROOTFS:-/var/cache/berth-e2e/trixie-rootfs}
BENCH_DIR=${BENCH_DIR:-/var/tmp/berth-bench-oci}
EXTRA_DIRS=${EXTRA_DIRS:-"/usr/share /usr/local/go"}
export PATH=$PATH:/usr/local/go/bin

if [ "$(id -u)" != 0 ]; then
	echo "bench-oci: skipped: needs root (tar -x with owners and device nodes)"; exit 0
fi
if [ ! -e "$ROOTFS/.recipe" ]; then
	if command -v mmdebstrap >/dev/null; then
		test/guest/build-rootfs.sh "$ROOTFS"
	else
		echo "bench-oci: skipped: no trixie root filesystem at $ROOTFS and no mmdebstrap to build one"; exit 0
	fi
fi

rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR"/{layers,layout/blobs/sha256}
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$BENCH_DIR"' EXIT
W=$BENCH_DIR

if [ -z "${BERTH:-}" ]; then
	BERTH=$W/berth
	CGO_ENABLED=0 go build -trimpath -tags containers_image_openpgp,exclude_graphdriver_btrfs,exclude_graphdriver_devicemapper -o "$BERTH" ./cmd/berth
fi

now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.2f\", $* }"; }

# --- build the layers -----------------------------------------------------
TAR=(tar --numeric-owner --xattrs --xattrs-include='*' --format=pax --sort=name)
echo "bench-oci: building layers from $ROOTFS and $EXTRA_DIRS ..."
"${TAR[@]}" -C "$ROOTFS" -cf "$W/layers/1.tar" ./usr
"${TAR[@]}" -C "$ROOTFS" --exclude=./usr --exclude=./.recipe -cf "$W/layers/2.tar" .
n=3
for d in $EXTRA_DIRS; do
	[ -d "$d" ] || continue
	base=$(basename "$d")
	"${TAR[@]}" -C "$(dirname "$d")" --transform "s,^$base,opt/bench-$n-$base," -cf "$W/layers/$n.tar" "$base"
	n=$((n + 1))
done

# --- OCI layout (uncompressed layers: diff_id = blob digest) ---------------
bytes=0 files=0 layer_descs="" diff_ids=""
for f in $(ls "$W"/layers/*.tar | sort -V); do
	d=$(sha256sum "$f" | cut -d' ' -f1)
	s=$(stat -c %s "$f")
	ln "$f" "$W/layout/blobs/sha256/$d"
	bytes=$((bytes + s))
	files=$((files + $(tar -tf "$f" | wc -l)))
	layer_descs+="${layer_descs:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"sha256:$d\",\"size\":$s}"
	diff_ids+="${diff_ids:+,}\"sha256:$d\""
done
cfg="{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[$diff_ids]}}"
cfgd=$(printf %s "$cfg" | sha256sum | cut -d' ' -f1)
printf %s "$cfg" >"$W/layout/blobs/sha256/$cfgd"
man="{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$cfgd\",\"size\":${#cfg}},\"layers\":[$layer_descs]}"
mand=$(printf %s "$man" | sha256sum | cut -d' ' -f1)
printf %s "$man" >"$W/layout/blobs/sha256/$mand"
printf '{"imageLayoutVersion":"1.0.0"}' >"$W/layout/oci-layout"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"bench"}}]}' "$mand" "${#man}" >"$W/layout/index.json"

mb=$(calc "$bytes / 1000000")
echo "bench-oci: image: $((n - 1)) layers, $mb MB, $files tar entries"
if [ "$bytes" -lt 1000000000 ] || [ "$files" -lt 50000 ]; then
	echo "bench-oci: FAIL: image is smaller than 1 GB / 50,000 files; add EXTRA_DIRS"; exit 1
fi
sync

# --- timed runs -------------------------------------------------------------
# Each side runs RUNS times, interleaved (baseline, berth, baseline, ...),
# and the medians count. Before every timed run the previous run's output
# is removed and the machine settles: sync, then a wait past the window in
# which ext4 without a journal skips recently freed inodes when it
# allocates new ones (dirty_expire_centisecs; deleting ~150,000 files
# otherwise slows whichever side runs next), then the page cache is
# dropped and the layers are read back in, so every run starts from the
# same state: layers in memory, nothing of the output cached or dirty.
# Durability is the same on both sides: each ends with the object store's
# filesystem synced (berth composefs create and berth image pull sync the
# store themselves; the `sync -f` after each also covers tar -x's tree).
RUNS=${BENCH_RUNS:-3}
settle() {
	rm -rf "$W/base" "$W/sysroot"
	sync
	sleep "${SETTLE:-$(($(cat /proc/sys/vm/dirty_expire_centisecs) / 100 + 1))}"
	echo 3 >/proc/sys/vm/drop_caches
	cat "$W"/layers/*.tar >/dev/null
}
load() { cut -d' ' -f1 /proc/loadavg; }
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
: >"$W/base_untar" >"$W/base_create" >"$W/base_total" >"$W/first" >"$W/second" >"$W/loads"
for run in $(seq "$RUNS"); do
	# baseline: tar -x each layer, then berth composefs create
	settle
	l0=$(load)
	mkdir -p "$W/base/root" "$W/base/objects"
	t0=$(now)
	for f in $(ls "$W"/layers/*.tar | sort -V); do
		tar -x -p --numeric-owner --xattrs --xattrs-include='*' -C "$W/base/root" -f "$f"
	done
	t1=$(now)
	base_digest=$("$BERTH" composefs create --digest-store "$W/base/objects" --print-digest "$W/base/root" "$W/base/image.cfs")
	sync -f "$W/base/objects"
	t2=$(now)
	calc "$t1 - $t0" >>"$W/base_untar"; echo >>"$W/base_untar"
	calc "$t2 - $t1" >>"$W/base_create"; echo >>"$W/base_create"
	calc "$t2 - $t0" >>"$W/base_total"; echo >>"$W/base_total"

	# berth: streaming import, then the same image again
	settle
	l1=$(load)
	S=$W/sysroot
	t0=$(now)
	"$BERTH" --sysroot "$S" --quiet image pull "oci:$W/layout:bench"
	sync -f "$S"
	t1=$(now)
	"$BERTH" --sysroot "$S" --quiet image pull "oci:$W/layout:bench"
	t2=$(now)
	calc "$t1 - $t0" >>"$W/first"; echo >>"$W/first"
	calc "$t2 - $t1" >>"$W/second"; echo >>"$W/second"
	berth_digest=$("$BERTH" --sysroot "$S" --json image inspect "oci:$W/layout:bench" | sed -n 's/.*"composefs_digest": "\([0-9a-f]*\)".*/\1/p')
	echo "$l0 $l1 $(load)" >>"$W/loads"
	echo "bench-oci: run $run: baseline $(tail -1 "$W/base_total") s (tar -x $(tail -1 "$W/base_untar") + create $(tail -1 "$W/base_create")), load $l0; berth $(tail -1 "$W/first") s, again $(tail -1 "$W/second") s, load $l1"
done
rm -rf "$W/base" "$W/sysroot"

base_untar=$(median <"$W/base_untar")
base_create=$(median <"$W/base_create")
base_total=$(median <"$W/base_total")
first=$(median <"$W/first")
second=$(median <"$W/second")
speedup=$(calc "$base_total / $first")
second_pct=$(calc "100 * $second / $first")
row() { printf '%-34s %9s %10s %12s   %s\n' "$@"; }
echo
echo "medians of $RUNS interleaved runs; $(nproc) cores; load average (1 min) before each run: $(awk '{ printf "%s%s/%s", (NR > 1 ? ", " : ""), $1, $2 }' "$W/loads") (baseline/berth)"
row "" "seconds" "MB/s" "files/s" "all runs (s)"
row "baseline: tar -x" "$base_untar" "" "" "$(paste -sd' ' "$W/base_untar")"
row "baseline: berth composefs create" "$base_create" "" "" "$(paste -sd' ' "$W/base_create")"
row "baseline total" "$base_total" "$(calc "$mb / $base_total")" "$(calc "$files / $base_total")" "$(paste -sd' ' "$W/base_total")"
row "berth image pull (streaming)" "$first" "$(calc "$mb / $first")" "$(calc "$files / $first")" "$(paste -sd' ' "$W/first")"
row "berth image pull again" "$second" "" "" "$(paste -sd' ' "$W/second")"
echo
echo "speedup over baseline (ratio of medians): ${speedup}x (target >= 1.5x)"
echo "second import: ${second_pct}% of the first (target < 5%)"
echo "composefs digest: berth $berth_digest; baseline ${base_digest%% *} (differs when the image has hardlinks: mkcomposefs splits them)"
status=0
awk "BEGIN { exit !($speedup >= 1.5) }" || { echo "bench-oci: MISSED: speedup target"; status=1; }
awk "BEGIN { exit !($second_pct < 5) }" || { echo "bench-oci: MISSED: second-import target"; status=1; }
exit $status
