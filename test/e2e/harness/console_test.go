package harness

import (
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testenv"
)

// TestConsoleSessionReturnsExactOutputAndExitCode drives the console protocol against a
// local shell standing in for the guest's serial console: the output comes back byte for
// byte (quotes, tabs, '!' and no trailing newline included), stderr apart, with the exit code,
// and the shell's noise (here "root: command not found") is not taken for output.
func TestConsoleSessionReturnsExactOutputAndExitCode(t *testing.T) {
	testenv.RequireTool(t, "bash", "bash")
	v := &VM{m: &Machine{Name: "fake"}, Label: "fake-console", done: make(chan struct{}), notify: make(chan struct{}), Started: time.Now()}
	cmd := exec.Command("bash", "--norc", "--noprofile", "-s")
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	v.stdin = in
	go func() {
		v.capture(out, devNull{})
		cmd.Wait()
		close(v.done)
	}()
	defer func() { in.Close(); cmd.Process.Kill(); <-v.done }()
	if _, err := v.ConsoleLogin(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	got, stderr, rc, err := v.ConsoleRun("echo 'a $b \"c\"!'; printf 'x\\ty'; echo err >&2; exit 3", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if want := "a $b \"c\"!\nx\ty"; got != want || stderr != "err\n" || rc != 3 {
		t.Errorf("got %q, stderr %q, exit %d; want %q, \"err\\n\", exit 3", got, stderr, rc, want)
	}
	got, stderr, rc, err = v.ConsoleRun("true", 30*time.Second)
	if err != nil || got != "" || stderr != "" || rc != 0 {
		t.Errorf("true: %q %q %d %v", got, stderr, rc, err)
	}
	big := strings.Repeat("0123456789", 3000)
	got, _, _, err = v.ConsoleRun("printf '%s' "+big, 30*time.Second)
	if err != nil || got != big {
		t.Errorf("30 kB of output: %d bytes, %v", len(got), err)
	}
}

type devNull struct{}

func (devNull) Write(p []byte) (int, error) { return len(p), nil }
