package e2e

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/localchanges"
	"github.com/berth-dev/berth/test/e2e/harness"
)

// TestLocalChanges: on a running berth system, berth diff lists changes made through the
// root (through berthd), berth reset of the booted deployment is recorded and applied by
// berth-init at the next boot (before the overlay is mounted), other changes stay;
// berth commit explains what to do when the base image is not reachable from the guest,
// and once it is (the archive copied to where image_ref points) commits the booted
// deployment's changes into an image that berth pulls and mounts with base + changes.
func TestLocalChanges(t *testing.T) {
	setup(t)
	g := installGuest(t, "local", harness.Trixie)
	if g == nil {
		return
	}
	defer g.stop(t)
	step(t, "local/reset-at-next-boot", func(t *testing.T) {
		g.bootDirect(t, "1-changes")
		var bj bootJSON
		if err := json.Unmarshal([]byte(g.must(t, "cat /run/berth/boot.json")), &bj); err != nil || bj.Deploy == "" {
			t.Fatalf("boot.json: %+v %v", bj, err)
		}
		imageMotd := g.must(t, "cat /etc/motd")
		g.must(t, `set -e; echo 'local motd' > /etc/motd; echo kept > /usr/local/bin/kept; rm /etc/issue.net; sync`)

		var diff localchanges.DiffResult
		out := g.must(t, "berth diff --json")
		if err := json.Unmarshal([]byte(out), &diff); err != nil {
			t.Fatalf("berth diff --json: %v\n%s", err, out)
		}
		got := map[string]string{}
		for _, c := range diff.Changes {
			got[c.Path] = c.Kind
		}
		if diff.Deployment != bj.Deploy || got["/etc/motd"] != "modified" || got["/usr/local/bin/kept"] != "added" || got["/etc/issue.net"] != "deleted" {
			t.Errorf("berth diff --json on %s: %s", bj.Deploy, out)
		}

		out = g.must(t, "berth reset /etc/motd /etc/issue.net")
		if !strings.Contains(out, "reset at next boot: 2 paths") {
			t.Errorf("berth reset: %q", out)
		}
		// Recorded, not applied: the upper layer is in use.
		if got := g.must(t, "cat /etc/motd"); got != "local motd\n" {
			t.Errorf("/etc/motd right after berth reset: %q", got)
		}
		g.must(t, "test -f /sysroot/berth/deploy/"+bj.Deploy+"/reset.json || test -f /berth/deploy/"+bj.Deploy+"/reset.json")

		g.bootDirect(t, "2-after-reset")
		if got := g.must(t, "cat /etc/motd"); got != imageMotd {
			t.Errorf("/etc/motd after the reset boot: %q, want the image's %q", got, imageMotd)
		}
		g.check(t, "/etc/issue.net back", "test -f /etc/issue.net")
		if got := g.check(t, "untouched change", "cat /usr/local/bin/kept"); got != "kept\n" {
			t.Errorf("/usr/local/bin/kept after the reset boot: %q", got)
		}
		g.check(t, "reset.json gone", "! test -e /berth/deploy/"+bj.Deploy+"/reset.json")
		out = g.must(t, "berth diff")
		if strings.Contains(out, "/etc/motd") || !strings.Contains(out, "A /usr/local/bin/kept") {
			t.Errorf("berth diff after the reset boot:\n%s", out)
		}
		// The image was installed from an archive on the host: commit must say how to go on.
		res, _ := g.vm.Run(context.Background(), 5*time.Minute, "berth commit --tag oci-archive:/var/tmp/c.tar 2>&1; echo rc=$?")
		if !strings.Contains(res.Stdout, "--base") || !strings.Contains(res.Stdout, "rc=1") {
			t.Errorf("berth commit with an unreachable base:\n%s\n%s", res.Stdout, res.Stderr)
		}
	})
	step(t, "local/commit", func(t *testing.T) {
		if g.vm == nil {
			t.Fatal("no running guest")
		}
		// The base image where the deployment's image_ref says it is.
		ref := g.img.Ref()
		path, ok := strings.CutPrefix(ref, "oci-archive:")
		if !ok {
			t.Skipf("guest image %s is not an oci-archive", ref)
		}
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		cp := exec.CommandContext(ctx, "ssh", append(g.vm.SSHArgs(), "--", "mkdir -p "+filepath.Dir(path)+" && cat > "+path)...)
		cp.Stdin = f
		if out, err := cp.CombinedOutput(); err != nil {
			t.Fatalf("copy %s into the guest: %v\n%s", path, err, out)
		}
		g.must(t, `set -e; echo 'committed motd' > /etc/motd; rm /etc/issue; sync`)
		res, err := g.vm.Run(context.Background(), 10*time.Minute, "berth commit --json --message e2e --tag oci-archive:/var/tmp/c.tar")
		if err != nil {
			t.Fatalf("berth commit: %v\n%s\n%s", err, res.Stdout, res.Stderr)
		}
		var cr struct {
			BaseManifest string `json:"base_manifest_digest"`
			Stats        struct{ Entries, Whiteouts int }
		}
		if err := json.Unmarshal([]byte(res.Stdout), &cr); err != nil || cr.BaseManifest == "" || cr.Stats.Whiteouts != 1 {
			t.Errorf("berth commit --json: %v\n%s", err, res.Stdout)
		}
		t.Logf("commit: %s", strings.TrimSpace(res.Stdout))
		res, err = g.vm.Run(context.Background(), 10*time.Minute, "berth image pull oci-archive:/var/tmp/c.tar && mkdir -p /mnt/c && berth image mount oci-archive:/var/tmp/c.tar /mnt/c")
		if err != nil {
			t.Fatalf("pull and mount the committed image: %v\n%s\n%s", err, res.Stdout, res.Stderr)
		}
		got := g.check(t, "committed image content", "cat /mnt/c/etc/motd /mnt/c/usr/local/bin/kept; test -f /mnt/c/etc/os-release && test -f /mnt/c/etc/issue.net && echo base-ok; test -e /mnt/c/etc/issue || echo issue-deleted")
		if want := "committed motd\nkept\nbase-ok\nissue-deleted\n"; got != want {
			t.Errorf("committed image:\n%s\nwant:\n%s", got, want)
		}
		g.check(t, "unmount", "umount /mnt/c")
	})
}
