package harness

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Accel is how qemu runs the guest.
type Accel string

// KVM where it truly works; TCG otherwise (multi-threaded, qemu64 CPU: measured faster
// than -cpu max under TCG, see /work/shared/reference/vm-lane.md).
const (
	KVM Accel = "kvm"
	TCG Accel = "tcg"
)

// QemuArgs returns the accelerator and CPU arguments.
func (a Accel) QemuArgs() []string {
	if a == KVM {
		return []string{"-accel", "kvm", "-cpu", "host"}
	}
	return []string{"-accel", "tcg,thread=multi", "-cpu", "qemu64"}
}

// DetectAccel chooses the accelerator: BERTH_E2E_ACCEL=kvm|tcg forces one; otherwise KVM
// is used only if OVMF reaches its boot manager under it within 15 s. A /dev/kvm that
// exists but cannot run firmware (as the nested PVM hypervisor of some cloud machines)
// fails this probe and the lane falls back to TCG.
func DetectAccel(ctx context.Context, workDir string) (Accel, string) {
	switch a := os.Getenv("BERTH_E2E_ACCEL"); a {
	case "kvm":
		return KVM, "forced by BERTH_E2E_ACCEL"
	case "tcg":
		return TCG, "forced by BERTH_E2E_ACCEL"
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return TCG, "no usable /dev/kvm: " + err.Error()
	}
	f.Close()
	dir, err := os.MkdirTemp(workDir, "kvm-probe-")
	if err != nil {
		return TCG, err.Error()
	}
	defer os.RemoveAll(dir)
	vars, _ := os.ReadFile(OVMFVars)
	os.WriteFile(filepath.Join(dir, "vars.fd"), vars, 0o600)
	serial := filepath.Join(dir, "serial")
	cmd := exec.CommandContext(ctx, "timeout", "-k", "2", "20", "qemu-system-x86_64",
		"-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "512", "-display", "none",
		"-monitor", "none", "-net", "none", "-no-reboot",
		"-drive", "if=pflash,format=raw,unit=0,readonly=on,file="+OVMFCode,
		"-drive", "if=pflash,format=raw,unit=1,file="+filepath.Join(dir, "vars.fd"),
		"-serial", "file:"+serial)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return TCG, "kvm probe: " + err.Error()
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	deadline := time.After(15 * time.Second)
	for {
		select {
		case err := <-done:
			return TCG, fmt.Sprintf("KVM probe: qemu exited (%v): %s", err, firstLine(stderr.String()))
		case <-deadline:
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
			return TCG, "KVM probe: OVMF did not reach BdsDxe within 15 s"
		case <-time.After(250 * time.Millisecond):
			if b, _ := os.ReadFile(serial); strings.Contains(string(b), "BdsDxe") {
				syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				<-done
				return KVM, "KVM probe: OVMF reached BdsDxe"
			}
		}
	}
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
