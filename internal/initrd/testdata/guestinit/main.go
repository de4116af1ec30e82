// Command guestinit is the init of the QEMU smoke test's image: it runs
// after berth-init switched root, reports what it sees on the console with
// "GUEST:" markers, and powers off.
package main

import (
	"fmt"
	"os"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

func say(format string, v ...any) { fmt.Printf("GUEST: "+format+"\n", v...) }

func measure(p string) string {
	f, err := os.Open(p)
	if err != nil {
		return "open: " + err.Error()
	}
	defer f.Close()
	var buf struct {
		hdr    unix.FsverityDigest
		digest [64]byte
	}
	buf.hdr.Size = 64
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.FS_IOC_MEASURE_VERITY, uintptr(unsafe.Pointer(&buf))); e != 0 {
		return "no fs-verity: " + e.Error()
	}
	return fmt.Sprintf("sha256:%x", buf.digest[:buf.hdr.Size])
}

func main() {
	say("pid=%d", os.Getpid())
	var st unix.Statfs_t
	unix.Statfs("/", &st)
	say("root fstype=%#x overlay=%v", st.Type, st.Type == unix.OVERLAYFS_SUPER_MAGIC)
	b, err := os.ReadFile("/usr/bin/hello")
	say("hello content ok=%v err=%v", err == nil && strings.HasPrefix(string(b), "berth external file content"), err)
	dpkg, err := os.ReadFile("/var/lib/dpkg/status")
	say("dpkg status %q err=%v", dpkg, err)
	_, err = os.Stat("/var/log")
	say("shared /var/log present=%v", err == nil)
	bj, err := os.ReadFile("/run/berth/boot.json")
	say("boot.json err=%v %s", err, strings.Join(strings.Fields(string(bj)), " "))
	img := "/berth/repo/images/" + os.Getenv("BERTH_DIGEST")
	if a, err := os.ReadFile("/proc/cmdline"); err == nil {
		for _, w := range strings.Fields(string(a)) {
			if v, ok := strings.CutPrefix(w, "berth.composefs="); ok {
				img = "/berth/repo/images/" + strings.TrimPrefix(v, "?")
			}
		}
	}
	say("image verity %s", measure(img))
	_, err = os.Stat("/berth/repo/verity-pending")
	say("verity-pending marker present=%v", err == nil)
	if _, err := os.Stat("/usr/local/first-boot"); err == nil {
		say("second boot: persistent change found")
	} else {
		os.MkdirAll("/usr/local", 0o755)
		err := os.WriteFile("/usr/local/first-boot", []byte("1\n"), 0o644)
		say("first boot: wrote /usr/local/first-boot err=%v", err)
	}
	m, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(m), "\n") {
		if f := strings.Fields(l); len(f) > 4 {
			say("mount %s", strings.Join(f[4:], " "))
		}
	}
	say("done")
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
}
