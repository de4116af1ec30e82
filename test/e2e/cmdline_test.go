package e2e

import "testing"

func TestWithArgs(t *testing.T) {
	for _, c := range []struct {
		in   string
		args []string
		want string
	}{
		{"root=PARTUUID=x rw console=ttyS0,115200 console=tty0", []string{"console=ttyS0,115200"}, "root=PARTUUID=x rw console=ttyS0,115200"},
		{"root=a berth.local=persistent quiet", []string{"console=ttyS0,115200", "berth.local=transient"}, "root=a quiet console=ttyS0,115200 berth.local=transient"},
		{"root=a", []string{"berth.local=transient"}, "root=a berth.local=transient"},
	} {
		if got := withArgs(c.in, c.args...); got != c.want {
			t.Errorf("withArgs(%q, %q) = %q, want %q", c.in, c.args, got, c.want)
		}
	}
}
