package main

import (
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

func init() { addCommand(newDocsCmd) }

// newDocsCmd generates the man pages from the command definitions, so the
// pages never drift from the flags (docs/man is made by `make man`).
func newDocsCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:    "docs",
		Short:  "Generate documentation from the command definitions",
		Hidden: true,
	}
	cmd.AddCommand(&cobra.Command{
		Use:   "man DIR",
		Short: "Write a man page (section 1) for every berth command into DIR",
		Args:  cobra.ExactArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			if err := os.MkdirAll(args[0], 0o755); err != nil {
				return fmt.Errorf("man pages: %w", err)
			}
			root := c.Root()
			root.DisableAutoGenTag = true
			// A fixed date keeps the pages reproducible (a test compares them
			// with docs/man); cobra would otherwise stamp the current month.
			date := time.Date(2026, time.November, 1, 0, 0, 0, 0, time.UTC)
			hdr := &doc.GenManHeader{Title: "BERTH", Section: "1", Source: "berth", Manual: "berth manual", Date: &date}
			if err := doc.GenManTree(root, hdr, args[0]); err != nil {
				return fmt.Errorf("man pages into %s: %w", args[0], err)
			}
			return nil
		},
	})
	return cmd
}
