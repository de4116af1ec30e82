package qemu

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Stand-ins for qemu-system-x86_64, put first in PATH.
var standIns = map[string]string{
	// Hangs printing nothing (a KVM that never runs the guest).
	"hang": "#!/bin/sh\nexec sleep 600\n",
	// Exits at once with qemu's message.
	"kvm-error-exit": "#!/bin/sh\necho 'KVM internal error. Suberror: 1' >&2\necho 'emulation failure' >&2\nexit 1\n",
	// What qemu really does on such a host: the message, then the guest stops and qemu stays.
	"kvm-error-stay": "#!/bin/sh\necho 'KVM internal error. Suberror: 1' >&2\nexec sleep 600\n",
	// Firmware that runs: BdsDxe on the -serial file, then stays up like a real guest.
	"good": `#!/bin/sh
for a in "$@"; do case "$a" in file:*) serial="${a#file:}";; esac; done
sleep 0.3
printf 'BdsDxe: loading Boot0001 "UEFI Misc Device"\r\n' > "$serial"
exec sleep 600
`,
}

// fakeMachine makes a KVM device stand-in that opens, OVMF stand-ins, and a PATH whose first
// directory holds the named qemu stand-in.
func fakeMachine(t *testing.T, qemu string) ProbeOptions {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bin, "qemu-system-x86_64"), []byte(standIns[qemu]), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	o := ProbeOptions{Device: filepath.Join(dir, "kvm"), OVMFCode: filepath.Join(dir, "code.fd"),
		OVMFVars: filepath.Join(dir, "vars.fd"), Bound: 3 * time.Second, WorkDir: dir}
	for _, p := range []string{o.Device, o.OVMFCode, o.OVMFVars} {
		if err := os.WriteFile(p, []byte("stand-in"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return o
}

func TestProbeChoosesKVMOnlyWhenFirmwareRuns(t *testing.T) {
	for _, c := range []struct {
		qemu    string
		want    Accel
		why     string
		atLeast time.Duration // the probe must not decide before this...
		atMost  time.Duration // ...and must have decided by this
	}{
		{"hang", TCG, "did not reach BdsDxe within 3s", 3 * time.Second, 5 * time.Second},
		{"kvm-error-exit", TCG, "KVM internal error", 0, 2 * time.Second},
		{"kvm-error-stay", TCG, "KVM internal error", 0, 2 * time.Second},
		{"good", KVM, "OVMF reached BdsDxe", 0, 2 * time.Second},
	} {
		t.Run(c.qemu, func(t *testing.T) {
			o := fakeMachine(t, c.qemu)
			start := time.Now()
			d := Probe(context.Background(), o)
			took := time.Since(start)
			t.Logf("%s after %s: %s", d.Accel, took.Round(time.Millisecond), d.Why)
			if d.Accel != c.want || !strings.Contains(d.Why, c.why) {
				t.Errorf("got %s (%s), want %s (%s)", d.Accel, d.Why, c.want, c.why)
			}
			if took < c.atLeast || took > c.atMost {
				t.Errorf("decided after %s, want between %s and %s", took, c.atLeast, c.atMost)
			}
			// Nothing of the stand-in outlives the probe: its temporary directory is gone.
			if m, _ := filepath.Glob(filepath.Join(o.WorkDir, "kvm-probe-*")); len(m) != 0 {
				t.Errorf("probe left %v", m)
			}
		})
	}
}

func TestProbeWithoutKVMDeviceIsTCG(t *testing.T) {
	o := fakeMachine(t, "good")
	o.Device = filepath.Join(t.TempDir(), "no-kvm")
	if d := Probe(context.Background(), o); d.Accel != TCG || !strings.Contains(d.Why, "no usable") {
		t.Errorf("without a KVM device: %+v", d)
	}
	o = fakeMachine(t, "good")
	os.Remove(o.OVMFVars)
	if d := Probe(context.Background(), o); d.Accel != TCG || !strings.Contains(d.Why, "ovmf") {
		t.Errorf("without OVMF: %+v", d)
	}
}

func TestForceEnvWinsOverProbe(t *testing.T) {
	// The hanging stand-in would take the whole bound: forcing must not run it at all.
	fakeMachine(t, "hang")
	for _, v := range []Accel{KVM, TCG} {
		t.Setenv(ForceEnv, string(v))
		start := time.Now()
		d := Detect(context.Background())
		if d.Accel != v || !strings.Contains(d.Why, "forced") || time.Since(start) > time.Second {
			t.Errorf("%s=%s: %+v after %s", ForceEnv, v, d, time.Since(start))
		}
	}
}

func TestProbeResultIsCachedAcrossProcesses(t *testing.T) {
	base := filepath.Join(t.TempDir(), "accel")
	var calls atomic.Int32
	probe := func() Decision { calls.Add(1); return Decision{TCG, "probed"} }
	for i := 0; i < 3; i++ {
		d, err := cachedProbe(context.Background(), base, probe)
		if err != nil || d.Accel != TCG {
			t.Fatalf("%+v %v", d, err)
		}
	}
	if calls.Load() != 1 {
		t.Errorf("probe ran %d times, want once", calls.Load())
	}
	// A cache file others could have written is not believed.
	if err := os.Chmod(base+".json", 0o666); err != nil {
		t.Fatal(err)
	}
	cachedProbe(context.Background(), base, probe)
	if calls.Load() != 2 {
		t.Errorf("a world-writable cache was trusted")
	}
	// Another boot of the machine probes again.
	b, _ := os.ReadFile(base + ".json")
	os.WriteFile(base+".json", []byte(strings.Replace(string(b), `"boot_id":"`, `"boot_id":"x`, 1)), 0o644)
	cachedProbe(context.Background(), base, probe)
	if calls.Load() != 3 {
		t.Errorf("the cache of another boot was used")
	}
}

func TestWatchdogKillsSilentGuest(t *testing.T) {
	killed := make(chan time.Time, 1)
	w := NewWatchdog(400*time.Millisecond, func() { killed <- time.Now() })
	// Output keeps it alive past several bounds.
	var last time.Time
	for i := 0; i < 8; i++ {
		w.Write([]byte("line " + string(rune('a'+i)) + "\r\n"))
		last = time.Now()
		time.Sleep(150 * time.Millisecond)
	}
	select {
	case <-killed:
		t.Fatal("killed a guest that kept printing")
	default:
	}
	var at time.Time
	select {
	case at = <-killed:
	case <-time.After(3 * time.Second):
		t.Fatal("a silent guest was not killed")
	}
	if silent := at.Sub(last); silent < 400*time.Millisecond {
		t.Errorf("killed after %s of silence, bound 400ms", silent)
	}
	var se *SilentError
	if err := w.Err(); !errors.As(err, &se) || !strings.Contains(err.Error(), "line h") || strings.Contains(err.Error(), "\r") {
		t.Errorf("report: %v", err)
	}
}

func TestPausedWatchdogDoesNotFire(t *testing.T) {
	var n atomic.Int32
	w := NewWatchdog(200*time.Millisecond, func() { n.Add(1) })
	w.Pause()
	time.Sleep(500 * time.Millisecond)
	if n.Load() != 0 || w.Err() != nil {
		t.Fatal("a paused watchdog fired")
	}
	w.Resume()
	time.Sleep(500 * time.Millisecond)
	if n.Load() != 1 || w.Err() == nil {
		t.Fatalf("a resumed watchdog fired %d times", n.Load())
	}
}

func TestSilenceBoundIsConfigurable(t *testing.T) {
	t.Setenv(SilenceEnv, "")
	if SilenceBound(TCG) != 5*time.Minute {
		t.Errorf("TCG default %s", SilenceBound(TCG))
	}
	t.Setenv(SilenceEnv, "90s")
	if SilenceBound(TCG) != 90*time.Second {
		t.Errorf("override %s", SilenceBound(TCG))
	}
}

// runStandIn puts a qemu stand-in first in PATH and forces TCG, so Run does not probe.
func runStandIn(t *testing.T, script string) {
	t.Helper()
	bin := t.TempDir()
	if err := os.WriteFile(filepath.Join(bin, "qemu-system-x86_64"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	t.Setenv(ForceEnv, "tcg")
}

func TestRunKillsSilentGuestWithConsoleTail(t *testing.T) {
	runStandIn(t, "#!/bin/sh\necho \"args: $*\"\necho 'Loading initrd'\nexec sleep 600\n")
	start := time.Now()
	res, err := Run(context.Background(), RunOptions{Args: []string{"-serial", "stdio"}, Silence: 500 * time.Millisecond,
		Timeout: time.Minute, Until: func(l string) bool { return strings.Contains(l, "login:") }})
	if !IsSilent(err) || !strings.Contains(err.Error(), "Loading initrd") {
		t.Fatalf("err %v", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Errorf("the silent guest ran %s", time.Since(start))
	}
	if !strings.Contains(res.Console, "args: -accel tcg,thread=multi -cpu qemu64 -serial stdio") {
		t.Errorf("qemu ran without the accelerator decision: %q", res.Console)
	}
}

func TestRunStopsAtTheAwaitedLine(t *testing.T) {
	runStandIn(t, "#!/bin/sh\nprintf 'booting\\r\\nlogin: \\r\\n'\nexec sleep 600\n")
	res, err := Run(context.Background(), RunOptions{Silence: time.Minute, Timeout: time.Minute,
		Until: func(l string) bool { return strings.HasPrefix(l, "login:") }})
	if err != nil || !res.Matched || res.Took > 5*time.Second {
		t.Fatalf("%+v %v", res, err)
	}
	// A guest that exits without the line is an error, and so is the hard bound.
	runStandIn(t, "#!/bin/sh\necho panic\nexit 0\n")
	if _, err := Run(context.Background(), RunOptions{Until: func(string) bool { return false }}); err == nil || IsSilent(err) {
		t.Errorf("exit before the line: %v", err)
	}
	runStandIn(t, "#!/bin/sh\nwhile :; do echo tick; sleep 0.1; done\n")
	if _, err := Run(context.Background(), RunOptions{Timeout: time.Second, Until: func(string) bool { return false }}); err == nil || !strings.Contains(err.Error(), "still running after 1s") {
		t.Errorf("hard bound: %v", err)
	}
}
