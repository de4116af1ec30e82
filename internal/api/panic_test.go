package api

import (
	"context"
	"strings"
	"testing"
	"time"
)

// panicEngine is the test engine whose Rollback panics, as a bug in a job
// would.
type panicEngine struct{ testEngine }

func (e *panicEngine) Rollback(ctx context.Context, job JobContext) (string, error) {
	panic("engine bug: boom")
}

// TestPanickingJobFailsAndDaemonStaysUp: a panic inside a job ends that job
// as failed with an error saying so; the daemon keeps serving and takes
// the next job.
func TestPanickingJobFailsAndDaemonStaysUp(t *testing.T) {
	needRoot(t)
	bus := startBus(t, "")
	sysroot := newSysroot(t)
	eng := &panicEngine{testEngine{sysroot: sysroot, gate: make(chan struct{})}}
	close(eng.gate)
	startServer(t, bus, eng, sysroot)
	c, err := Connect(bus.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	job, err := c.Rollback(nil)
	if err != nil {
		t.Fatalf("Rollback: %v", err)
	}
	res, err := c.Wait(ctx, job, nil)
	if err != nil {
		t.Fatalf("wait for the panicking job: %v", err)
	}
	if res.State != StateFailed || !strings.Contains(res.Error, "internal error in rollback job") || !strings.Contains(res.Error, "engine bug: boom") {
		t.Fatalf("panicking job ended %q with %q; want failed with an internal-error message", res.State, res.Error)
	}
	if _, _, err := c.Status(); err != nil {
		t.Fatalf("GetStatus after the panic: %v", err)
	}
	job, err = c.Upgrade(nil)
	if err != nil {
		t.Fatalf("Upgrade after the panic: %v", err)
	}
	if res, err := c.Wait(ctx, job, nil); err != nil || res.State != StateDone {
		t.Fatalf("job after the panic: %+v, %v", res, err)
	}
}
