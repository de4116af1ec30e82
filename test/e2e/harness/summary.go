package harness

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

// Summary collects one row per scenario step for the table printed at the end of a run.
type Summary struct {
	mu   sync.Mutex
	rows []SummaryRow
}

// SummaryRow is one line of the table.
type SummaryRow struct {
	Scenario string
	Result   string // PASS, FAIL, SKIP; INFO for a measurement (not counted in the total)
	Seconds  float64
	Note     string
}

// Add appends a row.
func (s *Summary) Add(scenario, result string, d time.Duration, note string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rows = append(s.rows, SummaryRow{scenario, result, d.Seconds(), note})
}

// Rows returns a copy of the rows.
func (s *Summary) Rows() []SummaryRow {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]SummaryRow(nil), s.rows...)
}

// Print writes the table.
func (s *Summary) Print(w io.Writer) {
	rows := s.Rows()
	width := len("scenario")
	for _, r := range rows {
		width = max(width, len(r.Scenario))
	}
	line := strings.Repeat("-", width+2+6+2+9+2+40)
	fmt.Fprintln(w, line)
	fmt.Fprintf(w, "%-*s  %-6s  %9s  %s\n", width, "scenario", "result", "seconds", "note")
	fmt.Fprintln(w, line)
	var total float64
	for _, r := range rows {
		fmt.Fprintf(w, "%-*s  %-6s  %9.1f  %s\n", width, r.Scenario, r.Result, r.Seconds, r.Note)
		if r.Result != "INFO" {
			total += r.Seconds
		}
	}
	fmt.Fprintln(w, line)
	fmt.Fprintf(w, "%-*s  %-6s  %9.1f  %s\n", width, "total", "", total, "(steps; INFO rows are measurements inside them)")
}

// WriteFile writes the table to path.
func (s *Summary) WriteFile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	s.Print(f)
	return f.Close()
}
