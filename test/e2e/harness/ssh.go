package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// SSHKey is a key pair generated for one run; the guest gets the public half through
// `berth install to-disk --root-ssh-authorized-keys`.
type SSHKey struct {
	Private, Public string // file paths
}

// NewSSHKey generates an ed25519 key without passphrase in dir.
func NewSSHKey(ctx context.Context, dir string) (*SSHKey, error) {
	k := &SSHKey{Private: filepath.Join(dir, "id_ed25519"), Public: filepath.Join(dir, "id_ed25519.pub")}
	os.Remove(k.Private)
	os.Remove(k.Public)
	if out, err := run(ctx, 30*time.Second, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "berth-e2e", "-f", k.Private); err != nil {
		return nil, fmt.Errorf("ssh-keygen: %w: %s", err, out)
	}
	return k, nil
}

// SSHArgs are the ssh options for this VM: a throwaway host key check (each run's guest
// is new), batch mode, bounded connect and keepalive times.
func (v *VM) SSHArgs() []string {
	return []string{"-i", v.m.Key.Private, "-p", strconv.Itoa(v.SSHPort),
		"-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
		"-o", "ConnectTimeout=20", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=6",
		"-o", "LogLevel=ERROR", "root@127.0.0.1"}
}

// ErrKernelPanic is returned by WaitSSH when the guest kernel panicked. Under multi-threaded
// TCG a cross-modified-code race (an "Oops: int3" during early boot) was seen once; callers
// may retry such a boot.
var ErrKernelPanic = errors.New("guest kernel panicked")

// SSHResult is the outcome of one remote command.
type SSHResult struct {
	Stdout, Stderr string
	ExitCode       int // -1 when ssh itself failed to connect or timed out
}

// Run runs a shell command in the guest (bounded by timeout) and returns its output.
// err is set for a connection failure or a non-zero exit.
func (v *VM) Run(ctx context.Context, timeout time.Duration, command string) (SSHResult, error) {
	return v.run(ctx, timeout, nil, command)
}

// run is Run with ssh options ahead of SSHArgs (ssh takes the first value of an option).
func (v *VM) run(ctx context.Context, timeout time.Duration, opts []string, command string) (SSHResult, error) {
	args := append([]string{"-k", "5", secs(timeout), "ssh"}, opts...)
	args = append(args, v.SSHArgs()...)
	args = append(args, "--", command)
	cmd := exec.CommandContext(ctx, "timeout", args...)
	// On cancellation SIGTERM, which timeout passes on to ssh (SIGKILL would leave ssh behind).
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 10 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	res := SSHResult{Stdout: stdout.String(), Stderr: stderr.String()}
	if err != nil {
		res.ExitCode = -1
		if ee, ok := err.(*exec.ExitError); ok {
			res.ExitCode = ee.ExitCode()
		}
		// ssh exits 255 for its own failures; timeout exits 124/137.
		return res, fmt.Errorf("ssh %q: exit %d: %s", command, res.ExitCode, strings.TrimSpace(res.Stderr))
	}
	return res, nil
}

// SSH runs a command with a 2-minute bound and returns its stdout.
func (v *VM) SSH(ctx context.Context, command string) (string, error) {
	res, err := v.Run(ctx, 2*time.Minute, command)
	return res.Stdout, err
}

// WaitSSH retries until the guest answers over SSH, qemu exits, or timeout passes. It
// returns the time from qemu start to the first successful login.
//
// Attempts overlap: a new one starts every 3 s (at most 5 at once), each with the full
// connect timeout of SSHArgs. Under TCG a connection made before the guest's network is
// up hangs in the banner exchange (qemu's user network accepts it at once and resends its
// SYN to the guest only every few seconds), and the first banner takes 5 s or, on a
// loaded machine, over 10; one attempt at a time waited out each hanging one and
// delayed the first login by 10–30 s after sshd was up.
func (v *VM) WaitSSH(ctx context.Context, timeout time.Duration) (time.Duration, error) {
	deadline := time.Now().Add(timeout)
	actx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the attempts still running
	results := make(chan error, 64)
	inflight, attempts := 0, 0
	tick := time.NewTicker(3 * time.Second)
	defer tick.Stop()
	start := func() {
		if inflight >= 5 {
			return
		}
		inflight++
		attempts++
		go func() {
			_, err := v.run(actx, 30*time.Second, nil, "true")
			results <- err
		}()
	}
	start()
	var last error
	for time.Now().Before(deadline) {
		// Panic first: with panic=-1 qemu exits right after a guest panic.
		if v.Panicked() {
			return 0, fmt.Errorf("%s: %w (see %s)", v.Label, ErrKernelPanic, v.Serial)
		}
		if v.Exited() {
			if v.Panicked() {
				return 0, fmt.Errorf("%s: %w (see %s)", v.Label, ErrKernelPanic, v.Serial)
			}
			if err := v.Silent(); err != nil {
				return 0, fmt.Errorf("%s: before SSH came up: %w", v.Label, err)
			}
			return 0, fmt.Errorf("%s: qemu exited before SSH came up (last ssh error: %v)", v.Label, last)
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-v.done:
		case err := <-results:
			inflight--
			if err == nil {
				at := time.Since(v.Started)
				v.SSHUpAt = at
				// From here the guest is driven over SSH, whose commands have their own
				// bounds, and its console is quiet by design.
				if v.watch != nil {
					v.watch.Pause()
				}
				v.m.logf("%s: ssh up after %.1fs (%d attempts)", v.Label, at.Seconds(), attempts)
				return at, nil
			}
			last = err
		case <-tick.C:
			start()
		}
	}
	return 0, fmt.Errorf("%s: no SSH within %s (last error: %v)", v.Label, timeout, last)
}
