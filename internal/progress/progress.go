// Package progress reports the progress of long-running tasks (layer
// downloads, imports, ...) in the form the caller asked for: a progress bar
// per task on a terminal, plain lines otherwise, JSON-lines events for
// machines, or nothing at all.
package progress

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// Mode selects the output form.
type Mode int

const (
	Auto  Mode = iota // Bar on a terminal, Plain otherwise
	Bar               // a progress bar per task
	Plain             // one line when a task starts and one when it ends
	JSON              // one JSON object per line per event
	Quiet             // nothing
)

// Options configure a Reporter.
type Options struct {
	Quiet bool
	JSON  bool
	Mode  Mode // overrides Quiet/JSON when not Auto
}

// Event is one JSON-lines record.
type Event struct {
	Time    time.Time `json:"time"`
	Event   string    `json:"event"` // start, progress, done, error, message
	Task    string    `json:"task,omitempty"`
	Current int64     `json:"current,omitempty"`
	Total   int64     `json:"total,omitempty"`
	Message string    `json:"message,omitempty"`
}

// Reporter writes progress to one writer. It is safe for concurrent use.
// Only one bar is drawn at a time (terminals cannot interleave them); a
// task that starts while another has the bar takes it over when that one
// ends.
type Reporter struct {
	mu      sync.Mutex
	w       io.Writer
	mode    Mode
	active  *Task
	waiting []*Task
}

// New returns a Reporter writing to w. With Auto, w gets bars only when
// it is a terminal.
func New(w io.Writer, opts Options) *Reporter {
	mode := opts.Mode
	if mode == Auto {
		switch {
		case opts.Quiet:
			mode = Quiet
		case opts.JSON:
			mode = JSON
		case isTerminal(w):
			mode = Bar
		default:
			mode = Plain
		}
	}
	return &Reporter{w: w, mode: mode}
}

// Discard returns a Reporter that prints nothing.
func Discard() *Reporter { return &Reporter{w: io.Discard, mode: Quiet} }

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// Mode returns the output form in use.
func (r *Reporter) Mode() Mode {
	if r == nil {
		return Quiet
	}
	return r.mode
}

// Task is one unit of work with an optional total (bytes or items).
type Task struct {
	r        *Reporter
	name     string
	total    int64
	current  int64
	bar      *progressbar.ProgressBar
	lastJSON time.Time
	done     bool
}

// Start begins a task. total may be 0 when unknown.
func (r *Reporter) Start(name string, total int64) *Task {
	t := &Task{r: r, name: name, total: total}
	if r == nil {
		return t
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	switch r.mode {
	case Plain:
		fmt.Fprintf(r.w, "%s ...\n", name)
	case JSON:
		r.emit(Event{Event: "start", Task: name, Total: total})
	case Bar:
		if r.active == nil {
			r.giveBar(t)
		} else {
			r.waiting = append(r.waiting, t)
		}
	}
	return t
}

func (r *Reporter) giveBar(t *Task) {
	r.active = t
	max := t.total
	if max <= 0 {
		max = -1 // spinner
	}
	t.bar = progressbar.NewOptions64(max,
		progressbar.OptionSetWriter(r.w),
		progressbar.OptionSetDescription(t.name),
		progressbar.OptionShowBytes(true),
		progressbar.OptionSetWidth(30),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionShowCount(),
		progressbar.OptionOnCompletion(func() { fmt.Fprintln(r.w) }),
	)
	if t.current > 0 {
		_ = t.bar.Set64(t.current)
	}
}

// Add advances the task by n.
func (t *Task) Add(n int64) {
	r := t.r
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	t.current += n
	switch r.mode {
	case Bar:
		if t.bar != nil {
			_ = t.bar.Set64(t.current)
		}
	case JSON:
		if now := time.Now(); now.Sub(t.lastJSON) >= 500*time.Millisecond {
			t.lastJSON = now
			r.emit(Event{Event: "progress", Task: t.name, Current: t.current, Total: t.total})
		}
	}
}

// Write counts len(p) as progress, so a Task can sit behind io.TeeReader.
func (t *Task) Write(p []byte) (int, error) {
	t.Add(int64(len(p)))
	return len(p), nil
}

// Done ends the task; err (may be nil) is reported with it. msg, when not
// empty, replaces the default "done" text.
func (t *Task) Done(err error, msg string) {
	r := t.r
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if t.done {
		return
	}
	t.done = true
	if msg == "" {
		msg = "done"
	}
	switch r.mode {
	case Plain:
		if err != nil {
			fmt.Fprintf(r.w, "%s: failed: %v\n", t.name, err)
		} else {
			fmt.Fprintf(r.w, "%s: %s\n", t.name, msg)
		}
	case JSON:
		if err != nil {
			r.emit(Event{Event: "error", Task: t.name, Current: t.current, Total: t.total, Message: err.Error()})
		} else {
			r.emit(Event{Event: "done", Task: t.name, Current: t.current, Total: t.total, Message: msg})
		}
	case Bar:
		if t.bar != nil {
			if t.total > 0 && err == nil {
				_ = t.bar.Set64(t.total)
			}
			_ = t.bar.Finish()
			t.bar = nil
			if err != nil {
				fmt.Fprintf(r.w, "%s: failed: %v\n", t.name, err)
			} else if msg != "done" {
				fmt.Fprintf(r.w, "%s: %s\n", t.name, msg)
			}
			r.active = nil
			for len(r.waiting) > 0 && r.active == nil {
				next := r.waiting[0]
				r.waiting = r.waiting[1:]
				if !next.done {
					r.giveBar(next)
				}
			}
		} else {
			for i, w := range r.waiting {
				if w == t {
					r.waiting = append(r.waiting[:i], r.waiting[i+1:]...)
					break
				}
			}
			if err != nil {
				fmt.Fprintf(r.w, "%s: failed: %v\n", t.name, err)
			} else {
				fmt.Fprintf(r.w, "%s: %s\n", t.name, msg)
			}
		}
	}
}

// Message prints a line of information (not in Quiet mode).
func (r *Reporter) Message(format string, args ...any) {
	if r == nil || r.mode == Quiet {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	msg := fmt.Sprintf(format, args...)
	if r.mode == JSON {
		r.emit(Event{Event: "message", Message: msg})
		return
	}
	if r.active != nil && r.active.bar != nil {
		_ = r.active.bar.Clear()
	}
	fmt.Fprintln(r.w, msg)
}

func (r *Reporter) emit(ev Event) {
	ev.Time = time.Now().UTC()
	data, _ := json.Marshal(ev)
	r.w.Write(append(data, '\n'))
}
