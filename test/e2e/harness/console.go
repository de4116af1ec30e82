package harness

import (
	"encoding/base64"
	"fmt"
	"regexp"
	"strings"
	"time"
)

// A session on the guest's serial console, for guests without an SSH server: the lane
// types into qemu's serial input (the stdin of `-serial stdio`) and reads the captured
// console lines. Root logs in with the empty password the guest images have
// (test/guest/build-rootfs.sh). Each command's output goes through a file and comes back
// base64-encoded between two markers made of a per-command nonce, so the tty's echo, the
// shell prompt and line wrapping cannot be mistaken for output, and its exit code follows
// the end marker. /tmp/.berth-cmd and /tmp/.berth-out in the guest hold the last command.

// ConsoleLogin logs in as root on the serial console and waits until a shell answers,
// retrying while getty is not up yet. It fails when qemu exits or timeout passes.
func (v *VM) ConsoleLogin(timeout time.Duration) (time.Duration, error) {
	v.con.Lock()
	defer v.con.Unlock()
	deadline := time.Now().Add(timeout)
	for attempt := 1; time.Now().Before(deadline); attempt++ {
		if v.Panicked() {
			return 0, fmt.Errorf("%s: %w (see %s)", v.Label, ErrKernelPanic, v.Serial)
		}
		if v.Exited() {
			return 0, fmt.Errorf("%s: qemu exited before a console login", v.Label)
		}
		v.conN++
		ready := fmt.Sprintf("BERTH-READY-%d-%d", time.Now().UnixNano()%1e9, v.conN)
		seen := len(v.Lines())
		// At the login prompt "root" logs in (no password); at a shell it is a harmless
		// "command not found". The probe line then turns off echo and kernel messages on
		// the console and prints the marker (split, so the echoed line does not match).
		half := len(ready) / 2
		if err := v.type_("root\n"); err != nil {
			return 0, err
		}
		time.Sleep(3 * time.Second)
		probe := fmt.Sprintf("set +H; stty -echo 2>/dev/null; dmesg -n 1 2>/dev/null; printf '%%s%%s\\n' '%s' '%s'\n", ready[:half], ready[half:])
		if err := v.type_(probe); err != nil {
			return 0, err
		}
		wait := 20 * time.Second
		if left := time.Until(deadline); left < wait {
			wait = left
		}
		if _, _, err := v.waitSerialFrom(seen, regexp.MustCompile(regexp.QuoteMeta(ready)+`$`), wait); err == nil {
			at := time.Since(v.Started)
			v.ConsoleUpAt = at
			// From here commands drive the guest, each with its own bound; a long quiet one
			// (an upgrade's pull) is not a hung guest.
			v.watch.Pause()
			v.m.logf("%s: console login after %.1fs (attempt %d)", v.Label, at.Seconds(), attempt)
			return at, nil
		}
	}
	return 0, fmt.Errorf("%s: no root shell on the serial console within %s (see %s)", v.Label, timeout, v.Serial)
}

// ConsoleRun runs a shell command in the logged-in console session (ConsoleLogin first)
// and returns its stdout, stderr and exit code. err is set when the command did not
// finish within timeout, qemu exited, or its output was garbled; a non-zero exit code
// alone is not an error.
func (v *VM) ConsoleRun(command string, timeout time.Duration) (stdout, stderr string, rc int, err error) {
	v.con.Lock()
	defer v.con.Unlock()
	v.conN++
	nonce := fmt.Sprintf("%d-%d", time.Now().UnixNano()%1e9, v.conN)
	begin, mid, end := "BERTH-BEGIN-"+nonce, "BERTH-MID-"+nonce, "BERTH-END-"+nonce
	seen := len(v.Lines())
	// The command travels base64-encoded, so no quoting, tab completion or history
	// expansion of the interactive shell touches it; it runs in bash (as over SSH) with
	// no input. The markers are printed in two halves so the typed line never matches.
	script := fmt.Sprintf("echo %s | base64 -d >/tmp/.berth-cmd; bash /tmp/.berth-cmd </dev/null >/tmp/.berth-out 2>/tmp/.berth-err; rc=$?; "+
		"printf '%%s%%s\\n' 'BERTH-BEG' 'IN-%s'; base64 -w0 /tmp/.berth-out; printf '\\n%%s%%s\\n' 'BERTH-M' 'ID-%s'; base64 -w0 /tmp/.berth-err; printf '\\n%%s%%s %%d\\n' 'BERTH-E' 'ND-%s' $rc\n",
		base64.StdEncoding.EncodeToString([]byte(command)), nonce, nonce, nonce)
	if err := v.type_(script); err != nil {
		return "", "", -1, err
	}
	fail := func(err error) (string, string, int, error) {
		return "", "", -1, fmt.Errorf("console command %q: %w", command, err)
	}
	bi, _, err := v.waitSerialFrom(seen, regexp.MustCompile(regexp.QuoteMeta(begin)+`$`), timeout)
	if err != nil {
		return fail(err)
	}
	mi, _, err := v.waitSerialFrom(bi+1, regexp.MustCompile(`^`+regexp.QuoteMeta(mid)+`$`), timeout)
	if err != nil {
		return fail(err)
	}
	ei, el, err := v.waitSerialFrom(mi+1, regexp.MustCompile(`^`+regexp.QuoteMeta(end)+` (\d+)$`), timeout)
	if err != nil {
		return fail(err)
	}
	fmt.Sscanf(strings.TrimPrefix(el.Text, end+" "), "%d", &rc)
	lines := v.Lines()
	decode := func(ls []SerialLine) (string, error) {
		var enc strings.Builder
		for _, l := range ls {
			enc.WriteString(strings.TrimSpace(l.Text))
		}
		b, err := base64.StdEncoding.DecodeString(enc.String())
		if err != nil {
			return "", fmt.Errorf("output garbled on the console (%v): %q", err, enc.String())
		}
		return string(b), nil
	}
	if stdout, err = decode(lines[bi+1 : mi]); err != nil {
		return fail(err)
	}
	if stderr, err = decode(lines[mi+1 : ei]); err != nil {
		return fail(err)
	}
	return stdout, stderr, rc, nil
}

// ConsolePoweroff asks the guest to power off through the console session and waits for
// qemu to exit; after the timeout qemu is killed (and that is an error).
func (v *VM) ConsolePoweroff(timeout time.Duration) error {
	if v.Exited() {
		return nil
	}
	v.con.Lock()
	err := v.type_("systemctl --no-block poweroff\n")
	v.con.Unlock()
	if err == nil {
		err = v.Wait(timeout)
	}
	if err != nil {
		v.Kill()
		return fmt.Errorf("%s: guest did not power off within %s (killed): %v", v.Label, timeout, err)
	}
	return nil
}

// type_ writes to the serial console's input.
func (v *VM) type_(s string) error {
	if v.stdin == nil {
		return fmt.Errorf("%s: no serial console input (interactive boot?)", v.Label)
	}
	if _, err := v.stdin.Write([]byte(s)); err != nil {
		return fmt.Errorf("%s: type on the serial console: %w", v.Label, err)
	}
	return nil
}
