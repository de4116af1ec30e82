// Command berth-generator is a systemd generator: see
// internal/setuproot/generator. systemd runs it as
// "berth-generator NORMAL_DIR [EARLY_DIR LATE_DIR]".
//
// For tests, --cmdline FILE (or $BERTH_GENERATOR_CMDLINE, a file path, or
// $SYSTEMD_PROC_CMDLINE, the text, as systemd itself honors) replaces
// /proc/cmdline, and $SYSTEMD_IN_INITRD=1|0 overrides the initrd check.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/berth-dev/berth/internal/setuproot/generator"
)

func main() {
	cmdlineFile := flag.String("cmdline", os.Getenv("BERTH_GENERATOR_CMDLINE"), "read the kernel command line from `FILE`")
	flag.Parse()
	if flag.NArg() != 1 && flag.NArg() != 3 {
		fmt.Fprintln(os.Stderr, "usage: berth-generator [--cmdline FILE] NORMAL_DIR [EARLY_DIR LATE_DIR]")
		os.Exit(1)
	}
	text, ok := os.LookupEnv("SYSTEMD_PROC_CMDLINE")
	if !ok || *cmdlineFile != "" {
		path := *cmdlineFile
		if path == "" {
			path = "/proc/cmdline"
		}
		b, err := os.ReadFile(path)
		if err != nil {
			fmt.Fprintf(os.Stderr, "berth-generator: %v\n", err)
			os.Exit(0) // nothing we can do; never fail the boot transaction here
		}
		text = string(b)
	}
	inInitrd := false
	if v, ok := os.LookupEnv("SYSTEMD_IN_INITRD"); ok {
		inInitrd = v == "1" || v == "yes" || v == "true"
	} else if _, err := os.Stat("/etc/initrd-release"); err == nil {
		inInitrd = true
	}
	res, err := generator.Run(generator.Options{Cmdline: text, InInitrd: inInitrd, NormalDir: flag.Arg(0)})
	if err != nil {
		fmt.Fprintf(os.Stderr, "berth-generator: %v\n", err)
		os.Exit(1)
	}
	if res.Wired {
		fmt.Fprintf(os.Stderr, "berth-generator: %s\n", res.Message)
	}
}
