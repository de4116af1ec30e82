package qemu

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// RunOptions are one qemu run of a test that reads the guest's serial console.
type RunOptions struct {
	// Args follow the accelerator arguments; the serial console must go to stdio
	// ("-serial stdio" or "-nographic").
	Args    []string
	Timeout time.Duration // hard bound on the run; default 15 minutes
	Silence time.Duration // silence bound; default SilenceBound of the accelerator
	// Until is called with every console line; the run ends when it returns true. Nil runs
	// until qemu exits.
	Until func(line string) bool
}

// Result is what a Run saw.
type Result struct {
	Decision
	Console string        // everything qemu printed, carriage returns removed
	Took    time.Duration // qemu start to the end of the run
	Matched bool          // Until returned true
}

// Tail returns the last n lines of the console.
func (r Result) Tail(n int) string { return lastLines(r.Console, n) }

// Run starts qemu-system-x86_64 with the accelerator Detect chose and reads its console.
// The run ends when Until matches (qemu is then killed), when qemu exits, when the console
// stays silent for the silence bound (a *SilentError), or at the timeout. The error is nil
// only if Until matched, or, without Until, if qemu exited successfully.
func Run(ctx context.Context, o RunOptions) (Result, error) {
	res := Result{Decision: Detect(ctx)}
	if o.Timeout == 0 {
		o.Timeout = 15 * time.Minute
	}
	if o.Silence == 0 {
		o.Silence = SilenceBound(res.Accel)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return res, err
	}
	defer pr.Close()
	cmd := exec.Command("qemu-system-x86_64", append(res.Accel.QemuArgs(), o.Args...)...)
	cmd.Stdout, cmd.Stderr = pw, pw
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	err = cmd.Start()
	pw.Close()
	if err != nil {
		return res, fmt.Errorf("start qemu: %w", err)
	}
	pid := cmd.Process.Pid
	kill := func() { syscall.Kill(-pid, syscall.SIGKILL) }
	wd := NewWatchdog(o.Silence, kill)
	defer wd.Stop()
	var timedOut atomic.Bool
	timer := time.AfterFunc(o.Timeout, func() { timedOut.Store(true); kill() })
	defer timer.Stop()
	stopCtx := context.AfterFunc(ctx, kill)
	defer stopCtx()

	var console strings.Builder
	br := bufio.NewReaderSize(pr, 64<<10)
	for {
		line, rerr := br.ReadString('\n')
		if line != "" {
			wd.Write([]byte(line))
			line = strings.ReplaceAll(line, "\r", "")
			console.WriteString(line)
			if o.Until != nil && o.Until(strings.TrimRight(line, "\n")) {
				res.Matched = true
				break
			}
		}
		if rerr != nil {
			break
		}
	}
	kill()
	werr := cmd.Wait()
	res.Took = time.Since(start)
	res.Console = console.String()
	switch {
	case res.Matched:
		return res, nil
	case wd.Err() != nil:
		return res, wd.Err()
	case timedOut.Load():
		return res, fmt.Errorf("qemu still running after %s: killed", o.Timeout)
	case ctx.Err() != nil:
		return res, ctx.Err()
	case o.Until != nil:
		return res, fmt.Errorf("qemu exited (%v) before the console showed what was awaited", werr)
	case werr != nil:
		return res, fmt.Errorf("qemu: %w", werr)
	}
	return res, nil
}

// IsSilent reports whether err is a watchdog kill.
func IsSilent(err error) bool {
	var se *SilentError
	return errors.As(err, &se)
}
