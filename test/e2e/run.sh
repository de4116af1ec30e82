#!/bin/bash
# test/e2e/run.sh [e2e|harness|demo|vm] — berth's VM end-to-end lane.
#   e2e (default; make e2e): build the guest images (cached by recipe), install them with
#       berth and run the scenario tests; print the summary table. Fails if anything fails.
#   harness: boot the plain guest rootfs (no berth) to check qemu/OVMF/swtpm/SSH themselves.
#   demo (make demo): install the standard Debian image to out/demo/disk.img, boot it, show
#       the verified root and a local change surviving a reboot; upgrade to a second image
#       from a registry on 127.0.0.1, show `berth status`, roll back, boot the first again.
#   vm (make vm): boot out/demo/disk.img interactively on the serial console.
# Env: BERTH_E2E_ACCEL=kvm|tcg (default: probe), BERTH_E2E_CACHE (default /var/cache/berth-e2e),
#      BERTH_E2E_OUT (run directory, default out/e2e/<UTC time>), E2E_RUN (go test -run filter).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH=$PATH:/usr/local/go/bin:$HOME/go/bin
export CGO_ENABLED=0
tags=containers_image_openpgp,exclude_graphdriver_btrfs,exclude_graphdriver_devicemapper
mode=${1:-e2e}

die() { echo "e2e: FAIL: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "the VM lane must run as root (mmdebstrap, disk images, berth install)"
for tool in qemu-system-x86_64 swtpm swtpm_setup ssh ssh-keygen mmdebstrap debugfs mdir mcopy fsverity timeout; do
  command -v "$tool" >/dev/null || die "$tool is missing (run test/deps.sh or make deps)"
done
[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || die "OVMF is missing (apt-get install ovmf)"

# berth_install_ready explains what is missing for `berth install to-disk` as the lane uses it.
berth_install_ready() {
  [ -x bin/berth ] || { echo "bin/berth is not built (make build)"; return 1; }
  local help
  if ! help=$(bin/berth install to-disk --help 2>&1); then
    echo "\`berth install to-disk\` is not implemented yet (bin/berth install to-disk --help: $(echo "$help" | head -1))"; return 1
  fi
  for flag in --image --wipe --root-ssh-authorized-keys; do
    grep -q -- "$flag" <<<"$help" || { echo "\`berth install to-disk\` has no $flag flag yet"; return 1; }
  done
}

gotest() {  # gotest RUN-FILTER TIMEOUT
  local out=${BERTH_E2E_OUT:-out/e2e/$(date -u +%Y%m%d-%H%M%S)}
  mkdir -p "$out"; export BERTH_E2E_OUT=$(realpath "$out")
  echo "e2e: logs in $BERTH_E2E_OUT"
  local rc=0
  BERTH_E2E=1 go test -tags "$tags" -count=1 -timeout "$2" -v -run "$1" ./test/e2e/ 2>&1 | tee "$BERTH_E2E_OUT/go-test.log" || rc=$?
  [ -f "$BERTH_E2E_OUT/summary.txt" ] && { echo; echo "e2e summary ($BERTH_E2E_OUT/summary.txt):"; cat "$BERTH_E2E_OUT/summary.txt"; }
  return $rc
}

case $mode in
  e2e)
    if ! why=$(berth_install_ready); then
      die "$why — the scenarios install the guest with \`berth install to-disk DISK --image oci-archive:… --wipe --root-ssh-authorized-keys KEY\`; nothing was booted"
    fi
    # Images: cached by recipe hash, so this is quick after the first run.
    go run -tags "$tags" ./test/e2e/cmd/mkguest -recipe all
    gotest "${E2E_RUN:-TestMkosi|TestTrixie|TestVariant|TestUpdate|TestLocalChanges|TestBookworm|TestBootc|TestKernelRefusals|TestTwoKernels}" 85m
    ;;
  harness)
    gotest "TestHarness" 40m
    ;;
  demo|vm)
    if [ "$mode" = demo ] && ! why=$(berth_install_ready); then die "make demo: $why"; fi
    go build -tags "$tags" -o out/bin/berth-demo ./test/e2e/cmd/berth-demo
    exec out/bin/berth-demo "$mode"
    ;;
  *) die "unknown mode $mode (e2e, harness, demo, vm)";;
esac
