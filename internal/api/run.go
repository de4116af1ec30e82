package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/power"
	"github.com/berth-dev/berth/internal/progress"
)

// Request is a job the CLI asks for.
type Request struct {
	Kind    string // KindUpgrade, KindSwitch, KindRollback, KindCleanup
	Ref     string // image for KindSwitch
	Options UpgradeOptions
	// Direct runs the job in this process on Sysroot instead of asking
	// berthd (the CLI's --sysroot). Without it, berthd is used when it is
	// on the bus, and the job runs in this process otherwise.
	Direct  bool
	Sysroot string
	ESP     string
	Address string // bus address; "" = the system bus
}

// How reports where a job ran.
const (
	ViaDaemon = "berthd"
	ViaDirect = "direct"
)

// RunJob runs req through berthd or directly, showing progress on rep.
// Cancelling ctx (Ctrl-C) cancels the job. It returns how the job ended;
// a job that did not end done is also an error.
func RunJob(ctx context.Context, req Request, rep *progress.Reporter) (*JobResult, string, error) {
	if !req.Direct {
		c, err := Connect(req.Address)
		if err == nil {
			defer c.Close()
			res, err := runViaDaemon(ctx, c, req, rep)
			return res, ViaDaemon, err
		}
		if !errors.Is(err, ErrNoDaemon) {
			return nil, ViaDaemon, err
		}
	}
	res, err := runDirect(ctx, req, rep)
	return res, ViaDirect, err
}

func requestOptions(req Request) map[string]dbus.Variant {
	o := map[string]dbus.Variant{}
	if req.Options.Check {
		o["check"] = dbus.MakeVariant(true)
	}
	if req.Options.Apply {
		o["apply"] = dbus.MakeVariant(true)
	}
	if req.Options.Local != "" {
		o["local"] = dbus.MakeVariant(req.Options.Local)
	}
	return o
}

func runViaDaemon(ctx context.Context, c *Client, req Request, rep *progress.Reporter) (*JobResult, error) {
	var job dbus.ObjectPath
	var err error
	opts := requestOptions(req)
	switch req.Kind {
	case KindUpgrade:
		job, err = c.Upgrade(opts)
	case KindSwitch:
		job, err = c.Switch(req.Ref, opts)
	case KindRollback:
		job, err = c.Rollback(opts)
	case KindCleanup:
		job, err = c.Cleanup(opts)
	default:
		return nil, fmt.Errorf("unknown job kind %q", req.Kind)
	}
	if err != nil {
		var de dbus.Error
		if errors.As(err, &de) && len(de.Body) > 0 {
			return nil, fmt.Errorf("%s: %v (%s)", req.Kind, de.Body[0], de.Name)
		}
		return nil, fmt.Errorf("%s: %w", req.Kind, err)
	}
	pp := newProgressPrinter(rep)
	defer pp.finish(nil)
	res, err := c.Wait(ctx, job, pp.update)
	if ctx.Err() != nil {
		// Interrupted: cancel the job and wait for it to end consistently.
		rep.Message("cancelling %s ...", job)
		if cerr := c.Cancel(job); cerr != nil {
			return nil, fmt.Errorf("cancel %s: %w", job, cerr)
		}
		wctx, stop := context.WithTimeout(context.Background(), 10*time.Minute)
		defer stop()
		res, err = c.Wait(wctx, job, pp.update)
	}
	if err != nil {
		return nil, err
	}
	return res, res.err(req.Kind)
}

func (r *JobResult) err(kind string) error {
	switch r.State {
	case StateDone:
		return nil
	case StateCancelled:
		return fmt.Errorf("%s cancelled: %s", kind, r.Error)
	}
	return fmt.Errorf("%s failed: %s", kind, r.Error)
}

// localJob is the JobContext of a job run in the CLI's process.
type localJob struct {
	sysroot string
	pp      *progressPrinter
	mu      sync.Mutex
	rec     *JobRecord
}

func (j *localJob) Progress(phase string, done, total uint64) { j.pp.update(phase, done, total) }

func (j *localJob) Created(id string) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.rec.Created = append(j.rec.Created, id)
	return writeRecord(journalPath(j.sysroot), j.rec)
}

// runDirect runs a job in this process with the same journal, recovery
// and undo as berthd, so an interrupted CLI leaves nothing half-made.
func runDirect(ctx context.Context, req Request, rep *progress.Reporter) (*JobResult, error) {
	sysroot := req.Sysroot
	if sysroot == "" {
		sysroot = "/"
	}
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("%s: berthd is not available and running it directly needs root", req.Kind)
	}
	esp := req.ESP
	if esp == "" {
		esp = boot.FoundESP(sysroot)
	}
	if rec, err := Recover(sysroot, esp); err != nil {
		return nil, err
	} else if rec != nil {
		rep.Message("cleaned up after an interrupted %s job: removed %s", rec.Kind, strings.Join(rec.Recovered, ", "))
	}
	if j, err := ReadJournal(sysroot); err == nil {
		return nil, fmt.Errorf("%s: job %d (%s) of process %d is running", req.Kind, j.ID, j.Kind, j.PID)
	}
	var id uint64 = 1
	if last, err := ReadLastJob(sysroot); err == nil {
		id = last.ID + 1
	}
	e := &SysrootEngine{Sysroot: sysroot, ESP: req.ESP}
	rec := newRecord(id, req.Kind, map[string]string{})
	if req.Ref != "" {
		rec.Args["image"] = req.Ref
	}
	if sb := serialBefore(sysroot); sb != "" {
		rec.Args["serial-before"] = sb
	}
	if err := writeRecord(journalPath(sysroot), rec); err != nil {
		return nil, err
	}
	job := &localJob{sysroot: sysroot, pp: newProgressPrinter(rep), rec: rec}
	var summary string
	var err error
	switch req.Kind {
	case KindUpgrade:
		summary, err = e.Upgrade(ctx, job, req.Options)
	case KindSwitch:
		summary, err = e.Switch(ctx, job, req.Ref, req.Options)
	case KindRollback:
		summary, err = e.Rollback(ctx, job)
	case KindCleanup:
		summary, err = e.Cleanup(ctx, job)
	default:
		err = fmt.Errorf("unknown job kind %q", req.Kind)
	}
	job.pp.finish(err)
	res := &JobResult{State: StateDone, Summary: summary}
	if err != nil {
		res.State, res.Error = StateFailed, err.Error()
		if ctx.Err() != nil {
			res.State = StateCancelled
		}
		job.mu.Lock()
		r := *rec
		job.mu.Unlock()
		undone, uerr := undoJob(sysroot, esp, &r)
		rec.Recovered = undone
		if uerr != nil {
			res.Error += fmt.Sprintf(" (and cleaning up after it failed: %v)", uerr)
		}
	}
	now := time.Now().UTC()
	rec.State, rec.Summary, rec.Error, rec.Finished = res.State, res.Summary, res.Error, &now
	if ferr := finishRecord(sysroot, rec); ferr != nil {
		return res, ferr
	}
	if res.State == StateDone && req.Options.Apply && !req.Options.Check {
		if err := power.Reboot(context.Background()); err != nil {
			return res, fmt.Errorf("%s done, but reboot failed: %w", req.Kind, err)
		}
	}
	return res, res.err(req.Kind)
}

// progressPrinter turns job progress (phase, done, total) into tasks of
// a progress.Reporter: one task per phase.
type progressPrinter struct {
	rep   *progress.Reporter
	mu    sync.Mutex
	phase string
	task  *progress.Task
	done  uint64
}

func newProgressPrinter(rep *progress.Reporter) *progressPrinter {
	if rep == nil {
		rep = progress.Discard()
	}
	return &progressPrinter{rep: rep}
}

func (p *progressPrinter) update(phase string, done, total uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if phase != p.phase || p.task == nil {
		if p.task != nil {
			p.task.Done(nil, "")
		}
		p.phase, p.done = phase, 0
		p.task = p.rep.Start(phase, int64(total))
	}
	if done > p.done {
		p.task.Add(int64(done - p.done))
		p.done = done
	}
}

func (p *progressPrinter) finish(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.task != nil {
		p.task.Done(err, "")
		p.task = nil
	}
}

// WriteText prints the status for people.
func (h *Host) WriteText(w io.Writer) {
	line := func(role string, e *BootEntry, note string) {
		if e == nil || e.Berth == nil {
			fmt.Fprintf(w, "%-9s -\n", role+":")
			return
		}
		d := e.Berth
		fmt.Fprintf(w, "%-9s %s  %s\n", role+":", d.ID, d.ImageRef)
		fmt.Fprintf(w, "          image %s, composefs %s\n", short(d.ManifestDigest), short(d.ComposefsDigest))
		extra := []string{"kernel " + d.Kernel, "local " + d.LocalMode, "state " + d.State}
		if d.Pinned {
			extra = append(extra, "pinned")
		}
		if be := d.BootEntry; be != nil {
			s := "entry " + be.State
			if be.TriesLeft > 0 || be.TriesDone > 0 {
				s += fmt.Sprintf(" (%d tries left, %d done)", be.TriesLeft, be.TriesDone)
			}
			extra = append(extra, s)
		} else if h.Status.Berth.ESP != "" {
			extra = append(extra, "no boot entry")
		}
		fmt.Fprintf(w, "          %s%s\n", strings.Join(extra, ", "), note)
		if len(d.Conflicts) > 0 {
			fmt.Fprintf(w, "          /etc merge conflicts (local version kept, the image's beside it as .berth-new): %s\n", strings.Join(d.Conflicts, " "))
		}
		if len(d.LocalAside) > 0 {
			fmt.Fprintf(w, "          local changes kept aside (the image changed them too; in /berth/deploy/%s/local-aside): %s\n", d.ID, strings.Join(d.LocalAside, " "))
		}
	}
	line("Booted", h.Status.Booted, "")
	line("Staged", h.Status.Staged, "  (next boot)")
	queued := ""
	if h.Status.RollbackQueued {
		queued = "  (queued: next boot)"
	}
	line("Rollback", h.Status.Rollback, queued)
	shown := map[string]bool{}
	for _, e := range []*BootEntry{h.Status.Booted, h.Status.Staged, h.Status.Rollback} {
		if e != nil && e.Berth != nil {
			shown[e.Berth.ID] = true
		}
	}
	for _, d := range h.Status.Berth.Deployments {
		if !shown[d.ID] {
			fmt.Fprintf(w, "Other:    %s  %s  (%s)\n", d.ID, d.ImageRef, d.State)
		}
	}
	if j := h.Status.Berth.ActiveJob; j != nil {
		fmt.Fprintf(w, "Job:      %s %s: %s", j.Path, j.Kind, j.Phase)
		if j.Total > 0 {
			fmt.Fprintf(w, " %d/%d", j.Done, j.Total)
		}
		fmt.Fprintln(w)
	}
	if j := h.Status.Berth.LastJob; j != nil {
		fmt.Fprintf(w, "Last job: %s #%d %s", j.Kind, j.ID, j.State)
		if j.Finished != nil {
			fmt.Fprintf(w, " at %s", j.Finished.Local().Format(time.DateTime))
		}
		if j.Error != "" {
			fmt.Fprintf(w, ": %s", j.Error)
		} else if j.Summary != "" {
			fmt.Fprintf(w, ": %s", j.Summary)
		}
		fmt.Fprintln(w)
	}
	for _, n := range h.Status.Berth.Notes {
		fmt.Fprintf(w, "Note:     %s\n", n)
	}
}

func short(d string) string {
	d = strings.TrimPrefix(d, "sha256:")
	if len(d) > 12 {
		return d[:12]
	}
	if d == "" {
		return "-"
	}
	return d
}

// StatusAuto returns the status from berthd when it is on the bus (and
// direct is false), else read from the disk below sysroot.
func StatusAuto(sysroot string, direct bool, address string) (*Host, []byte, string, error) {
	if !direct {
		c, err := Connect(address)
		if err == nil {
			defer c.Close()
			h, raw, err := c.Status()
			return h, raw, ViaDaemon, err
		}
		if !errors.Is(err, ErrNoDaemon) {
			return nil, nil, ViaDaemon, err
		}
	}
	h, err := ReadStatus(StatusOptions{Sysroot: sysroot})
	if err != nil {
		return nil, nil, ViaDirect, err
	}
	raw, err := json.Marshal(h)
	return h, raw, ViaDirect, err
}

// AutoUpdateFile holds the AutomaticUpdatePolicy of berth-upgrade.service.
const AutoUpdateFile = "/etc/berth/auto-update"

// Automatic update policies.
const (
	AutoNone  = "none"
	AutoCheck = "check"
	AutoStage = "stage"
	AutoApply = "apply"
)

// ReadAutoUpdatePolicy reads the policy from file: "AutomaticUpdatePolicy=
// stage" (or the bare word) on a line; "#" starts a comment. A missing
// file means none.
func ReadAutoUpdatePolicy(file string) (string, error) {
	b, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return AutoNone, nil
	}
	if err != nil {
		return "", err
	}
	policy := AutoNone
	for _, line := range strings.Split(string(b), "\n") {
		line, _, _ = strings.Cut(line, "#")
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		if k, v, ok := strings.Cut(line, "="); ok {
			if strings.TrimSpace(k) != "AutomaticUpdatePolicy" {
				return "", fmt.Errorf("%s: unknown setting %q", file, strings.TrimSpace(k))
			}
			line = strings.TrimSpace(v)
		}
		switch line {
		case AutoNone, AutoCheck, AutoStage, AutoApply:
			policy = line
		default:
			return "", fmt.Errorf("%s: unknown AutomaticUpdatePolicy %q (none, check, stage, apply)", file, line)
		}
	}
	return policy, nil
}

// ApplyAutoPolicy turns a policy into upgrade options; ok is false for none.
func ApplyAutoPolicy(policy string) (o UpgradeOptions, ok bool) {
	switch policy {
	case AutoCheck:
		return UpgradeOptions{Check: true}, true
	case AutoStage:
		return UpgradeOptions{}, true
	case AutoApply:
		return UpgradeOptions{Apply: true}, true
	}
	return UpgradeOptions{}, false
}
