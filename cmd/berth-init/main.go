// Command berth-init is PID 1 of berth's initramfs, and the worker of
// berth-setup-root.service in systemd initrds ("berth-init setup-root
// /sysroot"). The logic lives in internal/setuproot.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/berth-dev/berth/internal/cmdline"
	"github.com/berth-dev/berth/internal/etcmerge"
	"github.com/berth-dev/berth/internal/localchanges"
	"github.com/berth-dev/berth/internal/setuproot"
	"github.com/berth-dev/berth/internal/store"
)

func main() {
	if os.Getpid() == 1 {
		setuproot.Init(setuproot.InitConfig{Prepare: prepare})
		return // not reached
	}
	if len(os.Args) < 2 || os.Args[1] != "setup-root" {
		fmt.Fprintln(os.Stderr, "usage: berth-init setup-root [--cmdline FILE] [--run-dir DIR] SYSROOT\n(as PID 1 of an initramfs it needs no arguments)")
		os.Exit(2)
	}
	fs := flag.NewFlagSet("setup-root", flag.ExitOnError)
	cmdlineFile := fs.String("cmdline", "", "read the kernel command line from `FILE` instead of /proc/cmdline")
	runDir := fs.String("run-dir", "/run/berth", "berth's runtime `DIR` (boot.json, staging mounts)")
	fs.Parse(os.Args[2:])
	if fs.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "berth-init setup-root: exactly one SYSROOT argument expected")
		os.Exit(2)
	}
	args, err := cmdline.ReadProc(*cmdlineFile)
	if err != nil {
		fmt.Fprint(os.Stderr, setuproot.FormatError(&setuproot.Error{Reason: "the kernel command line is invalid", Fix: "fix the berth.* arguments of the boot entry", Err: err}))
		os.Exit(1)
	}
	if !args.Berth() {
		fmt.Fprintln(os.Stderr, "berth-init setup-root: no berth.composefs= on the kernel command line; nothing to do")
		return
	}
	rec, err := setuproot.Setup(setuproot.Options{Sysroot: fs.Arg(0), Args: args, RunDir: *runDir, Prepare: prepare})
	if err != nil {
		fmt.Fprint(os.Stderr, setuproot.FormatError(err))
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "berth: deployment %s (%s, verity %s) mounted at %s\n", rec.Deploy, rec.Local, rec.Verity, fs.Arg(0))
}

// prepare is setup-root's hook before the overlay is mounted: the
// first-boot /etc merge and carry-over of an upgraded deployment, then a
// reset `berth reset` recorded for it. A reset that fails is retried at
// the next boot (its record stays); it does not stop this one.
func prepare(physRoot, id string, local cmdline.LocalMode) error {
	l := store.At(physRoot)
	if err := etcmerge.Prepare(l, id, local); err != nil {
		return err
	}
	if err := localchanges.ApplyPendingReset(l, id); err != nil {
		fmt.Fprintf(os.Stderr, "berth: WARNING: %v\n", err)
	}
	return nil
}
