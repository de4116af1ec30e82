// Package health runs berth's boot health checks (DESIGN §5 step 8):
// berth-healthcheck.service is RequiredBy=boot-complete.target, so a
// failing check keeps the boot from being blessed and, after the entry's
// tries run out, systemd-boot falls back to the previous deployment.
//
// A check is an executable in /usr/lib/berth/health.d (from the image) or
// /etc/berth/health.d (local). A file in /etc with the same name replaces
// the image's; a symlink to /dev/null there disables it (the systemd
// drop-in convention). Checks run in name order, each with a timeout.
// On top, no systemd unit may be in the failed state.
package health

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	sdbus "github.com/coreos/go-systemd/v22/dbus"

	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/store"
)

// Default check directories, image first; a later one overrides by name.
var DefaultDirs = []string{"/usr/lib/berth/health.d", "/etc/berth/health.d"}

// Options configure Run.
type Options struct {
	Dirs    []string      // default DefaultDirs
	Timeout time.Duration // per check; default 2 minutes
	// FailedUnits lists failed systemd units; nil asks systemd over D-Bus.
	// Set SkipUnits to leave the unit check out.
	FailedUnits func(ctx context.Context) ([]string, error)
	SkipUnits   bool
	// IgnoreUnits are never counted as failed (the health check's own unit).
	IgnoreUnits []string
}

// CheckResult is the outcome of one check.
type CheckResult struct {
	Name     string        `json:"name"`
	Path     string        `json:"path"`
	OK       bool          `json:"ok"`
	Error    string        `json:"error,omitempty"`
	Output   string        `json:"output,omitempty"` // last 4 KiB of stdout+stderr
	Duration time.Duration `json:"duration"`
}

// Report is the outcome of Run.
type Report struct {
	OK          bool          `json:"ok"`
	Checks      []CheckResult `json:"checks"`
	FailedUnits []string      `json:"failedUnits"`
	UnitsError  string        `json:"unitsError,omitempty"`
}

// Summary is a one-line description of what failed ("" when healthy).
func (r *Report) Summary() string {
	var bad []string
	for _, c := range r.Checks {
		if !c.OK {
			bad = append(bad, fmt.Sprintf("check %s: %s", c.Name, c.Error))
		}
	}
	if len(r.FailedUnits) > 0 {
		bad = append(bad, "failed units: "+strings.Join(r.FailedUnits, " "))
	}
	if r.UnitsError != "" {
		bad = append(bad, "cannot list units: "+r.UnitsError)
	}
	return strings.Join(bad, "; ")
}

// Checks returns the checks found in dirs, by name, later dirs overriding
// earlier ones; disabled (→ /dev/null) and non-executable entries are left out.
func Checks(dirs []string) (map[string]string, error) {
	found := map[string]string{}
	for _, d := range dirs {
		ents, err := os.ReadDir(d)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", d, err)
		}
		for _, e := range ents {
			name := e.Name()
			if strings.HasPrefix(name, ".") {
				continue
			}
			p := filepath.Join(d, name)
			if target, err := os.Readlink(p); err == nil && target == "/dev/null" {
				delete(found, name)
				continue
			}
			fi, err := os.Stat(p)
			if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
				continue
			}
			found[name] = p
		}
	}
	return found, nil
}

// Run runs every check and the failed-units check.
func Run(ctx context.Context, opts Options) (*Report, error) {
	if opts.Dirs == nil {
		opts.Dirs = DefaultDirs
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 2 * time.Minute
	}
	checks, err := Checks(opts.Dirs)
	if err != nil {
		return nil, fmt.Errorf("health checks: %w", err)
	}
	names := make([]string, 0, len(checks))
	for n := range checks {
		names = append(names, n)
	}
	sort.Strings(names)
	rep := &Report{OK: true, Checks: []CheckResult{}, FailedUnits: []string{}}
	for _, n := range names {
		r := runCheck(ctx, n, checks[n], opts.Timeout)
		rep.OK = rep.OK && r.OK
		rep.Checks = append(rep.Checks, r)
	}
	if !opts.SkipUnits {
		list := opts.FailedUnits
		if list == nil {
			list = SystemdFailedUnits
		}
		units, err := list(ctx)
		if err != nil {
			rep.OK = false
			rep.UnitsError = err.Error()
		}
		for _, u := range units {
			ignored := false
			for _, ig := range opts.IgnoreUnits {
				if u == ig {
					ignored = true
				}
			}
			if !ignored {
				rep.FailedUnits = append(rep.FailedUnits, u)
				rep.OK = false
			}
		}
	}
	return rep, nil
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	buf bytes.Buffer
	max int
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.buf.Write(p)
	if over := t.buf.Len() - t.max; over > 0 {
		t.buf.Next(over)
	}
	return len(p), nil
}

func runCheck(ctx context.Context, name, path string, timeout time.Duration) CheckResult {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	out := &tailBuffer{max: 4 << 10}
	cmd := exec.CommandContext(ctx, path)
	cmd.Stdout, cmd.Stderr = out, out
	// A check's children die with it: kill the whole process group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	r := CheckResult{Name: name, Path: path, OK: err == nil, Output: out.buf.String(), Duration: time.Since(start)}
	if err != nil {
		r.Error = err.Error()
		if ctx.Err() == context.DeadlineExceeded {
			r.Error = fmt.Sprintf("timed out after %s", timeout)
		}
	}
	return r
}

// SystemdFailedUnits asks systemd (D-Bus) for the units in state failed.
func SystemdFailedUnits(ctx context.Context) ([]string, error) {
	c, err := sdbus.NewWithContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("connect to systemd: %w", err)
	}
	defer c.Close()
	units, err := c.ListUnitsFilteredContext(ctx, []string{"failed"})
	if err != nil {
		return nil, fmt.Errorf("list failed units: %w", err)
	}
	var out []string
	for _, u := range units {
		out = append(out, u.Name)
	}
	sort.Strings(out)
	return out, nil
}

// Record notes what this boot says about the deployments below sysroot:
// the booted one is marked booted when rep is healthy, and deployments
// whose boot entry ran out of tries (systemd-boot abandoned them) are
// marked failed, so `berth status` can say why the machine is where it
// is. badIDs are the ids of entries marked bad on the ESP.
func Record(sysroot, booted string, rep *Report, badIDs []string) error {
	l := store.At(sysroot)
	var errs []error
	if rep != nil && rep.OK && booted != "" {
		d, err := deploy.Read(l, booted)
		if err == nil && d.State != deploy.StateBooted {
			_, err = deploy.SetState(l, booted, deploy.StateBooted)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	for _, id := range badIDs {
		if id == booted {
			continue
		}
		d, err := deploy.Read(l, id)
		if errors.Is(err, deploy.ErrNotFound) {
			continue
		}
		if err == nil && d.State != deploy.StateFailed {
			_, err = deploy.SetState(l, id, deploy.StateFailed)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
