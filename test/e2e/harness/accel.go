package harness

import (
	"context"

	"github.com/berth-dev/berth/internal/qemu"
)

// Accel is how qemu runs the guest (internal/qemu decides it for every qemu berth's tests start).
type Accel = qemu.Accel

// The accelerators: KVM where it truly runs firmware, TCG otherwise.
const (
	KVM = qemu.KVM
	TCG = qemu.TCG
)

// DetectAccel chooses the accelerator: BERTH_E2E_ACCEL=kvm|tcg forces one; otherwise KVM
// is used only if OVMF reaches its boot manager under it within 15 s (qemu.Detect; the
// decision is shared with the unit tests' qemu boots). workDir is unused since the probe
// moved to internal/qemu; the parameter stays for the callers.
func DetectAccel(ctx context.Context, workDir string) (Accel, string) {
	d := qemu.Detect(ctx)
	return d.Accel, d.Why
}
