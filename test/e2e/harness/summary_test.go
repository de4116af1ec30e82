package harness

import (
	"strings"
	"testing"
	"time"
)

func TestSummaryTotalsSteps(t *testing.T) {
	var s Summary
	s.Add("a/install", "PASS", 2*time.Second, "")
	s.Add("a/boot-to-ssh", "INFO", 100*time.Second, "measurement")
	s.Add("a/boot", "FAIL", 3*time.Second, "")
	var b strings.Builder
	s.Print(&b)
	rows := map[string][]string{}
	for _, line := range strings.Split(b.String(), "\n") {
		if f := strings.Fields(line); len(f) >= 2 {
			rows[f[0]] = f[1:]
		}
	}
	for name, want := range map[string]string{"a/install": "PASS 2.0", "a/boot-to-ssh": "INFO 100.0", "a/boot": "FAIL 3.0", "total": "5.0"} {
		if got := strings.Join(rows[name], " "); !strings.HasPrefix(got, want) {
			t.Errorf("row %s = %q, want %q…\n%s", name, got, want, b.String())
		}
	}
}
