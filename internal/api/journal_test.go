package api

import (
	"errors"
	"os"
	"os/exec"
	"testing"

	"github.com/berth-dev/berth/internal/store"
)

// Recovery must not undo a job that another live process (berthd, or
// the CLI with --sysroot) is running; once that process is gone it must.
func TestRecoverLeavesLiveJobAlone(t *testing.T) {
	sysroot := t.TempDir()
	if err := store.At(sysroot).Init(); err != nil {
		t.Fatal(err)
	}
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer other.Process.Kill()
	rec := newRecord(7, KindUpgrade, map[string]string{})
	rec.PID = other.Process.Pid
	start, err := procStart(rec.PID)
	if err != nil {
		t.Fatal(err)
	}
	rec.ProcStart = start
	if err := writeRecord(journalPath(sysroot), rec); err != nil {
		t.Fatal(err)
	}
	if _, err := Recover(sysroot, ""); !errors.Is(err, ErrJobRunning) {
		t.Fatalf("Recover with a live job: %v", err)
	}
	if _, err := ReadJournal(sysroot); err != nil {
		t.Fatalf("journal of the live job was touched: %v", err)
	}

	other.Process.Kill()
	other.Wait()
	got, err := Recover(sysroot, "")
	if err != nil || got == nil || got.ID != 7 || got.State != StateInterrupted {
		t.Fatalf("Recover after the process died: %+v, %v", got, err)
	}
	if _, err := ReadJournal(sysroot); !os.IsNotExist(err) {
		t.Fatalf("journal left: %v", err)
	}

	// A reused PID (same number, other process start time) is not the job.
	rec.PID, rec.ProcStart = os.Getppid(), 1
	if rec.alive() {
		t.Fatal("a process with another start time counts as the job's")
	}
	rec.BootID = "another-boot"
	if rec.alive() {
		t.Fatal("a record from another boot counts as alive")
	}
}
