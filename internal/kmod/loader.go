package kmod

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Loader loads the modules of one module directory (berth's initramfs:
// /usr/lib/modules/<kver>) in parallel: every module in its own goroutine,
// started as soon as the modules it depends on are in. The kernel
// decompresses and links independent modules concurrently, and a slow
// probe (AHCI scanning its ports) no longer delays the next driver.
//
// Which modules: the ones asked for by path, and the ones whose aliases
// match the modalias of a present device (Coldplug) or of a device that
// appears later (Hotplug: the kernel's uevents), like udev would.
type Loader struct {
	dir   string
	ix    *Index
	start time.Time

	mu   sync.Mutex
	jobs map[string]*job // by module path
	wg   sync.WaitGroup

	hotplug *os.File
	hpDone  chan struct{}
}

type job struct {
	done chan struct{}
	res  Result
}

// NewLoader reads dir's modules.dep, modules.softdep and modules.alias.
func NewLoader(dir string) (*Loader, error) {
	ix, err := ReadIndex(os.DirFS(dir), ".")
	if err != nil {
		return nil, err
	}
	return &Loader{dir: dir, ix: ix, start: time.Now(), jobs: map[string]*job{}}, nil
}

// Index returns the loader's module metadata.
func (l *Loader) Index() *Index { return l.ix }

// LoadPaths starts loading the modules at paths (relative to the module
// directory) and their dependencies; it does not wait. It returns the
// jobs' done channels, for Wait.
func (l *Loader) LoadPaths(paths ...string) []<-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []<-chan struct{}
	for _, p := range paths {
		if _, known := l.ix.Deps[p]; !known {
			// Not in modules.dep: load it anyway (no known dependencies).
			l.ix.Deps[p] = nil
		}
		out = append(out, l.startLocked(p, map[string]bool{}).done)
	}
	return out
}

// LoadNames is LoadPaths by module name; unknown names are ignored and
// returned.
func (l *Loader) LoadNames(names ...string) (unknown []string) {
	var paths []string
	for _, n := range names {
		if p, ok := l.ix.Path[normalize(n)]; ok {
			paths = append(paths, p)
		} else {
			unknown = append(unknown, n)
		}
	}
	l.LoadPaths(paths...)
	return unknown
}

// startLocked registers p and its dependencies (depth first) and starts a
// goroutine per new module that waits for its dependencies, then loads.
// Edges back into the current path (a cycle in hostile metadata) are
// dropped, so the waits form a DAG and cannot deadlock.
func (l *Loader) startLocked(p string, onPath map[string]bool) *job {
	if j, ok := l.jobs[p]; ok {
		return j
	}
	onPath[p] = true
	var deps []*job
	for _, d := range l.ix.DirectDeps(p) {
		if onPath[d] {
			continue
		}
		deps = append(deps, l.startLocked(d, onPath))
	}
	delete(onPath, p)
	j := &job{done: make(chan struct{})}
	l.jobs[p] = j
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		defer close(j.done)
		for _, d := range deps {
			<-d.done
		}
		j.res = Load(filepath.Join(l.dir, p))
		j.res.Path = p
	}()
	return j
}

// Wait waits for the given jobs (all started jobs when none are given).
func (l *Loader) Wait(done ...<-chan struct{}) {
	if len(done) == 0 {
		l.wg.Wait()
		return
	}
	for _, d := range done {
		<-d
	}
}

// LoadAlias starts loading the modules matching a device's modalias and
// returns their names.
func (l *Loader) LoadAlias(modalias string) []string {
	names := l.ix.Match(modalias)
	l.LoadNames(names...)
	return names
}

// Coldplug reads the modalias of every device the kernel has found so far
// (sysfs: <sys>/bus/*/devices/*/modalias) and starts loading the matching
// modules. sys is normally "/sys".
func (l *Loader) Coldplug(sys string) (devices int, err error) {
	buses, err := os.ReadDir(filepath.Join(sys, "bus"))
	if err != nil {
		return 0, fmt.Errorf("coldplug: %w", err)
	}
	for _, b := range buses {
		dir := filepath.Join(sys, "bus", b.Name(), "devices")
		devs, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, d := range devs {
			raw, err := os.ReadFile(filepath.Join(dir, d.Name(), "modalias"))
			if err != nil {
				continue
			}
			if alias := strings.TrimSpace(string(raw)); alias != "" {
				devices++
				l.LoadAlias(alias)
			}
		}
	}
	return devices, nil
}

// StartHotplug listens to the kernel's uevents and loads the modules
// matching every device that appears from now on (a SCSI disk behind a
// controller whose driver was just loaded, a USB stick behind xHCI). Open
// it before Coldplug so no device falls between the two. StopHotplug ends it.
func (l *Loader) StartHotplug() error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_KOBJECT_UEVENT)
	if err != nil {
		return fmt.Errorf("hotplug: uevent socket: %w", err)
	}
	// A burst of devices must not overflow the socket (ENOBUFS drops events).
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4<<20)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1}); err != nil {
		unix.Close(fd)
		return fmt.Errorf("hotplug: bind uevent socket: %w", err)
	}
	// os.NewFile on a non-blocking fd uses the runtime poller, so Close
	// (StopHotplug) wakes the reader.
	f := os.NewFile(uintptr(fd), "uevent")
	l.hotplug, l.hpDone = f, make(chan struct{})
	go func() {
		defer close(l.hpDone)
		buf := make([]byte, 64<<10)
		for {
			n, err := f.Read(buf)
			if err != nil {
				if errors.Is(err, unix.ENOBUFS) {
					l.Coldplug("/sys") // events were lost: rescan
					continue
				}
				return // closed
			}
			if alias := ueventModalias(buf[:n]); alias != "" {
				l.LoadAlias(alias)
			}
		}
	}()
	return nil
}

// StopHotplug stops listening to uevents (before switching root: the real
// root's udev takes over, and replays what it missed with its coldplug).
func (l *Loader) StopHotplug() {
	if l.hotplug == nil {
		return
	}
	l.hotplug.Close()
	<-l.hpDone
	l.hotplug = nil
}

// ueventModalias returns MODALIAS of a kernel "add" uevent
// ("add@/devices/...\0ACTION=add\0...\0MODALIAS=...\0"), else "".
func ueventModalias(msg []byte) string {
	fields := strings.Split(string(msg), "\x00")
	if len(fields) == 0 || !strings.HasPrefix(fields[0], "add@") {
		return ""
	}
	for _, f := range fields[1:] {
		if v, ok := strings.CutPrefix(f, "MODALIAS="); ok {
			return v
		}
	}
	return ""
}

// Results returns the results of the finished jobs, sorted by path.
func (l *Loader) Results() []Result {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []Result
	for _, j := range l.jobs {
		select {
		case <-j.done:
			out = append(out, j.res)
		default:
		}
	}
	sort.Slice(out, func(a, b int) bool { return out[a].Path < out[b].Path })
	return out
}

// Summary counts the jobs by outcome, for the console.
func (l *Loader) Summary() string {
	counts := map[string]int{}
	var names []string
	results := l.Results()
	for _, r := range results {
		switch {
		case errors.Is(r.Err, unix.ENODEV):
			// The module's hardware or CPU feature is absent (crc32c-intel
			// without SSE4.2, ...): expected, not a failure.
			counts["no-device"]++
		case r.Err != nil:
			counts["failed"]++
		default:
			counts[r.How]++
			names = append(names, Name(r.Path))
		}
	}
	l.mu.Lock()
	pending := len(l.jobs) - len(results)
	l.mu.Unlock()
	return fmt.Sprintf("%d modules in %s (%d decompressed by the kernel, %d uncompressed, %d already loaded, %d not for this hardware, %d failed, %d still loading): %s",
		len(names), time.Since(l.start).Round(time.Millisecond), counts["finit-compressed"], counts["finit"], counts["already-loaded"], counts["no-device"], counts["failed"], pending, strings.Join(names, " "))
}

// Failures returns the errors of failed loads (ENODEV excluded).
func (l *Loader) Failures() []error {
	var out []error
	for _, r := range l.Results() {
		if r.Err != nil && !errors.Is(r.Err, unix.ENODEV) {
			out = append(out, r.Err)
		}
	}
	return out
}
