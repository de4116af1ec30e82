#!/bin/bash
# Runs every Fuzz* target in the module for a bounded time each.
#
# Go 1.26's fuzz coordinator can report a bare "context deadline exceeded" at the end of
# -fuzztime on a loaded machine (golang/go#75804, fixed in Go 1.27) with nothing found.
# Such a run is retried once; a run that wrote a failing input, panicked or failed any
# other way fails at once.
set -euo pipefail
t=${1:-15s}
export PATH=$PATH:/usr/local/go/bin
tags=containers_image_openpgp,exclude_graphdriver_btrfs,exclude_graphdriver_devicemapper
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for f in $(grep -rl --include='*_test.go' '^func Fuzz' internal cmd 2>/dev/null); do
  pkg=./$(dirname "$f")
  for name in $(grep -o '^func Fuzz[A-Za-z0-9_]*' "$f" | sed 's/^func //'); do
    for try in 1 2; do
      echo "fuzz: $pkg $name ($t)"
      if go test -tags "$tags" -run='^$' -fuzz="^${name}\$" -fuzztime="$t" -fuzzminimizetime=5x "$pkg" 2>&1 | tee "$log"; then
        break
      fi
      if [ "$try" = 1 ] && grep -q 'context deadline exceeded' "$log" && ! grep -qE 'Failing input written|panic:|_test\.go:[0-9]+:' "$log"; then
        echo "fuzz: $name: Go's fuzzing deadline race (golang/go#75804), nothing found: running it once more"
        continue
      fi
      echo "fuzz: $pkg $name failed" >&2
      exit 1
    done
  done
done
