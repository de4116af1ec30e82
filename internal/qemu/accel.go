// Package qemu holds what every qemu that berth's tests and VM lane start shares: the one
// accelerator decision (KVM only where it really runs firmware, TCG otherwise) and the
// watchdog that kills a guest whose console stays silent. It imports no other berth package,
// so any test can use it.
package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Accel is how qemu runs the guest.
type Accel string

// KVM where it truly works; TCG otherwise (multi-threaded, qemu64 CPU: measured faster
// than -cpu max under TCG).
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

// Firmware files of Debian's ovmf package: a matching 4M CODE/VARS pair (non-Secure-Boot).
const (
	OVMFCode = "/usr/share/OVMF/OVMF_CODE_4M.fd"
	OVMFVars = "/usr/share/OVMF/OVMF_VARS_4M.fd"
)

// ForceEnv names the variable that forces the accelerator (kvm or tcg) without probing.
const ForceEnv = "BERTH_E2E_ACCEL"

// DefaultProbeBound is how long OVMF gets under KVM to reach its boot manager. It takes
// about a second where KVM works.
const DefaultProbeBound = 15 * time.Second

// ProbeOptions are the inputs of Probe; the zero value probes this machine.
type ProbeOptions struct {
	Device   string        // KVM device; default /dev/kvm
	Qemu     string        // qemu binary, looked up in PATH; default qemu-system-x86_64
	OVMFCode string        // default OVMFCode
	OVMFVars string        // default OVMFVars
	Bound    time.Duration // default DefaultProbeBound
	WorkDir  string        // for the probe's temporary files; default os.TempDir()
}

func (o *ProbeOptions) defaults() {
	if o.Device == "" {
		o.Device = "/dev/kvm"
	}
	if o.Qemu == "" {
		o.Qemu = "qemu-system-x86_64"
	}
	if o.OVMFCode == "" {
		o.OVMFCode = OVMFCode
	}
	if o.OVMFVars == "" {
		o.OVMFVars = OVMFVars
	}
	if o.Bound == 0 {
		o.Bound = DefaultProbeBound
	}
}

// Decision is the chosen accelerator and why.
type Decision struct {
	Accel Accel  `json:"accel"`
	Why   string `json:"why"`
}

// Probe boots OVMF under KVM and chooses KVM only if the firmware reaches its boot manager
// (BdsDxe on the serial console) within the bound. A /dev/kvm that opens but cannot run
// firmware (as under the nested hypervisor of some cloud machines, where qemu prints
// "KVM internal error" and stops the guest without exiting) falls back to TCG as soon as
// qemu says so, and at the latest when the bound passes.
func Probe(ctx context.Context, o ProbeOptions) Decision {
	o.defaults()
	tcg := func(format string, args ...any) Decision {
		return Decision{TCG, "KVM probe: " + fmt.Sprintf(format, args...)}
	}
	f, err := os.OpenFile(o.Device, os.O_RDWR, 0)
	if err != nil {
		return tcg("no usable %s: %v", o.Device, err)
	}
	f.Close()
	bin, err := exec.LookPath(o.Qemu)
	if err != nil {
		return tcg("%v", err)
	}
	vars, err := os.ReadFile(o.OVMFVars)
	if err != nil {
		return tcg("OVMF variable store (apt-get install ovmf): %v", err)
	}
	if _, err := os.Stat(o.OVMFCode); err != nil {
		return tcg("OVMF firmware (apt-get install ovmf): %v", err)
	}
	dir, err := os.MkdirTemp(o.WorkDir, "kvm-probe-")
	if err != nil {
		return tcg("%v", err)
	}
	defer os.RemoveAll(dir)
	varsCopy := filepath.Join(dir, "vars.fd")
	if err := os.WriteFile(varsCopy, vars, 0o600); err != nil {
		return tcg("%v", err)
	}
	serial := filepath.Join(dir, "serial")
	cmd := exec.Command(bin,
		"-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "512", "-display", "none",
		"-monitor", "none", "-net", "none", "-no-reboot",
		"-drive", "if=pflash,format=raw,unit=0,readonly=on,file="+o.OVMFCode,
		"-drive", "if=pflash,format=raw,unit=1,file="+varsCopy,
		"-serial", "file:"+serial)
	// Own process group, killed as a whole; killed too if this process dies mid-probe.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	cmd.WaitDelay = 2 * time.Second
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return tcg("start %s: %v", bin, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	stop := func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
	deadline := time.NewTimer(o.Bound)
	defer deadline.Stop()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			return tcg("qemu exited (%v): %s", err, firstLine(stderr.String()))
		case <-ctx.Done():
			stop()
			return tcg("cancelled: %v", ctx.Err())
		case <-deadline.C:
			stop()
			return tcg("OVMF did not reach BdsDxe within %s", o.Bound)
		case <-tick.C:
			if s := stderr.String(); strings.Contains(s, "KVM internal error") {
				stop()
				return tcg("qemu reported %q after %s", firstLine(s[strings.Index(s, "KVM internal error"):]), time.Since(start).Round(time.Millisecond))
			}
			if b, _ := os.ReadFile(serial); bytes.Contains(b, []byte("BdsDxe")) {
				stop()
				return Decision{KVM, fmt.Sprintf("KVM probe: OVMF reached BdsDxe after %s", time.Since(start).Round(time.Millisecond))}
			}
		}
	}
}

// Forced returns the accelerator BERTH_E2E_ACCEL forces, if it does.
func Forced() (Decision, bool) {
	switch v := os.Getenv(ForceEnv); v {
	case "kvm":
		return Decision{KVM, "forced by " + ForceEnv + "=kvm"}, true
	case "tcg":
		return Decision{TCG, "forced by " + ForceEnv + "=tcg"}, true
	}
	return Decision{}, false
}

var (
	detectMu sync.Mutex
	detected *Decision
)

// Detect is the accelerator for every qemu of this machine: forced by BERTH_E2E_ACCEL=kvm|tcg,
// else the decision of Probe with default options. The probe runs once per process, and once
// per boot of the machine for all processes that share os.TempDir() (a cache file keyed by
// the kernel's boot id), so the packages of one `go test ./...` do not each spend up to 15 s.
func Detect(ctx context.Context) Decision {
	if d, ok := Forced(); ok {
		return d
	}
	detectMu.Lock()
	defer detectMu.Unlock()
	if detected != nil {
		return *detected
	}
	d, err := cachedProbe(ctx, filepath.Join(os.TempDir(), "berth-qemu-accel"), func() Decision {
		return Probe(ctx, ProbeOptions{})
	})
	if err == nil && ctx.Err() == nil {
		detected = &d
	}
	return d
}

// cacheEntry is the cross-process cache: the decision for one boot of the machine and one
// qemu binary.
type cacheEntry struct {
	BootID string `json:"boot_id"`
	Qemu   string `json:"qemu"`
	Decision
}

// cachedProbe returns the decision cached under base (base.json, locked through base.lock
// so that concurrent processes wait for one probe) or runs probe and caches its result.
// A cache file not owned by this user or writable by others is ignored.
func cachedProbe(ctx context.Context, base string, probe func() Decision) (Decision, error) {
	bootID, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return probe(), nil
	}
	key := cacheEntry{BootID: strings.TrimSpace(string(bootID))}
	key.Qemu, _ = exec.LookPath("qemu-system-x86_64")
	lock, err := os.OpenFile(base+".lock", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return probe(), nil
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return probe(), nil
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	path := base + ".json"
	if f, err := os.Open(path); err == nil {
		var e cacheEntry
		fi, serr := f.Stat()
		derr := json.NewDecoder(f).Decode(&e)
		f.Close()
		if serr == nil && derr == nil && trusted(fi) && e.BootID == key.BootID && e.Qemu == key.Qemu &&
			(e.Accel == KVM || e.Accel == TCG) {
			e.Why += " (cached " + path + ")"
			return e.Decision, nil
		}
	}
	d := probe()
	if ctx.Err() != nil {
		return d, ctx.Err()
	}
	key.Decision = d
	b, _ := json.Marshal(key)
	tmp := path + fmt.Sprintf(".%d.tmp", os.Getpid())
	if f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644); err == nil {
		_, werr := f.Write(b)
		if cerr := f.Close(); werr != nil || cerr != nil || os.Rename(tmp, path) != nil {
			os.Remove(tmp)
		}
	}
	return d, nil
}

func trusted(fi os.FileInfo) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && int(st.Uid) == os.Geteuid() && fi.Mode().Perm()&0o022 == 0
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// syncBuffer is a bytes.Buffer written by exec's copying goroutine and read by the probe.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
