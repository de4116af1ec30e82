package qemu

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"time"
)

// SilenceEnv names the variable that overrides the silence bound (a Go duration, e.g. 10m).
const SilenceEnv = "BERTH_QEMU_SILENCE"

// SilenceBound is how long a guest may print nothing on its console before its qemu is
// killed: BERTH_QEMU_SILENCE if set, else 5 minutes under TCG (a boot's longest quiet
// stretch, firmware plus kernel and initrd decompression on a loaded machine, is well under
// that) and 2 minutes under KVM.
func SilenceBound(a Accel) time.Duration {
	if v := os.Getenv(SilenceEnv); v != "" {
		if d, err := time.ParseDuration(v); err == nil && d > 0 {
			return d
		}
	}
	if a == KVM {
		return 2 * time.Minute
	}
	return 5 * time.Minute
}

// tailBytes is how much console output a Watchdog keeps for its report.
const tailBytes = 8 << 10

// Watchdog kills a guest whose console stays silent for longer than its bound. Every byte
// of console output goes through Write (use it as, or in an io.MultiWriter with, qemu's
// serial output); the last few KiB are kept for the report.
type Watchdog struct {
	bound time.Duration
	kill  func()

	mu     sync.Mutex
	timer  *time.Timer
	last   time.Time
	tail   []byte
	paused bool
	fired  bool
}

// A nil *Watchdog watches nothing: every method is a no-op (a VM without a bound).

// NewWatchdog starts counting now; kill is called once, from another goroutine, when the
// console has been silent for bound.
func NewWatchdog(bound time.Duration, kill func()) *Watchdog {
	w := &Watchdog{bound: bound, kill: kill, last: time.Now()}
	w.timer = time.AfterFunc(bound, w.expire)
	return w
}

func (w *Watchdog) expire() {
	w.mu.Lock()
	// A Write may have raced with the timer: only a real silence fires.
	if w.paused || w.fired || time.Since(w.last) < w.bound {
		if !w.paused && !w.fired {
			w.timer.Reset(w.bound - time.Since(w.last))
		}
		w.mu.Unlock()
		return
	}
	w.fired = true
	w.mu.Unlock()
	w.kill()
}

// Write records console output.
func (w *Watchdog) Write(p []byte) (int, error) {
	if w == nil {
		return len(p), nil
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.last = time.Now()
	w.tail = append(w.tail, p...)
	if len(w.tail) > 2*tailBytes {
		w.tail = append([]byte(nil), w.tail[len(w.tail)-tailBytes:]...)
	}
	return len(p), nil
}

// Kick records console activity whose bytes are kept elsewhere (a partial line, say).
func (w *Watchdog) Kick() {
	if w == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.last = time.Now()
}

// Pause stops counting: the guest is driven by other means (SSH) and may be quiet.
func (w *Watchdog) Pause() {
	if w == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.paused = true
	w.timer.Stop()
}

// Resume counts again, from now.
func (w *Watchdog) Resume() {
	if w == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.paused || w.fired {
		return
	}
	w.paused = false
	w.last = time.Now()
	w.timer.Reset(w.bound)
}

// Stop ends the watch (the guest exited or the test is done with it).
func (w *Watchdog) Stop() { w.Pause() }

// Err is a *SilentError if the watchdog killed the guest, else nil.
func (w *Watchdog) Err() error {
	if w == nil {
		return nil
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.fired {
		return nil
	}
	return &SilentError{Bound: w.bound, Tail: lastLines(string(w.tail), 30)}
}

// Tail returns the last n lines of the console output seen.
func (w *Watchdog) Tail(n int) string {
	if w == nil {
		return ""
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return lastLines(string(w.tail), n)
}

// SilentError reports a guest killed for silence, with the end of its console.
type SilentError struct {
	Bound time.Duration
	Tail  string
}

func (e *SilentError) Error() string {
	tail := e.Tail
	if strings.TrimSpace(tail) == "" {
		tail = "(nothing)"
	}
	return fmt.Sprintf("guest printed nothing on its console for %s (%s to change): qemu killed; console tail:\n%s",
		e.Bound, SilenceEnv, tail)
}

func lastLines(s string, n int) string {
	s = strings.ReplaceAll(s, "\r", "")
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
