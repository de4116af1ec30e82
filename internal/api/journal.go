package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/store"
)

// The job journal: while a mutating job runs, <sysroot>/berth/job.json
// says which job it is and which deployments it has created so far. It is
// on the berth filesystem (not /run) so that a power cut is recovered at
// the next boot just like a killed daemon. When the job ends the record
// moves to last-job.json. A journal found at start means the previous
// daemon died mid-job: Recover cleans up after it.
const (
	journalFile = "job.json"
	lastJobFile = "last-job.json"
)

// JobRecord is the content of job.json and last-job.json.
type JobRecord struct {
	ID        uint64            `json:"id"`
	Kind      string            `json:"kind"`
	Args      map[string]string `json:"args,omitempty"`
	PID       int               `json:"pid"`
	Started   time.Time         `json:"started"`
	Finished  *time.Time        `json:"finished,omitempty"`
	State     string            `json:"state"` // running, done, failed, cancelled, interrupted
	Summary   string            `json:"summary,omitempty"`
	Error     string            `json:"error,omitempty"`
	Created   []string          `json:"created,omitempty"`   // deployments this job created
	Recovered []string          `json:"recovered,omitempty"` // what recovery removed
	// BootID and ProcStart (the process' start time in clock ticks since
	// boot) tell whether PID is still the process that runs the job.
	BootID    string `json:"boot_id,omitempty"`
	ProcStart uint64 `json:"proc_start,omitempty"`
}

// ErrJobRunning is wrapped when another live process runs a job.
var ErrJobRunning = errors.New("another berth job is running")

// newRecord starts the record of a job run by this process.
func newRecord(id uint64, kind string, args map[string]string) *JobRecord {
	pid := os.Getpid()
	start, _ := procStart(pid)
	return &JobRecord{ID: id, Kind: kind, Args: args, PID: pid, Started: time.Now().UTC(), State: StateRunning, BootID: bootID(), ProcStart: start}
}

func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// procStart reads field 22 (starttime) of /proc/<pid>/stat.
func procStart(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may contain spaces; fields after it are
	// plain.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// alive says whether the process that wrote rec still runs: same boot,
// and PID is the same process (not a reused number).
func (rec *JobRecord) alive() bool {
	if rec.PID <= 0 || rec.BootID == "" || rec.BootID != bootID() {
		return false
	}
	start, err := procStart(rec.PID)
	return err == nil && start == rec.ProcStart
}

// StateInterrupted marks a job whose daemon died before it finished.
const StateInterrupted = "interrupted"

func journalPath(sysroot string) string { return filepath.Join(store.At(sysroot).Root, journalFile) }
func lastJobPath(sysroot string) string { return filepath.Join(store.At(sysroot).Root, lastJobFile) }

func writeRecord(path string, rec *JobRecord) error {
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return fmt.Errorf("encode job record: %w", err)
	}
	if err := fsutil.MkdirAllSync(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(path, append(b, '\n'), 0o644)
}

func readRecord(path string) (*JobRecord, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(b) > 1<<20 {
		return nil, fmt.Errorf("job record %s is larger than 1 MiB", path)
	}
	var rec JobRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("parse job record %s: %w", path, err)
	}
	return &rec, nil
}

// ReadLastJob returns the record of the last finished (or interrupted) job.
func ReadLastJob(sysroot string) (*JobRecord, error) { return readRecord(lastJobPath(sysroot)) }

// ReadJournal returns the record of the job in progress (os.ErrNotExist
// when there is none).
func ReadJournal(sysroot string) (*JobRecord, error) { return readRecord(journalPath(sysroot)) }

// finishRecord moves a finished job's record to last-job.json and removes
// the journal. last-job.json is written first: a crash in between leaves a
// journal that Recover handles as an interrupted job, which is harmless.
func finishRecord(sysroot string, rec *JobRecord) error {
	if err := writeRecord(lastJobPath(sysroot), rec); err != nil {
		return err
	}
	if err := os.Remove(journalPath(sysroot)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove job journal: %w", err)
	}
	return fsutil.SyncDir(store.At(sysroot).Root)
}

// Recover cleans up after a daemon that died in the middle of a job: it
// deletes the deployment store's temporary leftovers (deploy.Cleanup),
// removes every deployment the job had created that no boot entry refers
// to yet (so no half-made upgrade is ever kept or booted), and records the
// job as interrupted in last-job.json. espDir may be "" when there is no
// ESP; then created deployments are kept unless they are not complete.
// It returns nil, nil when there was no interrupted job.
func Recover(sysroot, espDir string) (*JobRecord, error) {
	rec, err := ReadJournal(sysroot)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		// An unreadable journal is still an interrupted job: clean up what
		// can be cleaned without knowing which.
		rec = &JobRecord{Kind: "unknown", Error: err.Error()}
	}
	if rec.alive() && rec.PID != os.Getpid() {
		return nil, fmt.Errorf("%w: job %d (%s) of process %d", ErrJobRunning, rec.ID, rec.Kind, rec.PID)
	}
	removed, err := undoJob(sysroot, espDir, rec)
	rec.Recovered = append(rec.Recovered, removed...)
	if err != nil {
		return nil, fmt.Errorf("recover interrupted job %d: %w", rec.ID, err)
	}
	now := time.Now().UTC()
	rec.Finished = &now
	rec.State = StateInterrupted
	if rec.Error == "" {
		rec.Error = "berthd stopped before the job finished"
	}
	if err := finishRecord(sysroot, rec); err != nil {
		return nil, fmt.Errorf("recover interrupted job %d: %w", rec.ID, err)
	}
	return rec, nil
}

// undoJob removes what an unfinished, failed or cancelled job leaves: the
// deployment store's temporary leftovers, and every deployment the job
// made (journaled in rec.Created, or newer than rec.Args["serial-before"])
// that no boot entry refers to. Without an ESP nothing can be proven
// unreferenced, so complete deployments are kept then.
func undoJob(sysroot, espDir string, rec *JobRecord) ([]string, error) {
	l := store.At(sysroot)
	removed, err := deploy.Cleanup(l)
	if err != nil {
		return removed, err
	}
	candidates := append([]string(nil), rec.Created...)
	if rec.Kind == KindUpgrade || rec.Kind == KindSwitch {
		// Deployments newer than the job's start are the job's, journaled
		// or not (it may have died between creating one and journaling it).
		before, _ := strconv.ParseUint(rec.Args["serial-before"], 10, 64)
		deps, err := deploy.List(l)
		if err != nil {
			return removed, err
		}
		for _, d := range deps {
			if d.Serial() > before && !slices.Contains(candidates, d.ID) {
				candidates = append(candidates, d.ID)
			}
		}
	}
	if len(candidates) > 0 {
		referenced := map[string]bool{}
		if espDir != "" {
			entries, err := boot.ESP{Dir: espDir}.Entries()
			if err != nil {
				return removed, err
			}
			for _, en := range entries {
				referenced[en.ID] = true
			}
		}
		booted := deploy.BootedID(sysroot)
		for _, id := range candidates {
			if referenced[id] || id == booted || espDir == "" {
				continue
			}
			err := deploy.Remove(l, id, deploy.RemoveOptions{Booted: booted, Force: true})
			if err != nil && !errors.Is(err, deploy.ErrNotFound) {
				return removed, err
			}
			if err == nil {
				removed = append(removed, l.Deployment(id))
			}
		}
	}
	return removed, nil
}
