package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/cmdline"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/etcmerge"
	"github.com/berth-dev/berth/internal/install"
	"github.com/berth-dev/berth/internal/localchanges"
	"github.com/berth-dev/berth/internal/oci"
	"github.com/berth-dev/berth/internal/progress"
	"github.com/berth-dev/berth/internal/runtime"
	"github.com/berth-dev/berth/internal/store"
)

// JobContext is what a running job offers the engine.
type JobContext interface {
	// Progress reports the job's current phase and how far it is.
	Progress(phase string, done, total uint64)
	// Created journals a deployment the job made, so that recovery after
	// a crash can remove it if no boot entry refers to it yet.
	Created(id string) error
}

// UpgradeOptions are the a{sv} options of Upgrade and Switch.
type UpgradeOptions struct {
	Check bool   // only look for an update ("check")
	Apply bool   // reboot into it when staged ("apply")
	Local string // "keep" (default) or "drop" ("local")
}

// Engine does the work of the jobs. berthd uses SysrootEngine; tests may
// use an engine that blocks deterministically.
type Engine interface {
	Status() (*Host, error)
	Upgrade(ctx context.Context, job JobContext, opts UpgradeOptions) (summary string, err error)
	Switch(ctx context.Context, job JobContext, ref string, opts UpgradeOptions) (summary string, err error)
	Rollback(ctx context.Context, job JobContext) (summary string, err error)
	Cleanup(ctx context.Context, job JobContext) (summary string, err error)
	Pin(id string, pinned bool) error
	Diff(id string) (string, error)
}

// ErrNotImplemented is wrapped by steps berth cannot do yet.
var ErrNotImplemented = errors.New("not implemented yet")

// SysrootEngine is the real engine: it works on the berth installation
// below Sysroot with internal/oci, internal/deploy and internal/boot.
type SysrootEngine struct {
	Sysroot string
	ESP     string // "" = boot.FoundESP(Sysroot)
	// PolicyPath and InsecureTLS are passed to oci.Pull.
	PolicyPath  string
	InsecureTLS bool
	// Runtime is berth's runtime injected into new deployments; nil
	// locates the running berth's own (install.DeployImage's default).
	Runtime *runtime.Set
	// Root is the root= of new deployments; "" takes the running system's.
	Root string
}

func (e *SysrootEngine) layout() store.Layout { return store.At(e.Sysroot) }

func (e *SysrootEngine) espDir() string {
	if e.ESP != "" {
		return e.ESP
	}
	return boot.FoundESP(e.sysroot())
}

func (e *SysrootEngine) sysroot() string {
	if e.Sysroot == "" {
		return "/"
	}
	return e.Sysroot
}

// Status implements Engine.
func (e *SysrootEngine) Status() (*Host, error) {
	return ReadStatus(StatusOptions{Sysroot: e.sysroot(), ESP: e.ESP})
}

// current returns the deployment an upgrade starts from: the booted one,
// or (not booted by berth, e.g. a sysroot in an installer) the newest.
func (e *SysrootEngine) current() (*deploy.Deployment, []*deploy.Deployment, error) {
	deps, err := deploy.List(e.layout())
	if err != nil {
		return nil, nil, err
	}
	booted := deploy.BootedID(e.sysroot())
	for _, d := range deps {
		if d.ID == booted {
			return d, deps, nil
		}
	}
	if len(deps) == 0 {
		return nil, deps, fmt.Errorf("no deployments below %s (install berth first)", e.layout().Deployments())
	}
	return deps[len(deps)-1], deps, nil
}

// Upgrade implements Engine: pull the tracked image again and deploy it
// when it changed.
func (e *SysrootEngine) Upgrade(ctx context.Context, job JobContext, opts UpgradeOptions) (string, error) {
	cur, _, err := e.current()
	if err != nil {
		return "", fmt.Errorf("upgrade: %w", err)
	}
	if cur.ImageRef == "" {
		return "", fmt.Errorf("upgrade: deployment %s records no image reference to track (use switch)", cur.ID)
	}
	return e.stage(ctx, job, cur.ImageRef, "upgrade", opts)
}

// Switch implements Engine.
func (e *SysrootEngine) Switch(ctx context.Context, job JobContext, ref string, opts UpgradeOptions) (string, error) {
	if strings.TrimSpace(ref) == "" {
		return "", errors.New("switch: empty image reference")
	}
	return e.stage(ctx, job, ref, "switch", opts)
}

func (e *SysrootEngine) stage(ctx context.Context, job JobContext, ref, origin string, opts UpgradeOptions) (string, error) {
	cur, deps, err := e.current()
	if err != nil && origin == "upgrade" {
		return "", fmt.Errorf("%s: %w", origin, err)
	}
	if opts.Check {
		job.Progress("check", 0, 1)
		d, err := remoteManifestDigest(ctx, ref, e.InsecureTLS)
		if err != nil {
			return "", fmt.Errorf("%s --check: %w", origin, err)
		}
		job.Progress("check", 1, 1)
		for _, dep := range deps {
			if dep.ImageRef == ref && dep.ManifestDigest == d && dep.State != deploy.StateFailed {
				return fmt.Sprintf("no update: %s (%s) is deployment %s", ref, d, dep.ID), nil
			}
		}
		return fmt.Sprintf("update available: %s is %s", ref, d), nil
	}
	job.Progress("pull", 0, 0)
	pr, pw := io.Pipe()
	fwd := make(chan struct{})
	go func() { forwardProgress(pr, job); close(fwd) }()
	img, err := oci.Pull(ctx, ref, oci.PullOptions{
		Sysroot:               e.sysroot(),
		PolicyPath:            e.PolicyPath,
		InsecureSkipTLSVerify: e.InsecureTLS,
		Progress:              progress.New(pw, progress.Options{Mode: progress.JSON}),
		Warnings:              io.Discard,
	})
	pw.Close()
	<-fwd
	if err != nil {
		return "", fmt.Errorf("%s: %w", origin, err)
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	// The same image (manifest) is already deployed. Composefs digests do
	// not compare: a deployment's includes berth's injected runtime.
	for _, d := range deps {
		if d.ManifestDigest == img.ManifestDigest && d.State != deploy.StateFailed {
			if cur != nil && d.ID == cur.ID {
				return fmt.Sprintf("no update: %s is what deployment %s runs (%s)", ref, d.ID, img.ManifestDigest), nil
			}
			return fmt.Sprintf("no update: %s is already deployment %s (%s)", ref, d.ID, img.ManifestDigest), nil
		}
	}

	espDir := e.espDir()
	if espDir == "" {
		return "", fmt.Errorf("%s: no ESP with a loader/ directory below %s (efi, boot/efi, boot): is it mounted?", origin, e.sysroot())
	}
	mode := cmdline.LocalPersistent
	if cur != nil && cur.LocalMode != "" {
		mode = cur.LocalMode
	}
	var kargs []string
	if cur != nil {
		// The machine's own kernel arguments (install --karg: console=,
		// ...) stay with it across updates.
		kargs = cur.KernelArgs
	}
	do := install.DeployOptions{LocalMode: mode, KernelArgs: kargs, Origin: origin, InsecureNoVerity: e.insecureNoVerity(), Runtime: e.Runtime, Root: e.Root}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	// From here on the job is not cancellable: install.DeployImage takes
	// no context; a crash in it is recovered by Recover (the deployment
	// has no boot entry until its last step).
	pr, pw = io.Pipe()
	fwd = make(chan struct{})
	go func() { forwardProgressAs(pr, job, "deploy"); close(fwd) }()
	do.Progress = progress.New(pw, progress.Options{Mode: progress.JSON})
	res, err := install.DeployImage(e.sysroot(), espDir, img, do)
	pw.Close()
	<-fwd
	if res != nil && res.Deployment != nil {
		if jerr := job.Created(res.Deployment.ID); jerr != nil && err == nil {
			err = jerr
		}
	}
	if err != nil {
		return "", fmt.Errorf("%s: %w", origin, err)
	}
	id := res.Deployment.ID
	summary := fmt.Sprintf("staged deployment %s of %s (%s); it boots next", id, ref, img.ManifestDigest)
	if cur != nil && opts.Local != "drop" {
		// The /etc 3-way merge happens at the first boot of the new
		// deployment (berth-init runs etcmerge.MergeDeployment).
		if err := etcmerge.WritePending(e.layout(), id, cur); err != nil {
			return "", fmt.Errorf("%s: record the pending /etc merge: %w", origin, err)
		}
		summary += "; /etc is merged from " + cur.ID + " at its first boot"
	}
	return summary, nil
}

// insecureNoVerity keeps a running system's berth.composefs=? (no
// fs-verity on its filesystem) for the deployments it stages.
func (e *SysrootEngine) insecureNoVerity() bool {
	if deploy.BootedID(e.sysroot()) == "" {
		return false
	}
	a, err := cmdline.ReadProc("")
	return err == nil && a.Composefs != nil && a.Composefs.Optional
}

// forwardProgress turns the JSON-lines events of a progress.Reporter into
// job progress ("pull <task>").
func forwardProgress(r io.Reader, job JobContext) { forwardProgressAs(r, job, "pull") }

func forwardProgressAs(r io.Reader, job JobContext, prefix string) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var ev progress.Event
		if json.Unmarshal(sc.Bytes(), &ev) != nil {
			continue
		}
		phase := prefix
		if ev.Task != "" {
			phase = prefix + ": " + ev.Task
		}
		switch ev.Event {
		case "start", "progress", "done":
			job.Progress(phase, uint64(max(ev.Current, 0)), uint64(max(ev.Total, 0)))
		}
	}
	io.Copy(io.Discard, r)
}

// Rollback implements Engine: the previous deployment's boot entry
// becomes the default.
func (e *SysrootEngine) Rollback(ctx context.Context, job JobContext) (string, error) {
	dir := e.espDir()
	if dir == "" {
		return "", fmt.Errorf("rollback: no ESP with a loader/ directory below %s (efi, boot/efi, boot)", e.sysroot())
	}
	job.Progress("rollback", 0, 1)
	unlock, err := deploy.Lock(e.layout())
	if err != nil {
		return "", fmt.Errorf("rollback: %w", err)
	}
	defer unlock()
	target, err := boot.ESP{Dir: dir}.Rollback()
	if err != nil {
		return "", err
	}
	if _, err := deploy.Read(e.layout(), target); err != nil {
		return "", fmt.Errorf("rollback: boot entry %s has no deployment: %w", target, err)
	}
	job.Progress("rollback", 1, 1)
	return "next boot: deployment " + target, nil
}

// Cleanup implements Engine: it removes leftovers of interrupted work and
// every deployment that is not booted, staged, the rollback or pinned,
// with its boot entry.
func (e *SysrootEngine) Cleanup(ctx context.Context, job JobContext) (string, error) {
	l := e.layout()
	job.Progress("cleanup", 0, 0)
	removed, err := deploy.Cleanup(l)
	if err != nil {
		return "", fmt.Errorf("cleanup: %w", err)
	}
	st, err := e.Status()
	if err != nil {
		return "", fmt.Errorf("cleanup: %w", err)
	}
	keep := map[string]bool{}
	for _, be := range []*BootEntry{st.Status.Booted, st.Status.Staged, st.Status.Rollback} {
		if be != nil && be.Berth != nil {
			keep[be.Berth.ID] = true
		}
	}
	var def string
	if st.Status.Berth.ESP != "" {
		if d, err := (boot.ESP{Dir: st.Status.Berth.ESP}).Default(); err == nil && d != nil {
			def = d.ID
			keep[def] = true
		}
	}
	var gone []string
	for i, d := range st.Status.Berth.Deployments {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		job.Progress("cleanup", uint64(i), uint64(len(st.Status.Berth.Deployments)))
		if keep[d.ID] || d.Pinned {
			continue
		}
		if st.Status.Berth.ESP != "" {
			if err := (boot.ESP{Dir: st.Status.Berth.ESP}).Remove(d.ID); err != nil {
				return "", fmt.Errorf("cleanup: %w", err)
			}
		}
		if err := deploy.Remove(l, d.ID, deploy.RemoveOptions{Booted: deploy.BootedID(e.sysroot()), Default: def}); err != nil {
			return "", fmt.Errorf("cleanup: %w", err)
		}
		gone = append(gone, d.ID)
	}
	job.Progress("garbage-collect", 0, 0)
	rep, err := oci.Cleanup(e.sysroot())
	if err != nil {
		return "", fmt.Errorf("cleanup: removed deployments %v, then: %w", gone, err)
	}
	return fmt.Sprintf("removed %d deployments %v, %d leftovers, %d images, %d objects (%d bytes freed)",
		len(gone), gone, len(removed), rep.ImagesRemoved, rep.ObjectsRemoved, rep.BytesFreed), nil
}

// Pin implements Engine.
func (e *SysrootEngine) Pin(id string, pinned bool) error {
	_, err := deploy.SetPinned(e.layout(), id, pinned)
	return err
}

// Change is one local change of a deployment (Diff).
type Change = localchanges.Change

// DiffResult is the JSON Diff returns.
type DiffResult = localchanges.DiffResult

// Diff implements Engine: it lists deployment id's persistent local
// changes (its overlay upper directory) against its image.
func (e *SysrootEngine) Diff(id string) (string, error) {
	res, err := localchanges.Diff(e.layout(), id)
	if err != nil {
		return "", err
	}
	b, err := json.Marshal(res)
	if err != nil {
		return "", err
	}
	return string(b), nil
}
