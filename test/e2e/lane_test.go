package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testenv"
	"github.com/berth-dev/berth/test/e2e/harness"
)

// lane is the state shared by every scenario of one run.
var lane struct {
	once    sync.Once
	err     error
	src     string
	dir     string
	key     *harness.SSHKey
	accel   harness.Accel
	summary harness.Summary
}

func TestMain(m *testing.M) {
	code := m.Run()
	if rows := lane.summary.Rows(); len(rows) > 0 {
		fmt.Println()
		lane.summary.Print(os.Stdout)
		if lane.dir != "" {
			lane.summary.WriteFile(filepath.Join(lane.dir, "summary.txt"))
			fmt.Printf("logs: %s\n", lane.dir)
		}
	}
	os.Exit(code)
}

// setup skips unless the lane is enabled and prepares the run directory, the SSH key and
// the accelerator once.
func setup(t *testing.T) {
	t.Helper()
	if os.Getenv("BERTH_E2E") != "1" {
		t.Skip("VM lane: set BERTH_E2E=1 (test/e2e/run.sh does) to boot VMs")
	}
	testenv.RequireRoot(t, "VM lane: mmdebstrap, loop-free disk editing, berth install")
	lane.once.Do(func() {
		ctx := context.Background()
		if lane.src, lane.err = harness.RepoRoot(); lane.err != nil {
			return
		}
		if lane.dir, lane.err = harness.NewRunDir(); lane.err != nil {
			return
		}
		if lane.key, lane.err = harness.NewSSHKey(ctx, lane.dir); lane.err != nil {
			return
		}
		var why string
		lane.accel, why = harness.DetectAccel(ctx, lane.dir)
		fmt.Printf("e2e: run dir %s, accel %s (%s)\n", lane.dir, lane.accel, why)
	})
	if lane.err != nil {
		t.Fatalf("lane setup: %v", lane.err)
	}
}

// step runs one named scenario step as a subtest and records it in the summary table.
func step(t *testing.T, name string, fn func(t *testing.T)) bool {
	t.Helper()
	start := time.Now()
	var note string
	ok := t.Run(name, func(t *testing.T) {
		defer func() {
			if t.Skipped() {
				note = "skipped"
			}
		}()
		fn(t)
	})
	result := "PASS"
	switch {
	case note == "skipped":
		result = "SKIP"
	case !ok:
		result = "FAIL"
	}
	lane.summary.Add(name, result, time.Since(start), note)
	return ok
}

// logWriter sends harness progress lines to the test log.
type logWriter struct{ t *testing.T }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// failWithLogs reports err with the tails of the VM's logs.
func failWithLogs(t *testing.T, vm *harness.VM, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if vm != nil {
		msg += "\n" + vm.Logs(40)
	}
	t.Fatal(msg)
}
