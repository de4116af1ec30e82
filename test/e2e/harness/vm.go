// Package harness runs berth's VM end-to-end lane: guest images (a Debian root filesystem
// packed as a multi-layer OCI archive), qemu with OVMF and a swtpm TPM 2.0, a serial console
// captured with timestamps, SSH over a 127.0.0.1 port forward, and a summary table.
// Every external process runs under `timeout -k`, so nothing outlives its bound, and a boot
// whose console stays silent for the silence bound (internal/qemu) is killed.
package harness

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/berth-dev/berth/internal/qemu"
)

// Firmware files of Debian's ovmf package: a matching 4M CODE/VARS pair (non-Secure-Boot).
const (
	OVMFCode = qemu.OVMFCode
	OVMFVars = qemu.OVMFVars
)

// Machine is one virtual machine across boots: its disk, its UEFI variable store and its
// TPM state stay; every Boot starts a fresh qemu (a "reboot" is a power-off plus a Boot,
// which lets a boot change its kernel command line).
type Machine struct {
	Name  string // log file prefix
	Dir   string // per-run directory for this machine's logs and state
	Disk  string // raw disk image
	Key   *SSHKey
	Accel Accel
	Log   io.Writer // progress lines (test log); nil = discard

	vars   string // writable OVMF_VARS copy
	tpmDir string // swtpm state
	boots  int
}

// NewMachine prepares a machine's directory, a fresh writable copy of the OVMF variable
// store and a freshly manufactured sha256-only vTPM (fewer banks = less hashing in firmware
// under TCG).
func NewMachine(ctx context.Context, dir, name, disk string, key *SSHKey, accel Accel) (*Machine, error) {
	return newMachine(ctx, dir, name, disk, key, accel, false)
}

// OpenMachine is NewMachine that keeps the variable store and TPM state of an earlier run in
// dir (make demo, then make vm: the same machine).
func OpenMachine(ctx context.Context, dir, name, disk string, key *SSHKey, accel Accel) (*Machine, error) {
	return newMachine(ctx, dir, name, disk, key, accel, true)
}

func newMachine(ctx context.Context, dir, name, disk string, key *SSHKey, accel Accel, keep bool) (*Machine, error) {
	m := &Machine{Name: name, Dir: dir, Disk: disk, Key: key, Accel: accel,
		vars: filepath.Join(dir, name+"-OVMF_VARS.fd"), tpmDir: filepath.Join(dir, name+"-tpm")}
	if keep {
		_, errV := os.Stat(m.vars)
		_, errT := os.Stat(filepath.Join(m.tpmDir, "tpm2-00.permall"))
		if errV == nil && errT == nil {
			return m, nil
		}
	}
	if err := os.MkdirAll(m.tpmDir, 0o700); err != nil {
		return nil, fmt.Errorf("machine %s: %w", name, err)
	}
	b, err := os.ReadFile(OVMFVars)
	if err != nil {
		return nil, fmt.Errorf("machine %s: OVMF variable store (apt-get install ovmf): %w", name, err)
	}
	if err := os.WriteFile(m.vars, b, 0o600); err != nil {
		return nil, fmt.Errorf("machine %s: %w", name, err)
	}
	out, err := run(ctx, 60*time.Second, "swtpm_setup", "--tpm2", "--tpmstate", m.tpmDir, "--pcr-banks", "sha256",
		"--overwrite", "--logfile", filepath.Join(dir, name+"-swtpm_setup.log"))
	if err != nil {
		return nil, fmt.Errorf("machine %s: swtpm_setup: %w: %s", name, err, out)
	}
	return m, nil
}

func (m *Machine) logf(format string, args ...any) {
	if m.Log != nil {
		fmt.Fprintf(m.Log, "%s %s: %s\n", time.Now().UTC().Format("15:04:05"), m.Name, fmt.Sprintf(format, args...))
	}
}

// DirectBoot boots a kernel without firmware (-kernel/-initrd/-append through SeaBIOS):
// for scenarios that do not test the firmware path, it saves the ~15 s OVMF costs under TCG.
type DirectBoot struct {
	Kernel, Initrd, Append string
	// UEFI loads the kernel through OVMF (fw_cfg) instead of SeaBIOS: firmware, EFI
	// variables and TPM measurements as in a full boot, without the disk's ESP.
	UEFI bool
}

// BootOptions choose how one boot runs.
type BootOptions struct {
	Label   string        // names the logs: <machine>-<label>-serial.log
	Direct  *DirectBoot   // nil = full UEFI: OVMF → the disk's ESP (systemd-boot → UKI)
	Timeout time.Duration // hard bound on the qemu process; default 15 min
	// Silence kills qemu when the console prints nothing for this long before the guest
	// first answers over SSH (afterwards it is driven over SSH and quiet by design); default
	// qemu.SilenceBound of the machine's accelerator.
	Silence time.Duration
	NoTPM   bool
	// Interactive connects the serial console to the terminal (make vm); no capture.
	Interactive bool
	SSHPort     int // host port forwarded to the guest's port 22; 0 = pick a free one
}

// VM is one running qemu.
type VM struct {
	m       *Machine
	Label   string
	SSHPort int
	Started time.Time
	Serial  string // serial log path
	QemuLog string
	TPMLog  string
	SSHUpAt time.Duration // qemu start → first successful SSH login (set by WaitSSH)
	// qemu start → root shell on the serial console (set by ConsoleLogin)
	ConsoleUpAt time.Duration

	cmd    *exec.Cmd
	swtpm  *exec.Cmd
	watch  *qemu.Watchdog
	done   chan struct{}
	err    error
	mu     sync.Mutex
	lines  []SerialLine
	notify chan struct{}
	stdin  io.WriteCloser // the serial console's input (console.go)
	con    sync.Mutex     // one console session command at a time
	conN   int
}

// SerialLine is one console line with its time since qemu started.
type SerialLine struct {
	At   time.Duration
	Text string
}

// ansi matches terminal control sequences (CSI, OSC, charset) that systemd and the
// firmware write to the console.
var ansi = regexp.MustCompile(`\x1b\[[0-9;?!>=]*[a-zA-Z]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)?|\x1b[()][0-9A-Za-z]|\x1b[=>c]`)

// Boot starts qemu for this machine.
func (m *Machine) Boot(ctx context.Context, o BootOptions) (*VM, error) {
	m.boots++
	if o.Label == "" {
		o.Label = fmt.Sprintf("boot%d", m.boots)
	}
	if o.Timeout == 0 {
		o.Timeout = 15 * time.Minute
	}
	if o.Silence == 0 {
		o.Silence = qemu.SilenceBound(m.Accel)
	}
	base := filepath.Join(m.Dir, m.Name+"-"+o.Label)
	v := &VM{m: m, Label: o.Label, Serial: base + "-serial.log", QemuLog: base + "-qemu.log",
		TPMLog: base + "-swtpm.log", done: make(chan struct{}), notify: make(chan struct{})}
	port := o.SSHPort
	if port == 0 {
		var err error
		if port, err = FreePort(); err != nil {
			return nil, err
		}
	}
	v.SSHPort = port
	args := m.Accel.QemuArgs()
	args = append(args, "-machine", "q35", "-smp", "2", "-m", "2048", "-no-reboot",
		"-drive", "if=none,id=disk0,file="+m.Disk+",format=raw",
		"-device", "virtio-blk-pci,drive=disk0",
		"-nic", fmt.Sprintf("user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:%d-:22", port),
		"-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0")
	if o.Direct != nil {
		args = append(args, "-kernel", o.Direct.Kernel, "-initrd", o.Direct.Initrd, "-append", o.Direct.Append)
	}
	if o.Direct == nil || o.Direct.UEFI {
		args = append(args,
			"-drive", "if=pflash,format=raw,unit=0,readonly=on,file="+OVMFCode,
			"-drive", "if=pflash,format=raw,unit=1,file="+m.vars)
	}
	if !o.NoTPM {
		sock := filepath.Join(m.tpmDir, "sock")
		os.Remove(sock)
		v.swtpm = exec.Command("timeout", "-k", "5", secs(o.Timeout+time.Minute), "swtpm", "socket", "--tpm2",
			"--tpmstate", "dir="+m.tpmDir, "--ctrl", "type=unixio,path="+sock,
			"--log", "file="+v.TPMLog+",level=1", "--terminate")
		v.swtpm.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
		if err := v.swtpm.Start(); err != nil {
			return nil, fmt.Errorf("start swtpm: %w", err)
		}
		if err := waitFor(5*time.Second, func() bool { _, err := os.Stat(sock); return err == nil }); err != nil {
			v.killSwtpm()
			return nil, fmt.Errorf("swtpm socket %s did not appear: %w (log %s)", sock, err, v.TPMLog)
		}
		args = append(args, "-chardev", "socket,id=chrtpm,path="+sock,
			"-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0")
	}
	if o.Interactive {
		args = append(args, "-nographic")
		cmd := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
		v.cmd = cmd
		m.logf("qemu %s", strings.Join(args, " "))
		err := cmd.Run()
		v.killSwtpm()
		return v, err
	}
	args = append(args, "-display", "none", "-monitor", "none", "-serial", "stdio")
	qlog, err := os.Create(v.QemuLog)
	if err != nil {
		v.killSwtpm()
		return nil, err
	}
	fmt.Fprintf(qlog, "# qemu-system-x86_64 %s\n", strings.Join(args, " "))
	v.cmd = exec.Command("timeout", append([]string{"-k", "5", secs(o.Timeout), "qemu-system-x86_64"}, args...)...)
	// Own process group (Kill takes qemu and timeout together); SIGTERM when the test process
	// dies, which timeout forwards to qemu, so a killed run leaves no VM behind.
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	v.cmd.Stderr = qlog
	// The serial port's input: ConsoleRun types into it (console.go).
	if v.stdin, err = v.cmd.StdinPipe(); err != nil {
		v.killSwtpm()
		return nil, err
	}
	stdout, err := v.cmd.StdoutPipe()
	if err != nil {
		v.killSwtpm()
		return nil, err
	}
	serial, err := os.Create(v.Serial)
	if err != nil {
		v.killSwtpm()
		return nil, err
	}
	v.Started = time.Now()
	if err := v.cmd.Start(); err != nil {
		v.killSwtpm()
		return nil, fmt.Errorf("start qemu: %w", err)
	}
	m.logf("boot %s: %s, ssh port %d, serial %s", o.Label, bootKind(o), port, v.Serial)
	pid := v.cmd.Process.Pid
	v.watch = qemu.NewWatchdog(o.Silence, func() {
		m.logf("%s: console silent for %s: killing qemu", o.Label, o.Silence)
		syscall.Kill(-pid, syscall.SIGKILL)
	})
	go func() {
		v.capture(stdout, serial)
		err := v.cmd.Wait()
		v.watch.Stop()
		if serr := v.watch.Err(); serr != nil {
			err = serr
			fmt.Fprintf(serial, "[%8.2f] harness: guest printed nothing on its console for %s: qemu killed\n",
				time.Since(v.Started).Seconds(), serr.(*qemu.SilentError).Bound)
		}
		qlog.Close()
		serial.Close()
		v.killSwtpm()
		v.mu.Lock()
		v.err = err
		v.mu.Unlock()
		close(v.done)
	}()
	return v, nil
}

func bootKind(o BootOptions) string {
	if o.Direct != nil && o.Direct.UEFI {
		return "direct kernel boot through OVMF"
	}
	if o.Direct != nil {
		return "direct kernel boot"
	}
	return "UEFI (OVMF)"
}

// capture timestamps each console line into the serial log and keeps it for WaitSerial.
func (v *VM) capture(r io.Reader, w io.Writer) {
	br := bufio.NewReaderSize(kickReader{r, v.watch}, 64<<10)
	for {
		line, err := br.ReadString('\n')
		if line != "" {
			at := time.Since(v.Started)
			text := ansi.ReplaceAllString(strings.TrimRight(strings.ReplaceAll(line, "\r", ""), "\n"), "")
			fmt.Fprintf(w, "[%8.2f] %s\n", at.Seconds(), text)
			v.watch.Write([]byte(text + "\n"))
			v.mu.Lock()
			v.lines = append(v.lines, SerialLine{At: at, Text: text})
			close(v.notify)
			v.notify = make(chan struct{})
			v.mu.Unlock()
		}
		if err != nil {
			return
		}
	}
}

// kickReader tells the watchdog of every read, so output without a newline counts too.
type kickReader struct {
	r io.Reader
	w *qemu.Watchdog
}

func (k kickReader) Read(p []byte) (int, error) {
	n, err := k.r.Read(p)
	if n > 0 {
		k.w.Kick()
	}
	return n, err
}

func (v *VM) killSwtpm() {
	if v.swtpm != nil && v.swtpm.Process != nil {
		syscall.Kill(-v.swtpm.Process.Pid, syscall.SIGKILL)
		v.swtpm.Wait()
		v.swtpm = nil
	}
}

// Silent is the watchdog's *qemu.SilentError if the guest was killed for a silent console.
func (v *VM) Silent() error {
	if v.watch == nil {
		return nil
	}
	return v.watch.Err()
}

// Exited reports whether qemu has exited.
func (v *VM) Exited() bool {
	select {
	case <-v.done:
		return true
	default:
		return false
	}
}

// Wait waits up to timeout for qemu to exit and returns its exit error.
func (v *VM) Wait(timeout time.Duration) error {
	select {
	case <-v.done:
		v.mu.Lock()
		defer v.mu.Unlock()
		return v.err
	case <-time.After(timeout):
		return fmt.Errorf("%s: qemu still running after %s", v.Label, timeout)
	}
}

// Kill stops qemu (and swtpm) at once.
func (v *VM) Kill() {
	if v.cmd != nil && v.cmd.Process != nil && !v.Exited() {
		syscall.Kill(-v.cmd.Process.Pid, syscall.SIGKILL)
		v.Wait(10 * time.Second)
	}
	v.killSwtpm()
}

// Lines returns the console lines so far.
func (v *VM) Lines() []SerialLine {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]SerialLine(nil), v.lines...)
}

// WaitSerial waits until a console line matches re and returns it. It fails when qemu
// exits first or timeout passes.
func (v *VM) WaitSerial(re *regexp.Regexp, timeout time.Duration) (SerialLine, error) {
	_, l, err := v.waitSerialFrom(0, re, timeout)
	return l, err
}

// waitSerialFrom is WaitSerial from console line number seen on; it also returns the
// matching line's number.
func (v *VM) waitSerialFrom(seen int, re *regexp.Regexp, timeout time.Duration) (int, SerialLine, error) {
	deadline := time.After(timeout)
	for {
		v.mu.Lock()
		lines, notify := v.lines, v.notify
		v.mu.Unlock()
		for ; seen < len(lines); seen++ {
			if re.MatchString(lines[seen].Text) {
				return seen, lines[seen], nil
			}
		}
		select {
		case <-notify:
		case <-v.done:
			v.mu.Lock()
			n := len(v.lines)
			v.mu.Unlock()
			if n > seen {
				continue
			}
			if err := v.Silent(); err != nil {
				return seen, SerialLine{}, fmt.Errorf("%s: waiting for %q: %w", v.Label, re, err)
			}
			return seen, SerialLine{}, fmt.Errorf("%s: qemu exited before the console showed %q", v.Label, re)
		case <-deadline:
			return seen, SerialLine{}, fmt.Errorf("%s: console did not show %q within %s", v.Label, re, timeout)
		}
	}
}

// kernelPanic matches the console line of a guest kernel panic.
var kernelPanic = regexp.MustCompile(`Kernel panic - not syncing`)

// Panicked reports whether the guest kernel panicked (seen on the serial console).
func (v *VM) Panicked() bool {
	for _, l := range v.Lines() {
		if kernelPanic.MatchString(l.Text) {
			return true
		}
	}
	return false
}

// Poweroff asks the guest to power off over SSH and waits for qemu to exit; after the
// timeout qemu is killed (and that is an error: the guest did not shut down cleanly).
func (v *VM) Poweroff(ctx context.Context, timeout time.Duration) error {
	if v.Exited() {
		return nil
	}
	// The SSH session dies with the guest: its error is expected and ignored.
	v.SSH(ctx, "systemctl --no-block poweroff")
	if err := v.Wait(timeout); err != nil {
		v.Kill()
		return fmt.Errorf("%s: guest did not power off within %s (killed)", v.Label, timeout)
	}
	return nil
}

// Tail returns the last n lines of a log file, for failure reports.
func Tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%s: %v)", path, err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Logs returns the tails of this boot's serial, qemu and swtpm logs.
func (v *VM) Logs(n int) string {
	var b strings.Builder
	for _, p := range []string{v.Serial, v.QemuLog, v.TPMLog} {
		if _, err := os.Stat(p); err != nil {
			continue
		}
		fmt.Fprintf(&b, "==> %s (last %d lines) <==\n%s\n", p, n, Tail(p, n))
	}
	return b.String()
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func secs(d time.Duration) string { return strconv.Itoa(int(d.Seconds() + 0.999)) }

func waitFor(timeout time.Duration, cond func() bool) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if cond() {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return errors.New("timed out")
}

// run runs a command under `timeout -k 5` and returns its combined output.
func run(ctx context.Context, timeout time.Duration, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "timeout", append([]string{"-k", "5", secs(timeout), name}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w", name, strings.Join(args, " "), err)
	}
	return string(out), nil
}
