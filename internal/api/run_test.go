package api

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/progress"
	"github.com/berth-dev/berth/internal/store"
)

func TestRunJobViaDaemon(t *testing.T) {
	needRoot(t)
	bus := startBus(t, "")
	sysroot := newSysroot(t)
	eng := &testEngine{sysroot: sysroot, gate: make(chan struct{})}
	srv := startServer(t, bus, eng, sysroot)
	c, err := Connect(bus.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	// A client's job runs: the CLI is told Busy, naming it.
	job, err := c.Upgrade(nil)
	if err != nil {
		t.Fatal(err)
	}
	waitPhase(t, c.signals, job, "blocked")
	_, _, err = RunJob(context.Background(), Request{Kind: KindRollback, Address: bus.addr}, nil)
	if err == nil || !strings.Contains(err.Error(), ErrBusy) || !strings.Contains(err.Error(), string(job)) {
		t.Fatalf("RunJob during another job: %v", err)
	}
	c.Cancel(job)
	if _, err := c.Wait(context.Background(), job, nil); err != nil {
		t.Fatal(err)
	}

	// Ctrl-C (ctx cancelled) while the CLI's job blocks: the CLI cancels
	// the job and reports it.
	ctx, cancel := context.WithCancel(context.Background())
	var out bytes.Buffer
	done := make(chan error, 1)
	go func() {
		_, _, err := RunJob(ctx, Request{Kind: KindUpgrade, Address: bus.addr}, progress.New(&out, progress.Options{Mode: progress.Plain}))
		done <- err
	}()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if j := srv.ActiveJob(); j != nil && j.info().Phase == "blocked" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the CLI's job never blocked")
		}
	}
	cancel()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "upgrade cancelled") {
			t.Fatalf("interrupted RunJob: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("RunJob did not return after cancel")
	}

	close(eng.gate)
	out.Reset()
	res, via, err := RunJob(context.Background(), Request{Kind: KindUpgrade, Address: bus.addr}, progress.New(&out, progress.Options{Mode: progress.Plain}))
	if err != nil || via != ViaDaemon || res.State != StateDone || !strings.HasPrefix(res.Summary, "staged ") {
		t.Fatalf("RunJob: %+v via %s: %v", res, via, err)
	}
	for _, phase := range []string{"blocked", "finish"} {
		if !strings.Contains(out.String(), phase) {
			t.Errorf("progress output lacks phase %q:\n%s", phase, out.String())
		}
	}
}

func TestRunJobDirectRollback(t *testing.T) {
	needRoot(t)
	sysroot, a, _ := twoDeployments(t)
	res, via, err := RunJob(context.Background(), Request{Kind: KindRollback, Direct: true, Sysroot: sysroot}, nil)
	if err != nil || via != ViaDirect || res.State != StateDone {
		t.Fatalf("direct rollback: %+v via %s: %v", res, via, err)
	}
	def, err := boot.ESP{Dir: filepath.Join(sysroot, "efi")}.Default()
	if err != nil || def.ID != a.ID {
		t.Fatalf("default after direct rollback: %+v %v", def, err)
	}
	last, err := ReadLastJob(sysroot)
	if err != nil || last.Kind != KindRollback || last.State != StateDone {
		t.Fatalf("last job: %+v %v", last, err)
	}
	// Direct cleanup: the default deployment, its image and its objects
	// survive the garbage collection.
	res, _, err = RunJob(context.Background(), Request{Kind: KindCleanup, Direct: true, Sysroot: sysroot}, nil)
	if err != nil || res.State != StateDone {
		t.Fatalf("cleanup: %+v %v", res, err)
	}
	l := store.At(sysroot)
	if _, err := deploy.Read(l, a.ID); err != nil {
		t.Fatalf("cleanup removed the default deployment: %v", err)
	}
	if err := composefs.Check(l.Image(a.ComposefsDigest)); err != nil {
		t.Fatalf("cleanup damaged the default deployment's image: %v", err)
	}
}
