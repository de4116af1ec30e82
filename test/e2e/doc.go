// Package e2e is berth's VM end-to-end lane: standard Debian images (no
// berth inside) are installed by berth onto virtual disks and booted under
// qemu with OVMF and a TPM. The tests are in the _test.go files and run
// only with BERTH_E2E=1 (test/e2e/run.sh, `make e2e`) and as root; the
// harness (qemu, SSH, disks, guest images, registry) is in harness/.
package e2e
