package harness

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/qemu"
)

// A boot whose console goes silent is killed at the silence bound, long before its hard
// timeout, and WaitSSH reports the silence with the end of the console.
func TestSilentBootIsKilledWithConsoleTail(t *testing.T) {
	bin := t.TempDir()
	script := "#!/bin/sh\necho 'BdsDxe: loading Boot0001'\nprintf 'EFI stub: Loaded initrd\\r\\n'\nexec sleep 600\n"
	if err := os.WriteFile(filepath.Join(bin, "qemu-system-x86_64"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	dir := t.TempDir()
	m := &Machine{Name: "m", Dir: dir, Disk: filepath.Join(dir, "disk"), Key: &SSHKey{Private: filepath.Join(dir, "nokey")},
		Accel: TCG, vars: filepath.Join(dir, "vars")}
	start := time.Now()
	vm, err := m.Boot(context.Background(), BootOptions{Label: "silent", NoTPM: true, Silence: 2 * time.Second, Timeout: 10 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Kill()
	_, err = vm.WaitSSH(context.Background(), time.Minute)
	var se *qemu.SilentError
	if !errors.As(err, &se) || !strings.Contains(err.Error(), "EFI stub: Loaded initrd") {
		t.Fatalf("WaitSSH: %v", err)
	}
	if took := time.Since(start); took > 20*time.Second {
		t.Errorf("the silent guest was killed after %s, bound 2s", took)
	}
	if !vm.Exited() {
		t.Error("qemu still runs")
	}
	if log := Tail(vm.Serial, 5); !strings.Contains(log, "harness: guest printed nothing on its console for 2s") {
		t.Errorf("serial log does not say why qemu died:\n%s", log)
	}
}
