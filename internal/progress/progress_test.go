package progress

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func TestPlain(t *testing.T) {
	var buf bytes.Buffer
	r := New(&buf, Options{}) // a bytes.Buffer is not a terminal
	if r.Mode() != Plain {
		t.Fatalf("mode %v, want Plain", r.Mode())
	}
	a := r.Start("layer a", 100)
	a.Add(40)
	a.Write(make([]byte, 60))
	a.Done(nil, "")
	b := r.Start("layer b", 0)
	b.Done(errors.New("boom"), "")
	r.Message("hello %d", 1)
	want := "layer a ...\nlayer a: done\nlayer b ...\nlayer b: failed: boom\nhello 1\n"
	if buf.String() != want {
		t.Errorf("got %q, want %q", buf.String(), want)
	}
}

func TestQuietAndNil(t *testing.T) {
	var buf bytes.Buffer
	r := New(&buf, Options{Quiet: true, JSON: true})
	task := r.Start("x", 1)
	task.Add(1)
	task.Done(nil, "")
	r.Message("nothing")
	if buf.Len() != 0 {
		t.Errorf("quiet printed %q", buf.String())
	}
	var nilRep *Reporter // a nil Reporter is silent, so callers need no checks
	nt := nilRep.Start("y", 1)
	nt.Add(1)
	nt.Done(nil, "")
	nilRep.Message("x")
}

func TestJSON(t *testing.T) {
	var buf bytes.Buffer
	r := New(&buf, Options{JSON: true})
	task := r.Start("layer a", 10)
	task.Add(10)
	task.Done(nil, "3 entries")
	r.Start("layer b", 5).Done(errors.New("bad digest"), "")
	var events []Event
	sc := bufio.NewScanner(&buf)
	for sc.Scan() {
		var ev Event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("line %q is not JSON: %v", sc.Text(), err)
		}
		events = append(events, ev)
	}
	var kinds []string
	for _, ev := range events {
		kinds = append(kinds, ev.Event+":"+ev.Task)
	}
	got := strings.Join(kinds, " ")
	// The first progress event of a task is emitted at once, later ones are rate-limited.
	if got != "start:layer a progress:layer a done:layer a start:layer b error:layer b" {
		t.Errorf("events %s", got)
	}
	last := events[len(events)-1]
	if last.Message != "bad digest" || events[2].Current != 10 || events[2].Message != "3 entries" {
		t.Errorf("event fields wrong: %+v", events)
	}
}

// With bars, a second task waits for the first one's bar and still
// reports its own completion.
func TestBarsOneAtATime(t *testing.T) {
	var buf bytes.Buffer
	r := New(&buf, Options{Mode: Bar})
	a := r.Start("layer a", 100)
	b := r.Start("layer b", 100)
	b.Add(50)
	a.Add(100)
	a.Done(nil, "")
	if r.active != b {
		t.Fatal("second task did not get the bar")
	}
	b.Add(50)
	b.Done(nil, "")
	if r.active != nil || len(r.waiting) != 0 {
		t.Fatal("bar state not cleared")
	}
	if !strings.Contains(buf.String(), "layer a") || !strings.Contains(buf.String(), "layer b") {
		t.Errorf("bar output missing task names: %q", buf.String())
	}
}
