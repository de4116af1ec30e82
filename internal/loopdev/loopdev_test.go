package loopdev

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testenv"
)

func TestAttachPartitions(t *testing.T) {
	testenv.RequireRoot(t, "loop devices")
	testenv.RequireTool(t, "sgdisk", "gdisk")
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("sgdisk", "-n", "1:2048:+8M", "-n", "2:0:0", img).CombinedOutput(); err != nil {
		t.Fatalf("sgdisk: %v\n%s", err, out)
	}
	d, err := Attach(img, Options{PartScan: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Detach()
	if got := BackingFile(d.Path); got != img {
		t.Errorf("backing file = %q, want %q", got, img)
	}
	if !KernelReadsGPT() {
		// By design, also under CI: a kernel option of the host, and install does not need it.
		t.Skip("this kernel has no GPT partition support (CONFIG_EFI_PARTITION); windows are tested in TestAttachWindow")
	}
	for _, n := range []int{1, 2} {
		p, err := d.Partition(n, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		size, _ := f.Seek(0, 2)
		f.Close()
		if n == 1 && size != 8<<20 {
			t.Errorf("partition 1 is %d bytes, want %d", size, 8<<20)
		}
	}
	if _, err := d.Partition(3, 200*time.Millisecond); err == nil {
		t.Error("partition 3 should not exist")
	}
	dev := d.Path
	if err := d.Detach(); err != nil {
		t.Fatal(err)
	}
	if got := BackingFile(dev); got != "" {
		t.Errorf("after detach, %s still backs %s", got, dev)
	}
}

func TestAttachWindow(t *testing.T) {
	testenv.RequireRoot(t, "loop devices")
	img := filepath.Join(t.TempDir(), "disk.img")
	data := make([]byte, 3<<20)
	for i := range data {
		data[i] = byte(i / 4096)
	}
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := Attach(img, Options{Offset: 1 << 20, SizeLimit: 1 << 20, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Detach()
	got, err := os.ReadFile(d.Path)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != string(data[1<<20:2<<20]) {
		t.Fatalf("window content differs (got %d bytes)", len(got))
	}
	if err := d.Detach(); err != nil {
		t.Fatal(err)
	}
}
