#!/bin/bash
# Runs every Fuzz* target in the module for a bounded time each.
set -euo pipefail
t=${1:-15s}
export PATH=$PATH:/usr/local/go/bin
tags=containers_image_openpgp,exclude_graphdriver_btrfs,exclude_graphdriver_devicemapper
for f in $(grep -rl --include='*_test.go' '^func Fuzz' internal cmd 2>/dev/null); do
  pkg=./$(dirname "$f")
  for name in $(grep -o '^func Fuzz[A-Za-z0-9_]*' "$f" | sed 's/^func //'); do
    echo "fuzz: $pkg $name ($t)"
    go test -tags "$tags" -run='^$' -fuzz="^${name}\$" -fuzztime="$t" -fuzzminimizetime=5x "$pkg"
  done
done
