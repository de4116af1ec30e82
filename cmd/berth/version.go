package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/berth-dev/berth/internal/version"
)

func init() { addCommand(newVersionCmd) }

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print berth's version, commit, Go version and the on-disk format versions it writes",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			info := version.Get()
			if global.JSON {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(info)
			}
			commit := info.Commit
			if commit == "" {
				commit = "unknown"
			}
			fmt.Printf("berth %s\n  commit:     %s\n  go:         %s %s\n  composefs:  header version %d, format version up to %d\n  store:      layout version %d\n",
				info.Version, commit, info.GoVersion, info.Platform, info.ComposefsHeader, info.ComposefsFormat, info.StoreLayout)
			return nil
		},
	}
}
