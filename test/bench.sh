#!/bin/bash
# make bench: benchmarks that compare side by side and print ratios.
#
# composefs part: berth's Go benchmarks (digest-only and create-with-store on a
# tree of >= 100,000 entries, default /usr) and, when a reference mkcomposefs
# binary is available ($MKCOMPOSEFS or in PATH), the same two jobs timed with
# mkcomposefs on the same tree in the same run, plus the ratios.
#
# Environment:
#   BERTH_BENCH_TREE  tree to process (default /usr)
#   BERTH_BENCH_DIR   where fresh object stores are made (default /var/tmp);
#                     needs about the tree's size free, on the filesystem the
#                     stores of a real system would live on
#   BENCH_RUNS        repetitions per job (default 1; the best mkcomposefs run counts)
#   MKCOMPOSEFS       reference mkcomposefs binary (default: mkcomposefs in PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin
tags=containers_image_openpgp,exclude_graphdriver_btrfs,exclude_graphdriver_devicemapper
tree=${BERTH_BENCH_TREE:-/usr}
base=${BERTH_BENCH_DIR:-/var/tmp}
runs=${BENCH_RUNS:-1}
export BERTH_BENCH_TREE=$tree BERTH_BENCH_DIR=$base

entries=$(find "$tree" -xdev | wc -l)
mbytes=$(find "$tree" -xdev -type f -printf '%s\n' | awk '{s+=$1} END {printf "%.0f", s/1e6}')
echo "== composefs: $tree ($entries entries, $mbytes MB in regular files), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"

# Warm the page cache once so every contender reads the tree from memory.
find "$tree" -xdev -type f -print0 | xargs -0 cat >/dev/null 2>&1 || true

out=$(mktemp)
trap 'rm -f "$out"' EXIT
go test -tags "$tags" -run '^$' -bench '^(BenchmarkDigestUsr|BenchmarkCreateWithStoreUsr)$' \
	-benchtime "${runs}x" -count 1 ./internal/composefs/ | tee "$out"

# metric NAME UNIT: the value of UNIT on benchmark NAME's result line.
metric() {
	awk -v n="$1" -v u="$2" '$1 ~ "^"n"(-[0-9]+)?$" { for (i = 2; i < NF; i++) if ($(i+1) == u) print $i }' "$out"
}
b_digest=$(metric BenchmarkDigestUsr files/s)
b_store=$(metric BenchmarkCreateWithStoreUsr files/s)
printf '%-40s %12s files/s\n' "berth digest-only" "$b_digest" "berth create --digest-store (fresh)" "$b_store"

# Targets: at least mkcomposefs 1.0.8's speed on the same tree. Without a
# reference binary, its numbers measured on /usr on the reference machine
# (2 cores) stand in.
m_digest=13900 m_store=1070 ref="mkcomposefs 1.0.8 on the reference machine"
mk=${MKCOMPOSEFS:-$(command -v mkcomposefs || true)}
if [ -z "$mk" ] || [ ! -x "$mk" ]; then
	echo "mkcomposefs not found (set MKCOMPOSEFS=/path/to/mkcomposefs for a side-by-side run)"
else
	ref="$mk, same tree, same run"
	echo "== mkcomposefs: $mk"
	# best TIMEFILE: the shortest elapsed time of the runs recorded in TIMEFILE.
	best() { sort -n "$1" | head -1; }
	t=$(mktemp)
	for _ in $(seq "$runs"); do
		/usr/bin/time -a -o "$t" -f '%e' "$mk" --print-digest-only "$tree" >/dev/null
	done
	m_digest=$(awk -v e="$entries" -v s="$(best "$t")" 'BEGIN { printf "%.0f", e / s }')
	: >"$t"
	for _ in $(seq "$runs"); do
		w=$(mktemp -d "$base/mkcomposefs-bench-XXXXXX")
		/usr/bin/time -a -o "$t" -f '%e' "$mk" --digest-store="$w/objects" "$tree" "$w/image.cfs"
		rm -rf "$w"
	done
	m_store=$(awk -v e="$entries" -v s="$(best "$t")" 'BEGIN { printf "%.0f", e / s }')
	rm -f "$t"
	printf '%-40s %12s files/s\n' "mkcomposefs --print-digest-only" "$m_digest" "mkcomposefs --digest-store (fresh)" "$m_store"
fi
status=0
awk -v a="$b_digest" -v b="$m_digest" -v c="$b_store" -v d="$m_store" -v ref="$ref" 'BEGIN {
	printf "ratio berth/mkcomposefs (%s): digest-only %.2fx, create with store %.2fx\n", ref, a / b, c / d
	exit !(a >= b && c >= d) }' || { echo "composefs: MISSED target (at least as fast as mkcomposefs)"; status=1; }

# --- OCI import benchmark (owned by the OCI importer; runs when present) ---
if [ -x test/bench-oci.sh ]; then
	echo "== OCI import"
	test/bench-oci.sh || status=1
fi
exit $status
