package api

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/introspect"
	"github.com/godbus/dbus/v5/prop"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/power"
	"github.com/berth-dev/berth/internal/store"
)

// Config configures a Server.
type Config struct {
	Conn       *dbus.Conn // the bus (system bus in berthd, a private one in tests)
	Engine     Engine
	Authorizer Authorizer // nil: BusAuthorizer on Conn
	Sysroot    string     // where the job journal lives ("/" = /berth)
	ESP        string     // for recovery; "" = boot.FoundESP(Sysroot)
	Log        *slog.Logger
	// JobLinger is how long a finished job stays on the bus so clients
	// can read its result (default 5 minutes).
	JobLinger time.Duration
	// Reboot is called after a successful job with apply=true; nil asks
	// logind over Conn.
	Reboot func() error
}

// Server is the org.berth1 service.
type Server struct {
	cfg   Config
	conn  *dbus.Conn
	log   *slog.Logger
	props *prop.Properties

	mu           sync.Mutex
	active       *Job
	jobs         map[dbus.ObjectPath]*Job
	nextID       uint64
	lastActivity time.Time
	closed       bool
}

// NewServer prepares a Server; Start exports it.
func NewServer(cfg Config) (*Server, error) {
	if cfg.Conn == nil || cfg.Engine == nil {
		return nil, errors.New("api server: need a bus connection and an engine")
	}
	if cfg.Sysroot == "" {
		cfg.Sysroot = "/"
	}
	if cfg.Authorizer == nil {
		cfg.Authorizer = &BusAuthorizer{Conn: cfg.Conn, Interactive: true}
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	if cfg.JobLinger == 0 {
		cfg.JobLinger = 5 * time.Minute
	}
	s := &Server{cfg: cfg, conn: cfg.Conn, log: cfg.Log, jobs: map[dbus.ObjectPath]*Job{}, lastActivity: time.Now()}
	if cfg.Reboot == nil {
		s.cfg.Reboot = func() error { return power.Reboot(context.Background()) }
	}
	return s, nil
}

// Start recovers from a job a previous daemon left unfinished, exports
// the objects and takes the bus name. Recovery comes first so that no
// client ever sees the leftovers.
func (s *Server) Start() error {
	rec, err := Recover(s.cfg.Sysroot, s.espDir())
	if err != nil {
		return err
	}
	if rec != nil {
		s.log.Warn("recovered from an interrupted job", "BERTH_JOB_ID", rec.ID, "BERTH_JOB_KIND", rec.Kind, "BERTH_RECOVERED", strings.Join(rec.Recovered, " "))
	}
	if last, err := ReadLastJob(s.cfg.Sysroot); err == nil {
		s.nextID = last.ID
	}

	m := &manager{s: s}
	if err := s.conn.Export(m, ManagerPath, ManagerInterface); err != nil {
		return fmt.Errorf("export %s: %w", ManagerPath, err)
	}
	if err := s.conn.Export(introspector(s.managerXML), ManagerPath, "org.freedesktop.DBus.Introspectable"); err != nil {
		return fmt.Errorf("export introspection: %w", err)
	}
	props, err := prop.Export(s.conn, ManagerPath, prop.Map{ManagerInterface: {
		"Booted":       {Value: "", Emit: prop.EmitTrue},
		"Staged":       {Value: "", Emit: prop.EmitTrue},
		"Rollback":     {Value: "", Emit: prop.EmitTrue},
		"Deployments":  {Value: []string{}, Emit: prop.EmitTrue},
		"ActiveJob":    {Value: NoJob, Emit: prop.EmitTrue},
		"TrackedImage": {Value: "", Emit: prop.EmitTrue},
	}})
	if err != nil {
		return fmt.Errorf("export properties: %w", err)
	}
	s.props = props
	s.refresh()

	reply, err := s.conn.RequestName(BusName, dbus.NameFlagDoNotQueue)
	if err != nil {
		return fmt.Errorf("request bus name %s: %w", BusName, err)
	}
	if reply != dbus.RequestNameReplyPrimaryOwner {
		return fmt.Errorf("request bus name %s: already owned by another process", BusName)
	}
	return nil
}

// Close gives up the bus name, cancels a running job and waits (up to a
// minute) for it to end and be recorded.
func (s *Server) Close() {
	s.mu.Lock()
	s.closed = true
	a := s.active
	s.mu.Unlock()
	s.conn.ReleaseName(BusName)
	if a != nil {
		a.mu.Lock()
		a.cancelled = true
		a.mu.Unlock()
		a.cancel()
		select {
		case <-a.finished:
		case <-time.After(time.Minute):
			s.log.Error("job did not stop after cancel", "BERTH_JOB", string(a.path))
		}
	}
}

// IdleFor says how long the server has had no job and no call (0 while a
// job runs).
func (s *Server) IdleFor() time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.active != nil {
		return 0
	}
	return time.Since(s.lastActivity)
}

// ActiveJob returns the running job or nil.
func (s *Server) ActiveJob() *Job {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.active
}

func (s *Server) touch() {
	s.mu.Lock()
	s.lastActivity = time.Now()
	s.mu.Unlock()
}

// refresh updates the manager properties from the engine's status.
func (s *Server) refresh() {
	h, err := s.cfg.Engine.Status()
	if err != nil {
		s.log.Error("read status", "ERROR", err.Error())
		return
	}
	id := func(e *BootEntry) string {
		if e == nil || e.Berth == nil {
			return ""
		}
		return e.Berth.ID
	}
	ids := []string{}
	for _, d := range h.Status.Berth.Deployments {
		ids = append(ids, d.ID)
	}
	tracked := ""
	if h.Spec.Image != nil {
		tracked = h.Spec.Image.Image
		if h.Spec.Image.Transport != "registry" {
			tracked = h.Spec.Image.Transport + ":" + tracked
		}
	}
	s.setProp("Booted", id(h.Status.Booted))
	s.setProp("Staged", id(h.Status.Staged))
	s.setProp("Rollback", id(h.Status.Rollback))
	s.setProp("Deployments", ids)
	s.setProp("TrackedImage", tracked)
}

// setProp sets a manager property, emitting PropertiesChanged only when
// the value changed.
func (s *Server) setProp(name string, v any) {
	cur, derr := s.props.Get(ManagerInterface, name)
	if derr == nil && fmt.Sprint(cur.Value()) == fmt.Sprint(v) {
		return
	}
	setProp(s.props, ManagerInterface, name, v)
}

// call runs the job's function; a panic in it fails the job (and is logged
// with its stack) instead of taking the daemon and every other client down.
// The job's undo below then leaves the store as it was.
func (j *Job) call(fn jobFunc, opts UpgradeOptions) (summary string, err error) {
	defer func() {
		if r := recover(); r != nil {
			j.s.log.Error("job panicked", "BERTH_JOB", string(j.path), "BERTH_JOB_KIND", j.kind,
				"PANIC", fmt.Sprint(r), "STACK", string(debug.Stack()))
			summary, err = "", fmt.Errorf("internal error in %s job (berthd logged the stack; please report it): %v", j.kind, r)
		}
	}()
	return fn(j.ctx, j, opts)
}

// setProp sets a property; prop.SetMust panics when the signal cannot be
// sent (the connection is closing), which must not kill the daemon.
func setProp(p *prop.Properties, iface, name string, v any) {
	defer func() { recover() }()
	p.SetMust(iface, name, v)
}

// status builds GetStatus's document: the engine's, plus the active job.
func (s *Server) status() (*Host, error) {
	h, err := s.cfg.Engine.Status()
	if err != nil {
		return nil, err
	}
	if j := s.ActiveJob(); j != nil {
		info := j.info()
		h.Status.Berth.ActiveJob = &info
	}
	return h, nil
}

func (s *Server) managerXML() string {
	s.mu.Lock()
	var children []string
	for p := range s.jobs {
		children = append(children, "job/"+strings.TrimPrefix(string(p), JobPathPrefix))
	}
	s.mu.Unlock()
	sort.Strings(children)
	return nodeXML(ManagerInterface, children)
}

// nodeXML renders the introspection of an object that implements iface
// (taken from InterfaceXML) and the standard interfaces.
func nodeXML(iface string, children []string) string {
	var doc introspect.Node
	if err := xml.Unmarshal([]byte(InterfaceXML), &doc); err != nil {
		panic("InterfaceXML does not parse: " + err.Error())
	}
	n := introspect.Node{Interfaces: []introspect.Interface{introspect.IntrospectData, prop.IntrospectData,
		{Name: "org.freedesktop.DBus.Peer", Methods: []introspect.Method{{Name: "Ping"}, {Name: "GetMachineId", Args: []introspect.Arg{{Name: "machine_uuid", Type: "s", Direction: "out"}}}}}}}
	for _, i := range doc.Interfaces {
		if i.Name == iface {
			n.Interfaces = append(n.Interfaces, i)
		}
	}
	for _, c := range children {
		n.Children = append(n.Children, introspect.Node{Name: c})
	}
	b, err := xml.MarshalIndent(n, "", "  ")
	if err != nil {
		panic(err)
	}
	return introspect.IntrospectDeclarationString + string(b) + "\n"
}

// introspector is an org.freedesktop.DBus.Introspectable whose XML is
// computed per call (job children come and go).
type introspector func() string

func (f introspector) Introspect() (string, *dbus.Error) { return f(), nil }

// manager is exported as org.berth1.Manager: every exported method of it
// is a D-Bus method, so it has no others.
type manager struct{ s *Server }

func (m *manager) GetStatus() (string, *dbus.Error) {
	m.s.touch()
	h, err := m.s.status()
	if err != nil {
		return "", dbus.NewError(ErrFailed, []any{err.Error()})
	}
	b, err := json.Marshal(h)
	if err != nil {
		return "", dbus.NewError(ErrFailed, []any{err.Error()})
	}
	return string(b), nil
}

func (m *manager) Upgrade(sender dbus.Sender, options map[string]dbus.Variant) (dbus.ObjectPath, *dbus.Error) {
	return m.s.startJob(string(sender), ActionUpgrade, KindUpgrade, options, map[string]string{}, func(ctx context.Context, j *Job, o UpgradeOptions) (string, error) {
		return m.s.cfg.Engine.Upgrade(ctx, j, o)
	})
}

func (m *manager) Switch(sender dbus.Sender, image string, options map[string]dbus.Variant) (dbus.ObjectPath, *dbus.Error) {
	if strings.TrimSpace(image) == "" || len(image) > 4096 || strings.ContainsAny(image, "\x00\n") {
		if err := m.s.cfg.Authorizer.Authorize(string(sender), ActionSwitch); err != nil {
			return "", err
		}
		return "", dbus.NewError(ErrInvalidArgs, []any{"switch: invalid image reference"})
	}
	return m.s.startJob(string(sender), ActionSwitch, KindSwitch, options, map[string]string{"image": image}, func(ctx context.Context, j *Job, o UpgradeOptions) (string, error) {
		return m.s.cfg.Engine.Switch(ctx, j, image, o)
	})
}

func (m *manager) Rollback(sender dbus.Sender, options map[string]dbus.Variant) (dbus.ObjectPath, *dbus.Error) {
	return m.s.startJob(string(sender), ActionRollback, KindRollback, options, map[string]string{}, func(ctx context.Context, j *Job, _ UpgradeOptions) (string, error) {
		return m.s.cfg.Engine.Rollback(ctx, j)
	})
}

func (m *manager) Cleanup(sender dbus.Sender, options map[string]dbus.Variant) (dbus.ObjectPath, *dbus.Error) {
	return m.s.startJob(string(sender), ActionCleanup, KindCleanup, options, map[string]string{}, func(ctx context.Context, j *Job, _ UpgradeOptions) (string, error) {
		return m.s.cfg.Engine.Cleanup(ctx, j)
	})
}

// Pin changes what cleanup may remove, so it needs the cleanup action.
func (m *manager) Pin(sender dbus.Sender, id string, pinned bool) *dbus.Error {
	m.s.touch()
	if err := m.s.cfg.Authorizer.Authorize(string(sender), ActionCleanup); err != nil {
		return err
	}
	if _, _, err := deploy.ParseID(id); err != nil {
		return dbus.NewError(ErrInvalidArgs, []any{err.Error()})
	}
	if err := m.s.cfg.Engine.Pin(id, pinned); err != nil {
		if errors.Is(err, deploy.ErrNotFound) {
			return dbus.NewError(ErrNotFound, []any{err.Error()})
		}
		return dbus.NewError(ErrFailed, []any{err.Error()})
	}
	m.s.log.Info("pin", "BERTH_DEPLOYMENT", id, "BERTH_PINNED", strconv.FormatBool(pinned), "BERTH_SENDER", string(sender))
	m.s.refresh()
	return nil
}

// Diff reveals which files a deployment's users changed (e.g. under
// /etc), so it is not open: it needs the local-changes action.
func (m *manager) Diff(sender dbus.Sender, id string) (string, *dbus.Error) {
	m.s.touch()
	if err := m.s.cfg.Authorizer.Authorize(string(sender), ActionLocalChanges); err != nil {
		return "", err
	}
	if id == "" {
		h, err := m.s.cfg.Engine.Status()
		if err != nil || h.Status.Booted == nil || h.Status.Booted.Berth == nil {
			return "", dbus.NewError(ErrInvalidArgs, []any{"diff: no deployment given and none is booted"})
		}
		id = h.Status.Booted.Berth.ID
	}
	if _, _, err := deploy.ParseID(id); err != nil {
		return "", dbus.NewError(ErrInvalidArgs, []any{err.Error()})
	}
	out, err := m.s.cfg.Engine.Diff(id)
	if err != nil {
		if errors.Is(err, deploy.ErrNotFound) {
			return "", dbus.NewError(ErrNotFound, []any{err.Error()})
		}
		return "", dbus.NewError(ErrFailed, []any{err.Error()})
	}
	return out, nil
}

// parseOptions reads the a{sv} of Upgrade/Switch/Rollback/Cleanup.
// Unknown keys are refused so that a typo never silently does the default.
func parseOptions(kind string, in map[string]dbus.Variant) (UpgradeOptions, error) {
	var o UpgradeOptions
	allowed := map[string]bool{}
	if kind == KindUpgrade || kind == KindSwitch {
		allowed = map[string]bool{"check": true, "apply": true, "local": true}
	}
	if kind == KindRollback {
		allowed = map[string]bool{"apply": true}
	}
	for k, v := range in {
		if !allowed[k] {
			return o, fmt.Errorf("%s: unknown option %q", kind, k)
		}
		var ok bool
		switch k {
		case "check":
			o.Check, ok = v.Value().(bool)
		case "apply":
			o.Apply, ok = v.Value().(bool)
		case "local":
			o.Local, ok = v.Value().(string)
			if ok && o.Local != "keep" && o.Local != "drop" {
				return o, fmt.Errorf("%s: option local must be \"keep\" or \"drop\", not %q", kind, o.Local)
			}
		}
		if !ok {
			return o, fmt.Errorf("%s: option %q has type %s", kind, k, v.Signature())
		}
	}
	if o.Check && o.Apply {
		return o, fmt.Errorf("%s: check and apply exclude each other", kind)
	}
	return o, nil
}

type jobFunc func(ctx context.Context, j *Job, o UpgradeOptions) (string, error)

// startJob authorizes the caller, refuses a second job, journals the new
// job, exports it and runs it.
func (s *Server) startJob(sender, action, kind string, options map[string]dbus.Variant, args map[string]string, fn jobFunc) (dbus.ObjectPath, *dbus.Error) {
	s.touch()
	if err := s.cfg.Authorizer.Authorize(sender, action); err != nil {
		s.log.Warn("access denied", "BERTH_ACTION", action, "BERTH_SENDER", sender)
		return "", err
	}
	opts, err := parseOptions(kind, options)
	if err != nil {
		return "", dbus.NewError(ErrInvalidArgs, []any{err.Error()})
	}

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return "", dbus.NewError(ErrFailed, []any{"berthd is shutting down"})
	}
	if a := s.active; a != nil {
		s.mu.Unlock()
		return "", dbus.NewError(ErrBusy, []any{fmt.Sprintf("job %s (%s) is running; wait for it or cancel it", a.path, a.kind)})
	}
	// A job the CLI runs directly (--sysroot) holds the journal too.
	if rec, err := ReadJournal(s.cfg.Sysroot); err == nil {
		if rec.alive() && rec.PID != os.Getpid() {
			s.mu.Unlock()
			return "", dbus.NewError(ErrBusy, []any{fmt.Sprintf("job %d (%s) of process %d is running; wait for it", rec.ID, rec.Kind, rec.PID)})
		}
		if _, err := Recover(s.cfg.Sysroot, s.espDir()); err != nil {
			s.mu.Unlock()
			return "", dbus.NewError(ErrFailed, []any{err.Error()})
		}
		if last, err := ReadLastJob(s.cfg.Sysroot); err == nil && last.ID > s.nextID {
			s.nextID = last.ID
		}
	}
	s.nextID++
	id := s.nextID
	ctx, cancel := context.WithCancel(context.Background())
	j := &Job{s: s, id: id, path: dbus.ObjectPath(JobPathPrefix + strconv.FormatUint(id, 10)), kind: kind, ctx: ctx, cancel: cancel, state: StateRunning}
	j.rec = newRecord(id, kind, args)
	if opts.Check {
		j.rec.Args["check"] = "true"
	}
	// The highest serial before the job: recovery removes any newer
	// deployment no boot entry refers to.
	if sb := serialBefore(s.cfg.Sysroot); sb != "" {
		j.rec.Args["serial-before"] = sb
	}
	if err := writeRecord(journalPath(s.cfg.Sysroot), j.rec); err != nil {
		s.mu.Unlock()
		cancel()
		return "", dbus.NewError(ErrFailed, []any{fmt.Sprintf("start %s job: %v", kind, err)})
	}
	s.active = j
	s.jobs[j.path] = j
	s.mu.Unlock()

	if err := j.export(); err != nil {
		s.mu.Lock()
		s.active = nil
		delete(s.jobs, j.path)
		s.mu.Unlock()
		cancel()
		finishRecord(s.cfg.Sysroot, j.rec)
		return "", dbus.NewError(ErrFailed, []any{err.Error()})
	}
	s.setProp("ActiveJob", j.path)
	s.log.Info("job started", "BERTH_JOB", string(j.path), "BERTH_JOB_KIND", kind, "BERTH_SENDER", sender)
	go j.run(fn, opts)
	return j.path, nil
}

// Job is one running or finished job.
type Job struct {
	s      *Server
	id     uint64
	path   dbus.ObjectPath
	kind   string
	ctx    context.Context
	cancel context.CancelFunc

	mu        sync.Mutex
	state     string
	summary   string
	errMsg    string
	phase     string
	done      uint64
	total     uint64
	lastEmit  time.Time
	rec       *JobRecord
	cancelled bool
	finished  chan struct{}
}

// progressValue is the Job's (stt) Progress property.
type progressValue struct {
	Phase string
	Done  uint64
	Total uint64
}

// Path returns the job's object path.
func (j *Job) Path() dbus.ObjectPath { return j.path }

func (j *Job) info() JobInfo {
	j.mu.Lock()
	defer j.mu.Unlock()
	return JobInfo{Path: string(j.path), Kind: j.kind, State: j.state, Phase: j.phase, Done: j.done, Total: j.total}
}

func (j *Job) export() error {
	j.finished = make(chan struct{})
	if err := j.s.conn.Export(&jobObject{j: j}, j.path, JobInterface); err != nil {
		return fmt.Errorf("export %s: %w", j.path, err)
	}
	if err := j.s.conn.Export(introspector(func() string { return nodeXML(JobInterface, nil) }), j.path, "org.freedesktop.DBus.Introspectable"); err != nil {
		return fmt.Errorf("export %s: %w", j.path, err)
	}
	if err := j.s.conn.Export(&jobProps{j: j}, j.path, "org.freedesktop.DBus.Properties"); err != nil {
		return fmt.Errorf("export %s properties: %w", j.path, err)
	}
	return nil
}

func (j *Job) unexport() {
	for _, iface := range []string{JobInterface, "org.freedesktop.DBus.Introspectable", "org.freedesktop.DBus.Properties"} {
		j.s.conn.Export(nil, j.path, iface)
	}
}

// Progress implements JobContext. Signals are rate-limited to ten a
// second per job, except for a new phase and a finished one.
func (j *Job) Progress(phase string, done, total uint64) {
	j.mu.Lock()
	newPhase := phase != j.phase
	j.phase, j.done, j.total = phase, done, total
	now := time.Now()
	emit := newPhase || (total > 0 && done >= total) || now.Sub(j.lastEmit) >= 100*time.Millisecond
	if emit {
		j.lastEmit = now
	}
	j.mu.Unlock()
	if emit {
		j.s.conn.Emit(j.path, JobInterface+".Progress", phase, done, total)
	}
}

// Created implements JobContext.
func (j *Job) Created(id string) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.rec.Created = append(j.rec.Created, id)
	if err := writeRecord(journalPath(j.s.cfg.Sysroot), j.rec); err != nil {
		return fmt.Errorf("journal deployment %s: %w", id, err)
	}
	return nil
}

// Wait blocks until the job finished.
func (j *Job) Wait() { <-j.finished }

func (j *Job) run(fn jobFunc, opts UpgradeOptions) {
	summary, err := j.call(fn, opts)
	state := StateDone
	msg := ""
	j.mu.Lock()
	cancelled := j.cancelled
	j.mu.Unlock()
	switch {
	case cancelled && err != nil:
		// (A cancel that came after the last cancellable step does not
		// undo a finished job: it ends done.)
		state, msg = StateCancelled, "cancelled"
		if err != nil && !errors.Is(err, context.Canceled) {
			msg = "cancelled: " + err.Error()
		}
	case err != nil:
		state, msg = StateFailed, err.Error()
	}
	j.cancel()

	var undone []string
	if state != StateDone {
		// Leave the store as before the job: nothing half-made stays.
		esp := j.s.espDir()
		j.mu.Lock()
		rec := *j.rec
		j.mu.Unlock()
		var uerr error
		undone, uerr = undoJob(j.s.cfg.Sysroot, esp, &rec)
		if uerr != nil {
			msg += fmt.Sprintf(" (and cleaning up after it failed: %v)", uerr)
		}
	}

	// Order matters: the journal is closed and the server free before
	// the job's end is visible, so a client that sees it can start the
	// next job at once.
	now := time.Now().UTC()
	j.mu.Lock()
	j.rec.State, j.rec.Summary, j.rec.Error, j.rec.Finished = state, summary, msg, &now
	j.rec.Recovered = undone
	rec := *j.rec
	j.mu.Unlock()
	if ferr := finishRecord(j.s.cfg.Sysroot, &rec); ferr != nil {
		j.s.log.Error("record finished job", "BERTH_JOB", string(j.path), "ERROR", ferr.Error())
	}
	j.s.mu.Lock()
	j.s.active = nil
	j.s.lastActivity = time.Now()
	j.s.mu.Unlock()
	j.s.setProp("ActiveJob", NoJob)
	j.s.refresh()

	j.mu.Lock()
	j.state, j.summary, j.errMsg = state, summary, msg
	j.mu.Unlock()
	j.s.conn.Emit(j.path, "org.freedesktop.DBus.Properties.PropertiesChanged", JobInterface,
		map[string]dbus.Variant{"State": dbus.MakeVariant(state), "Summary": dbus.MakeVariant(summary), "Error": dbus.MakeVariant(msg)}, []string{})
	j.s.conn.Emit(j.path, JobInterface+".Finished", state, msg)
	j.s.log.Info("job finished", "BERTH_JOB", string(j.path), "BERTH_JOB_KIND", j.kind, "BERTH_JOB_RESULT", state, "BERTH_SUMMARY", summary, "ERROR", msg)
	close(j.finished)

	if state == StateDone && opts.Apply && !opts.Check {
		j.s.log.Info("rebooting into the new deployment", "BERTH_JOB", string(j.path))
		if err := j.s.cfg.Reboot(); err != nil {
			j.s.log.Error("reboot", "ERROR", err.Error())
		}
	}
	time.AfterFunc(j.s.cfg.JobLinger, func() {
		j.s.mu.Lock()
		delete(j.s.jobs, j.path)
		j.s.mu.Unlock()
		j.unexport()
	})
}

// jobObject is exported as org.berth1.Job.
type jobObject struct{ j *Job }

var kindAction = map[string]string{KindUpgrade: ActionUpgrade, KindSwitch: ActionSwitch, KindRollback: ActionRollback, KindCleanup: ActionCleanup}

func (o *jobObject) Cancel(sender dbus.Sender) *dbus.Error {
	j := o.j
	j.s.touch()
	if err := j.s.cfg.Authorizer.Authorize(string(sender), kindAction[j.kind]); err != nil {
		return err
	}
	j.mu.Lock()
	running := j.state == StateRunning
	if running {
		j.cancelled = true
	}
	j.mu.Unlock()
	if !running {
		return dbus.NewError(ErrFailed, []any{fmt.Sprintf("job %s already finished", j.path)})
	}
	j.s.log.Info("job cancel requested", "BERTH_JOB", string(j.path), "BERTH_SENDER", string(sender))
	j.cancel()
	return nil
}

// jobProps is a job's org.freedesktop.DBus.Properties (read-only).
// Progress is a (stt) struct, which godbus's prop package cannot store.
type jobProps struct{ j *Job }

func (p *jobProps) values() map[string]dbus.Variant {
	j := p.j
	j.mu.Lock()
	defer j.mu.Unlock()
	return map[string]dbus.Variant{
		"Kind":     dbus.MakeVariant(j.kind),
		"State":    dbus.MakeVariant(j.state),
		"Progress": dbus.MakeVariant(progressValue{j.phase, j.done, j.total}),
		"Summary":  dbus.MakeVariant(j.summary),
		"Error":    dbus.MakeVariant(j.errMsg),
	}
}

func (p *jobProps) Get(iface, name string) (dbus.Variant, *dbus.Error) {
	if iface != JobInterface {
		return dbus.Variant{}, prop.ErrIfaceNotFound
	}
	v, ok := p.values()[name]
	if !ok {
		return dbus.Variant{}, prop.ErrPropNotFound
	}
	return v, nil
}

func (p *jobProps) GetAll(iface string) (map[string]dbus.Variant, *dbus.Error) {
	if iface != JobInterface {
		return nil, prop.ErrIfaceNotFound
	}
	return p.values(), nil
}

func (p *jobProps) Set(iface, name string, v dbus.Variant) *dbus.Error {
	return prop.ErrReadOnly
}

// serialBefore is the highest deployment serial now ("" when there is
// none): recovery removes newer deployments that no boot entry refers to.
func serialBefore(sysroot string) string {
	deps, err := deploy.List(store.At(sysroot))
	if err != nil || len(deps) == 0 {
		return ""
	}
	return strconv.FormatUint(deps[len(deps)-1].Serial(), 10)
}

func (s *Server) espDir() string {
	if s.cfg.ESP != "" {
		return s.cfg.ESP
	}
	return boot.FoundESP(s.cfg.Sysroot)
}
