package api

import (
	"bufio"
	"context"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/introspect"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/fsck"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/testenv"
)

// Roles of a re-executed test binary (see TestMain).
const (
	roleEnv    = "BERTH_API_TEST_ROLE"
	addrEnv    = "BERTH_API_TEST_ADDR"
	sysrootEnv = "BERTH_API_TEST_SYSROOT"
	blockEnv   = "BERTH_API_TEST_BLOCK"
	jobEnv     = "BERTH_API_TEST_JOB"
)

func TestMain(m *testing.M) {
	switch os.Getenv(roleEnv) {
	case "daemon":
		os.Exit(runChildDaemon())
	case "client":
		os.Exit(runUnprivilegedClient())
	}
	os.Exit(m.Run())
}

func needRoot(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t, "runs a private dbus-daemon with berth's system bus policy and clients under other uids")
	testenv.RequireTool(t, "dbus-daemon", "dbus")
}

// sharedDir makes a directory that an unprivileged uid can traverse and
// read (t.TempDir is 0700).
func sharedDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "berth-api-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(d, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// testBus is a private dbus-daemon configured like the system bus, with
// berth's own policy file data/dbus/org.berth1.conf included.
type testBus struct {
	dir  string
	addr string
}

func startBus(t *testing.T, extraPolicy string) *testBus {
	t.Helper()
	dir := sharedDir(t)
	policy, err := filepath.Abs("../../data/dbus/org.berth1.conf")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(policy); err != nil {
		t.Fatal(err)
	}
	// The default policy is the one of dbus's system.conf: nobody owns
	// names, method calls are denied unless a service's policy allows them.
	conf := fmt.Sprintf(`<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=%s/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  %s
  <include>%s</include>
</busconfig>
`, dir, extraPolicy, policy)
	cfg := filepath.Join(dir, "bus.conf")
	if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("dbus-daemon", "--config-file="+cfg, "--print-address", "--nofork", "--nopidfile")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("dbus-daemon did not print its address: %v", err)
	}
	if err := os.Chmod(filepath.Join(dir, "bus"), 0o777); err != nil {
		t.Fatal(err)
	}
	return &testBus{dir: dir, addr: strings.TrimSpace(line)}
}

func (b *testBus) conn(t *testing.T) *dbus.Conn {
	t.Helper()
	c, err := dbus.Connect(b.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// testEngine stands in for the real engine where a job must block or
// progress deterministically (a real upgrade needs an image with a kernel
// and a boot entry step that does not exist yet). It changes the store
// through the real deploy package, so that cancel and crash recovery are
// checked against real leftovers: a half-written deploy/.tmp-* directory
// and a complete deployment no boot entry refers to.
type testEngine struct {
	sysroot string
	gate    chan struct{} // Upgrade blocks until it is closed or the job is cancelled
	journal bool          // journal the created deployment (job.Created)
}

func (e *testEngine) Status() (*Host, error) { return ReadStatus(StatusOptions{Sysroot: e.sysroot}) }

func (e *testEngine) Upgrade(ctx context.Context, job JobContext, _ UpgradeOptions) (string, error) {
	job.Progress("import", 1, 3)
	l := store.At(e.sysroot)
	d, err := createDeployment(l, fmt.Sprintf("content %d", time.Now().UnixNano()))
	if err != nil {
		return "", err
	}
	// What an interrupted deploy.Create leaves (after Create, which
	// clears such leftovers itself when it starts).
	if err := os.MkdirAll(filepath.Join(l.Deployments(), ".tmp-99-0123456789ab-1", "upper", "etc"), 0o755); err != nil {
		return "", err
	}
	if e.journal {
		if err := job.Created(d.ID); err != nil {
			return "", err
		}
	}
	job.Progress("blocked", 2, 3)
	select {
	case <-e.gate:
	case <-ctx.Done():
		return "", ctx.Err()
	}
	job.Progress("finish", 3, 3)
	return "staged " + d.ID, nil
}

func (e *testEngine) Switch(ctx context.Context, job JobContext, ref string, o UpgradeOptions) (string, error) {
	return e.Upgrade(ctx, job, o)
}
func (e *testEngine) Rollback(ctx context.Context, job JobContext) (string, error) {
	return "", fmt.Errorf("test engine: rollback: %w", ErrNotImplemented)
}
func (e *testEngine) Cleanup(ctx context.Context, job JobContext) (string, error) {
	return "", fmt.Errorf("test engine: cleanup: %w", ErrNotImplemented)
}
func (e *testEngine) Pin(id string, pinned bool) error {
	_, err := deploy.SetPinned(store.At(e.sysroot), id, pinned)
	return err
}
func (e *testEngine) Diff(id string) (string, error) { return "{}", nil }

// createDeployment makes a real, complete deployment of a tiny tree.
func createDeployment(l store.Layout, content string) (*deploy.Deployment, error) {
	if err := l.Init(); err != nil {
		return nil, err
	}
	objs, err := composefs.OpenStore(l.Objects(), fsverity.SHA256)
	if err != nil {
		return nil, err
	}
	root := composefs.NewDir(0o755)
	etc := composefs.NewDir(0o755)
	root.Children["etc"] = etc
	etc.Children["hostname"] = &composefs.Inode{Mode: composefs.SIFREG | 0o644, Inline: []byte(content), Size: uint64(len(content))}
	etc.Children["motd"] = &composefs.Inode{Mode: composefs.SIFREG | 0o644, Inline: []byte("hi\n"), Size: 3}
	res, err := deploy.Create(l, deploy.CreateOptions{Tree: root, Store: objs, Kernel: "6.12.0-test", ImageRef: "docker://example.org/os:1", ManifestDigest: "sha256:" + strings.Repeat("ab", 32), Origin: "upgrade"})
	if err != nil {
		return nil, err
	}
	return res.Deployment, nil
}

// newSysroot makes a sysroot with an (empty) ESP at efi/.
func newSysroot(t *testing.T) string {
	t.Helper()
	s := sharedDir(t)
	if err := os.MkdirAll(filepath.Join(s, "efi", "loader"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := store.At(s).Init(); err != nil {
		t.Fatal(err)
	}
	return s
}

func startServer(t *testing.T, bus *testBus, e Engine, sysroot string) *Server {
	t.Helper()
	s, err := NewServer(Config{Conn: bus.conn(t), Engine: e, Sysroot: sysroot, Log: slog.New(slog.NewTextHandler(io.Discard, nil)), JobLinger: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

func dbusErrName(err error) string {
	if err == nil {
		return ""
	}
	if de, ok := err.(dbus.Error); ok {
		return de.Name
	}
	if de, ok := err.(*dbus.Error); ok {
		return de.Name
	}
	return "non-dbus: " + err.Error()
}

// waitPhase reads job signals until the job reports phase.
func waitPhase(t *testing.T, ch chan *dbus.Signal, job dbus.ObjectPath, phase string) {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case sig := <-ch:
			if sig.Path == job && sig.Name == JobInterface+".Progress" && sig.Body[0].(string) == phase {
				return
			}
			if sig.Path == job && sig.Name == JobInterface+".Finished" {
				t.Fatalf("job %s finished (%v) before phase %q", job, sig.Body, phase)
			}
		case <-timeout:
			t.Fatalf("job %s never reached phase %q", job, phase)
		}
	}
}

func TestRootUpgradeBusyCancel(t *testing.T) {
	needRoot(t)
	bus := startBus(t, "")
	sysroot := newSysroot(t)
	eng := &testEngine{sysroot: sysroot, gate: make(chan struct{}), journal: true}
	srv := startServer(t, bus, eng, sysroot)
	c, err := Connect(bus.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	l := store.At(sysroot)

	job, err := c.Upgrade(nil)
	if err != nil {
		t.Fatalf("root Upgrade: %v", err)
	}
	if !strings.HasPrefix(string(job), JobPathPrefix) {
		t.Fatalf("job path %q", job)
	}
	waitPhase(t, c.signals, job, "blocked")

	// A second mutating call while the job runs: Busy, naming the job.
	_, err = c.Upgrade(nil)
	if dbusErrName(err) != ErrBusy || !strings.Contains(err.Error(), string(job)) {
		t.Fatalf("second Upgrade: got %v, want %s naming %s", err, ErrBusy, job)
	}
	if _, err := c.Switch("docker://example.org/other:1", nil); dbusErrName(err) != ErrBusy {
		t.Fatalf("Switch during a job: got %v, want %s", err, ErrBusy)
	}
	v, err := c.conn.Object(BusName, ManagerPath).GetProperty(ManagerInterface + ".ActiveJob")
	if err != nil || v.Value().(dbus.ObjectPath) != job {
		t.Fatalf("ActiveJob = %v, %v; want %s", v, err, job)
	}
	h, _, err := c.Status()
	if err != nil || h.Status.Berth.ActiveJob == nil || h.Status.Berth.ActiveJob.Path != string(job) || h.Status.Berth.ActiveJob.Phase != "blocked" {
		t.Fatalf("GetStatus during the job: %+v, %v", h.Status.Berth.ActiveJob, err)
	}
	if rec, err := ReadJournal(sysroot); err != nil || rec.Kind != KindUpgrade || len(rec.Created) != 1 {
		t.Fatalf("journal during the job: %+v, %v", rec, err)
	}
	if deps, _ := deploy.List(l); len(deps) != 1 {
		t.Fatalf("the job's deployment is not there: %d deployments", len(deps))
	}

	// Cancel: the job ends cancelled and the store is as before it.
	if err := c.Cancel(job); err != nil {
		t.Fatalf("Cancel: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := c.Wait(ctx, job, nil)
	if err != nil || res.State != StateCancelled {
		t.Fatalf("after Cancel: %+v, %v", res, err)
	}
	if deps, err := deploy.List(l); err != nil || len(deps) != 0 {
		t.Fatalf("after Cancel: %d deployments (%v), want none", len(deps), err)
	}
	assertNoLeftovers(t, l)
	if _, err := ReadJournal(sysroot); !os.IsNotExist(err) {
		t.Fatalf("journal still there after the job: %v", err)
	}
	last, err := ReadLastJob(sysroot)
	if err != nil || last.State != StateCancelled || len(last.Recovered) == 0 {
		t.Fatalf("last job record: %+v, %v", last, err)
	}
	if srv.ActiveJob() != nil {
		t.Fatal("server still has an active job")
	}

	// Now a job that runs through: Progress and Finished arrive, the
	// Deployments property changes.
	close(eng.gate)
	job2, err := c.Upgrade(map[string]dbus.Variant{"local": dbus.MakeVariant("keep")})
	if err != nil {
		t.Fatal(err)
	}
	if job2 == job {
		t.Fatalf("job path reused: %s", job2)
	}
	var phases []string
	res, err = c.Wait(ctx, job2, func(p string, d, tot uint64) { phases = append(phases, p) })
	if err != nil || res.State != StateDone || !strings.HasPrefix(res.Summary, "staged ") {
		t.Fatalf("second job: %+v, %v", res, err)
	}
	if strings.Join(phases, ",") != "import,blocked,finish" && strings.Join(phases, ",") != "blocked,finish" {
		t.Fatalf("progress phases %v", phases)
	}
	deps, _ := deploy.List(l)
	v, err = c.conn.Object(BusName, ManagerPath).GetProperty(ManagerInterface + ".Deployments")
	if err != nil || len(deps) != 1 || fmt.Sprint(v.Value()) != fmt.Sprint([]string{deps[0].ID}) {
		t.Fatalf("Deployments property %v (%v), deployments %d", v, err, len(deps))
	}

	// Bad options are refused before anything starts.
	if _, err := c.Upgrade(map[string]dbus.Variant{"frobnicate": dbus.MakeVariant(true)}); dbusErrName(err) != ErrInvalidArgs {
		t.Fatalf("unknown option: %v", err)
	}
}

func assertNoLeftovers(t *testing.T, l store.Layout) {
	t.Helper()
	ents, err := os.ReadDir(l.Deployments())
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".tmp-") || strings.HasPrefix(e.Name(), ".rm-") {
			t.Errorf("leftover %s", e.Name())
		}
	}
}

// mutatingCalls are every method an unprivileged caller must be refused.
var mutatingCalls = []struct {
	name string
	args []any
}{
	{"Upgrade", []any{map[string]dbus.Variant{}}},
	{"Switch", []any{"docker://example.org/evil:1", map[string]dbus.Variant{}}},
	{"Rollback", []any{map[string]dbus.Variant{}}},
	{"Cleanup", []any{map[string]dbus.Variant{}}},
	{"Pin", []any{"1-0123456789ab", true}},
	{"Diff", []any{"1-0123456789ab"}},
	{"Reset", []any{[]string{"/etc/hostname"}, map[string]dbus.Variant{}}},
}

// runUnprivilegedClient runs as uid 65534: it calls every mutating method
// and the open ones and prints the error names as JSON.
func runUnprivilegedClient() int {
	c, err := dbus.Connect(os.Getenv(addrEnv))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	out := map[string]string{"uid": fmt.Sprint(os.Getuid())}
	m := c.Object(BusName, ManagerPath)
	for _, mc := range mutatingCalls {
		out[mc.name] = dbusErrName(m.Call(ManagerInterface+"."+mc.name, 0, mc.args...).Err)
	}
	out["Cancel"] = dbusErrName(c.Object(BusName, dbus.ObjectPath(os.Getenv(jobEnv))).Call(JobInterface+".Cancel", 0).Err)
	var status string
	out["GetStatus"] = dbusErrName(m.Call(ManagerInterface+".GetStatus", 0).Store(&status))
	var h Host
	if json.Unmarshal([]byte(status), &h) != nil || h.Kind != StatusKind {
		out["GetStatus"] = "unparsable status"
	}
	var props map[string]dbus.Variant
	out["GetAll"] = dbusErrName(m.Call("org.freedesktop.DBus.Properties.GetAll", 0, ManagerInterface).Store(&props))
	if len(props) != 6 {
		out["GetAll"] = fmt.Sprintf("%d properties", len(props))
	}
	var jobProps map[string]dbus.Variant
	out["JobGetAll"] = dbusErrName(c.Object(BusName, dbus.ObjectPath(os.Getenv(jobEnv))).Call("org.freedesktop.DBus.Properties.GetAll", 0, JobInterface).Store(&jobProps))
	var x string
	out["Introspect"] = dbusErrName(m.Call("org.freedesktop.DBus.Introspectable.Introspect", 0).Store(&x))
	json.NewEncoder(os.Stdout).Encode(out)
	return 0
}

// selfCopy copies the test binary where uid 65534 can execute it.
func selfCopy(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(sharedDir(t), "api.test")
	if err := os.WriteFile(p, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestUnprivilegedCallerDenied(t *testing.T) {
	needRoot(t)
	bus := startBus(t, "")
	sysroot := newSysroot(t)
	eng := &testEngine{sysroot: sysroot, gate: make(chan struct{})}
	startServer(t, bus, eng, sysroot)
	c, err := Connect(bus.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	job, err := c.Upgrade(nil)
	if err != nil {
		t.Fatal(err)
	}
	waitPhase(t, c.signals, job, "blocked")

	cmd := exec.Command(selfCopy(t), "-test.run=^$")
	cmd.Env = append(os.Environ(), roleEnv+"=client", addrEnv+"="+bus.addr, jobEnv+"="+string(job))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("unprivileged client: %v", err)
	}
	var got map[string]string
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("client output %q: %v", out, err)
	}
	if got["uid"] != "65534" {
		t.Fatalf("client ran as uid %s", got["uid"])
	}
	for _, name := range []string{"Upgrade", "Switch", "Rollback", "Cleanup", "Pin", "Diff", "Reset", "Cancel"} {
		if got[name] != ErrAccessDenied {
			t.Errorf("unprivileged %s: got %q, want %s", name, got[name], ErrAccessDenied)
		}
	}
	for _, name := range []string{"GetStatus", "GetAll", "JobGetAll", "Introspect"} {
		if got[name] != "" {
			t.Errorf("unprivileged %s: got %q, want success", name, got[name])
		}
	}
	// The denied Cancel did not cancel: the job still runs.
	if r, err := c.jobResult(job); err != nil || r != nil {
		t.Fatalf("job after denied Cancel: %+v, %v", r, err)
	}
	close(eng.gate)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if res, err := c.Wait(ctx, job, nil); err != nil || res.State != StateDone {
		t.Fatalf("job: %+v, %v", res, err)
	}
}

// runChildDaemon is berthd with the test engine, for the SIGKILL test.
func runChildDaemon() int {
	conn, err := dbus.Connect(os.Getenv(addrEnv))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	sysroot := os.Getenv(sysrootEnv)
	eng := &testEngine{sysroot: sysroot, gate: make(chan struct{})}
	if os.Getenv(blockEnv) == "" {
		close(eng.gate)
	}
	s, err := NewServer(Config{Conn: conn, Engine: eng, Sysroot: sysroot})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if err := s.Start(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	fmt.Println("ready")
	select {}
}

func startChildDaemon(t *testing.T, bus *testBus, sysroot string, block bool) *exec.Cmd {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), roleEnv+"=daemon", addrEnv+"="+bus.addr, sysrootEnv+"="+sysroot)
	if block {
		cmd.Env = append(cmd.Env, blockEnv+"=1")
	}
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "ready\n" {
		t.Fatalf("child daemon: %q, %v", line, err)
	}
	return cmd
}

func TestKilledDaemonRecovers(t *testing.T) {
	needRoot(t)
	bus := startBus(t, "")
	sysroot := newSysroot(t)
	l := store.At(sysroot)
	// One deployment from before, which recovery must keep.
	old, err := createDeployment(l, "old")
	if err != nil {
		t.Fatal(err)
	}

	d1 := startChildDaemon(t, bus, sysroot, true)
	c, err := Connect(bus.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	job, err := c.Upgrade(nil)
	if err != nil {
		t.Fatal(err)
	}
	waitPhase(t, c.signals, job, "blocked")
	// Mid-job: a half-written deployment directory and a complete but
	// unreferenced (and, in this engine, unjournaled) deployment exist.
	deps, err := deploy.List(l)
	if err != nil || len(deps) != 2 {
		t.Fatalf("mid-job: %d deployments, %v", len(deps), err)
	}
	if err := d1.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	d1.Wait()
	if _, err := ReadJournal(sysroot); err != nil {
		t.Fatalf("journal after SIGKILL: %v", err)
	}

	// Restart: recovery runs before the name is taken.
	startChildDaemon(t, bus, sysroot, false)
	deps, err = deploy.List(l)
	if err != nil || len(deps) != 1 || deps[0].ID != old.ID {
		t.Fatalf("after recovery: %v deployments, %v; want only %s", deps, err, old.ID)
	}
	assertNoLeftovers(t, l)
	if rep, err := fsck.Check(fsck.Options{Sysroot: sysroot}); err != nil || !rep.OK() {
		t.Fatalf("fsck after recovery: %+v, %v", rep, err)
	}
	last, err := ReadLastJob(sysroot)
	if err != nil || last.State != StateInterrupted || last.Kind != KindUpgrade || len(last.Recovered) != 2 {
		t.Fatalf("last job after recovery: %+v, %v", last, err)
	}
	h, _, err := c.Status()
	if err != nil || h.Status.Berth.LastJob == nil || h.Status.Berth.LastJob.State != StateInterrupted {
		t.Fatalf("status after recovery: %+v, %v", h.Status.Berth.LastJob, err)
	}
	// The upgrade can be run again to success, with a new job number.
	job2, err := c.Upgrade(nil)
	if err != nil {
		t.Fatal(err)
	}
	if job2 == job {
		t.Fatalf("job path %s reused after restart", job2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if res, err := c.Wait(ctx, job2, nil); err != nil || res.State != StateDone {
		t.Fatalf("rerun: %+v, %v", res, err)
	}
}

// fakePolkit answers CheckAuthorization: it allows only the upgrade
// action, and records the subjects it was asked about. polkitd itself is
// not on this host's test bus; this checks berthd's side of the protocol.
type fakePolkit struct{ subjects chan polkitSubject }

func (f *fakePolkit) CheckAuthorization(subject polkitSubject, action string, details map[string]string, flags uint32, cancelID string) (polkitResult, *dbus.Error) {
	f.subjects <- subject
	return polkitResult{IsAuthorized: action == ActionUpgrade, Details: map[string]string{}}, nil
}

func TestPolkitDecides(t *testing.T) {
	needRoot(t)
	bus := startBus(t, `<policy user="root"><allow own="org.freedesktop.PolicyKit1"/><allow send_destination="org.freedesktop.PolicyKit1"/></policy>`)
	pk := bus.conn(t)
	fp := &fakePolkit{subjects: make(chan polkitSubject, 16)}
	if err := pk.Export(fp, polkitPath, "org.freedesktop.PolicyKit1.Authority"); err != nil {
		t.Fatal(err)
	}
	if r, err := pk.RequestName(polkitName, dbus.NameFlagDoNotQueue); err != nil || r != dbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("own polkit name: %v %v", r, err)
	}
	sysroot := newSysroot(t)
	eng := &testEngine{sysroot: sysroot, gate: make(chan struct{})}
	close(eng.gate)
	startServer(t, bus, eng, sysroot)
	c, err := Connect(bus.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Root is refused when polkit says no: polkit, not the uid, decides.
	if _, err := c.Rollback(nil); dbusErrName(err) != ErrAccessDenied {
		t.Fatalf("Rollback refused by polkit: got %v", err)
	}
	sub := <-fp.subjects
	if sub.Kind != "system-bus-name" || sub.Details["name"].Value() != c.conn.Names()[0] {
		t.Fatalf("polkit subject %+v, caller %s", sub, c.conn.Names()[0])
	}
	job, err := c.Upgrade(nil)
	if err != nil {
		t.Fatalf("Upgrade allowed by polkit: %v", err)
	}
	<-fp.subjects
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if res, err := c.Wait(ctx, job, nil); err != nil || res.State != StateDone {
		t.Fatalf("job: %+v, %v", res, err)
	}
}

func TestIntrospectionMatchesDocs(t *testing.T) {
	needRoot(t)
	bus := startBus(t, "")
	sysroot := newSysroot(t)
	eng := &testEngine{sysroot: sysroot, gate: make(chan struct{})}
	startServer(t, bus, eng, sysroot)
	c, err := Connect(bus.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	job, err := c.Upgrade(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer close(eng.gate)

	var doc introspect.Node
	b, err := os.ReadFile("../../docs/org.berth1.xml")
	if err != nil {
		t.Fatal(err)
	}
	if err := xml.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	want := map[string]introspect.Interface{}
	for _, i := range doc.Interfaces {
		want[i.Name] = i
	}
	for path, iface := range map[dbus.ObjectPath]string{ManagerPath: ManagerInterface, job: JobInterface} {
		var s string
		if err := c.conn.Object(BusName, path).Call("org.freedesktop.DBus.Introspectable.Introspect", 0).Store(&s); err != nil {
			t.Fatal(err)
		}
		var n introspect.Node
		if err := xml.Unmarshal([]byte(s), &n); err != nil {
			t.Fatalf("%s: %v\n%s", path, err, s)
		}
		found := false
		for _, i := range n.Interfaces {
			if strings.HasPrefix(i.Name, "org.berth1.") {
				if i.Name != iface {
					t.Errorf("%s exports %s", path, i.Name)
				}
				gotXML, _ := xml.Marshal(i)
				wantXML, _ := xml.Marshal(want[iface])
				if string(gotXML) != string(wantXML) {
					t.Errorf("%s: exported %s differs from docs/org.berth1.xml:\n got %s\nwant %s", path, iface, gotXML, wantXML)
				}
				found = true
			}
		}
		if !found {
			t.Errorf("%s does not introspect %s", path, iface)
		}
		if path == ManagerPath && (len(n.Children) != 1 || n.Children[0].Name != "job/"+strings.TrimPrefix(string(job), JobPathPrefix)) {
			t.Errorf("manager children %+v, want the job", n.Children)
		}
		// Every documented property is really there, with its type.
		// Read the reply body as decoded: Store would re-make the variants
		// from Go values and lose struct signatures.
		call := c.conn.Object(BusName, path).Call("org.freedesktop.DBus.Properties.GetAll", 0, iface)
		if call.Err != nil {
			t.Fatal(call.Err)
		}
		props := call.Body[0].(map[string]dbus.Variant)
		if len(props) != len(want[iface].Properties) {
			t.Errorf("%s: %d properties, documented %d", path, len(props), len(want[iface].Properties))
		}
		for _, p := range want[iface].Properties {
			v, ok := props[p.Name]
			if !ok || v.Signature().String() != p.Type {
				t.Errorf("%s.%s: exported %v (%s), documented type %s", iface, p.Name, v, v.Signature(), p.Type)
			}
		}
	}
}

// TestPropertiesChanged: the manager's properties announce the job and
// the new deployment with PropertiesChanged.
func TestPropertiesChanged(t *testing.T) {
	needRoot(t)
	bus := startBus(t, "")
	sysroot := newSysroot(t)
	eng := &testEngine{sysroot: sysroot, gate: make(chan struct{})}
	close(eng.gate)
	startServer(t, bus, eng, sysroot)
	conn := bus.conn(t)
	if err := conn.AddMatchSignal(dbus.WithMatchObjectPath(ManagerPath), dbus.WithMatchInterface("org.freedesktop.DBus.Properties"), dbus.WithMatchMember("PropertiesChanged")); err != nil {
		t.Fatal(err)
	}
	ch := make(chan *dbus.Signal, 64)
	conn.Signal(ch)
	var job dbus.ObjectPath
	if err := conn.Object(BusName, ManagerPath).Call(ManagerInterface+".Upgrade", 0, map[string]dbus.Variant{}).Store(&job); err != nil {
		t.Fatal(err)
	}
	seen := map[string]string{}
	timeout := time.After(30 * time.Second)
	for seen["ActiveJob"+string(job)] == "" || seen["ActiveJob/"] == "" || seen["Deployments"] == "" {
		select {
		case sig := <-ch:
			if sig.Body[0].(string) != ManagerInterface {
				t.Fatalf("PropertiesChanged for %v", sig.Body[0])
			}
			for k, v := range sig.Body[1].(map[string]dbus.Variant) {
				switch k {
				case "ActiveJob":
					seen[k+string(v.Value().(dbus.ObjectPath))] = "yes"
				case "Deployments":
					if ids := v.Value().([]string); len(ids) == 1 {
						seen[k] = ids[0]
					}
				}
			}
		case <-timeout:
			t.Fatalf("PropertiesChanged seen: %v", seen)
		}
	}
}
