package testenv

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
)

// recorder is a testing.TB that records Skip and Fatal instead of ending the goroutine
// (a real Fatal or Skip calls runtime.Goexit; recorder panics and outcome recovers).
type recorder struct {
	testing.TB
	skipped, failed string
}

type stop struct{}

func (r *recorder) Helper()                      {}
func (r *recorder) Logf(format string, a ...any) {}
func (r *recorder) Skip(args ...any)             { r.skipped = fmt.Sprint(args...); panic(stop{}) }
func (r *recorder) Fatalf(format string, a ...any) {
	r.failed = fmt.Sprintf(format, a...)
	panic(stop{})
}

func outcome(f func(t testing.TB)) (r *recorder) {
	r = &recorder{}
	defer func() {
		if v := recover(); v != nil {
			if _, ok := v.(stop); !ok {
				panic(v)
			}
		}
	}()
	f(r)
	return r
}

func TestMissingToolSkipsLocallyAndFailsInCI(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	need := func(t testing.TB) { RequireTool(t, "swtpm", "swtpm") }
	t.Setenv("CI", "")
	if r := outcome(need); r.skipped == "" || r.failed != "" || !strings.Contains(r.skipped, "swtpm") {
		t.Errorf("without CI: skipped %q failed %q", r.skipped, r.failed)
	}
	t.Setenv("CI", "true")
	r := outcome(need)
	if r.failed != "CI: required tool swtpm is missing (apt-get install swtpm)" || r.skipped != "" {
		t.Errorf("under CI: skipped %q failed %q", r.skipped, r.failed)
	}
}

func TestPresentThingsPass(t *testing.T) {
	t.Setenv("CI", "true")
	if r := outcome(func(t testing.TB) { RequireTool(t, "sh", "dash"); RequireFile(t, "/", "base-files") }); r.failed != "" || r.skipped != "" {
		t.Errorf("%+v", r)
	}
	missing := filepath.Join(t.TempDir(), "x")
	if r := outcome(func(t testing.TB) { RequireFile(t, missing, "ovmf") }); !strings.HasPrefix(r.failed, "CI: required file") {
		t.Errorf("%+v", r)
	}
}

func TestFeatureProbeFailsOnOtherErrors(t *testing.T) {
	errNoErofs := errors.New("no erofs")
	wrapped := fmt.Errorf("mount: %w", errNoErofs)
	t.Setenv("CI", "")
	if r := outcome(func(t testing.TB) { RequireFeature(t, wrapped, "EROFS", errNoErofs) }); r.skipped == "" {
		t.Errorf("missing feature did not skip: %+v", r)
	}
	// Anything else is a regression: it fails even outside CI.
	if r := outcome(func(t testing.TB) { RequireFeature(t, errors.New("EINVAL"), "EROFS", errNoErofs) }); r.failed == "" {
		t.Errorf("another error skipped: %+v", r)
	}
	if r := outcome(func(t testing.TB) { RequireFeature(t, nil, "EROFS", errNoErofs) }); r.failed != "" || r.skipped != "" {
		t.Errorf("nil: %+v", r)
	}
	t.Setenv("CI", "1")
	if r := outcome(func(t testing.TB) { RequireFeature(t, wrapped, "EROFS", errNoErofs) }); !strings.Contains(r.failed, "CI: required kernel feature EROFS is missing") {
		t.Errorf("under CI: %+v", r)
	}
}

func TestOptionalCrossCheckIsRequiredInCI(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	t.Setenv("CI", "")
	var have bool
	if r := outcome(func(t testing.TB) { have = HaveTool(t, "cpio", "cpio") }); have || r.failed != "" || r.skipped != "" {
		t.Errorf("without CI: have %v %+v", have, r)
	}
	t.Setenv("CI", "true")
	if r := outcome(func(t testing.TB) { HaveTool(t, "cpio", "cpio") }); r.failed != "CI: required tool cpio is missing (apt-get install cpio)" {
		t.Errorf("under CI: %+v", r)
	}
}
