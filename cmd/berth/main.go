// Command berth is the berth CLI. This package only defines commands and
// flags; the work is done in internal/.
//
// Each area of the CLI lives in its own file (composefs.go, image.go, ...)
// and adds its commands to the root from an init function with
// addCommand, so that areas can be developed independently.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/berth-dev/berth/internal/version"
)

// globalFlags are the flags every berth command accepts.
type globalFlags struct {
	Sysroot string
	JSON    bool
	Quiet   bool
}

var (
	global      globalFlags
	subcommands []func() *cobra.Command
)

// addCommand registers a constructor for a top-level command.
func addCommand(f func() *cobra.Command) { subcommands = append(subcommands, f) }

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "berth",
		Short:         "Boot any OCI image as a verified, transactionally updated Linux system",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version.Get().String(),
	}
	root.SetVersionTemplate("{{.Version}}\n")
	pf := root.PersistentFlags()
	pf.StringVar(&global.Sysroot, "sysroot", "/", "operate on the berth installation below `DIR` (its store is DIR/berth/repo)")
	pf.BoolVar(&global.JSON, "json", false, "print machine-readable JSON")
	pf.BoolVarP(&global.Quiet, "quiet", "q", false, "print only errors")
	for _, f := range subcommands {
		root.AddCommand(f())
	}
	return root
}

func main() {
	if err := newRootCmd().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "berth:", err)
		os.Exit(1)
	}
}
