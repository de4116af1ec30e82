package harness

import (
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// NewRunDir creates the directory that holds every log and disk of one run:
// $BERTH_E2E_OUT if set, else <src>/out/e2e/<UTC timestamp>.
func NewRunDir() (string, error) {
	dir := os.Getenv("BERTH_E2E_OUT")
	if dir == "" {
		src, err := RepoRoot()
		if err != nil {
			return "", err
		}
		dir = filepath.Join(src, "out", "e2e", time.Now().UTC().Format("20060102-150405"))
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("run dir: %w", err)
	}
	return filepath.Abs(dir)
}
