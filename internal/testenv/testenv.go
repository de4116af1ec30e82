// Package testenv decides what a test does when its environment lacks something it needs:
// on a developer's machine it skips with the reason; under CI (CI=true, as make check and
// CI services set it) it fails naming what is missing and how to get it, so a lost tool,
// package, kernel feature or root never turns a privileged test into a silent skip.
//
// Tests that are opt-in (an environment variable not set, testing.Short) or impossible by
// design on such a machine (fs-verity on a host kernel without it) skip with t.Skip directly
// and say why.
package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"testing"
)

// CI reports whether the tests run under CI: env CI is a true boolean ("true", "1").
func CI() bool {
	v, err := strconv.ParseBool(os.Getenv("CI"))
	return err == nil && v
}

// SkipOrFail skips the test with the message, or under CI fails it with "CI: " and the message.
func SkipOrFail(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if CI() {
		t.Fatalf("CI: %s", msg)
	}
	t.Skip(msg)
}

// RequireRoot needs the test to run as root; why says what needs it. Under CI the tests
// run as root (make check does), so a non-root run there fails.
func RequireRoot(t testing.TB, why string) {
	t.Helper()
	if os.Geteuid() != 0 {
		SkipOrFail(t, "needs root: %s", why)
	}
}

// RequireTool needs a program in PATH and returns its path; debianPackage is what provides
// it (test/deps.sh installs it).
func RequireTool(t testing.TB, name, debianPackage string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		SkipOrFail(t, "required tool %s is missing (apt-get install %s)", name, debianPackage)
	}
	return p
}

// HaveTool is for an optional cross-check with another tool: it reports whether the tool is
// in PATH; when it is not, the test logs that the check is left out, or under CI fails.
func HaveTool(t testing.TB, name, debianPackage string) bool {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		if CI() {
			t.Fatalf("CI: required tool %s is missing (apt-get install %s)", name, debianPackage)
		}
		t.Logf("%s is not installed (apt-get install %s): its cross-check is left out", name, debianPackage)
		return false
	}
	return true
}

// RequireFile needs a file or directory; how says how to get it: a Debian package name
// ("ovmf") or a command ("make guest").
func RequireFile(t testing.TB, path, how string) {
	t.Helper()
	if _, err := os.Stat(path); err != nil {
		SkipOrFail(t, "required file %s is missing (%s)", path, how)
	}
}

// Guest is how to get the guest root filesystems of /var/cache/berth-e2e.
const Guest = "make guest, or go run ./test/e2e/cmd/mkguest -recipe all; needs root and mmdebstrap"

// RequireFeature routes a feature probe: nil returns; an error that is one of the
// sentinels (the feature is missing from this kernel or filesystem) skips, or fails under
// CI, naming the feature; any other error fails the test, because it is a regression and
// not a missing feature.
func RequireFeature(t testing.TB, err error, feature string, sentinels ...error) {
	t.Helper()
	if err == nil {
		return
	}
	for _, s := range sentinels {
		if errors.Is(err, s) {
			SkipOrFail(t, "required kernel feature %s is missing: %v", feature, err)
			return
		}
	}
	t.Fatalf("%s: %v", feature, err)
}
