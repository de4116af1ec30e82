// Command berthd is berth's D-Bus service (org.berth1, DESIGN §7). It is
// started by bus activation (units/berthd.service, Type=dbus) and exits
// when idle. `berthd health` is the boot health check run by
// berth-healthcheck.service. This file only parses flags; the work is in
// internal/api and internal/health.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/berth-dev/berth/internal/api"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/health"
	"github.com/berth-dev/berth/internal/version"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var err error
	if len(os.Args) > 1 && (os.Args[1] == "--version" || os.Args[1] == "-version") {
		fmt.Println(version.Get().String())
		return
	}
	if len(os.Args) > 1 && os.Args[1] == "health" {
		err = runHealth(ctx, os.Args[2:])
	} else {
		err = runDaemon(ctx, os.Args[1:])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "berthd:", err)
		os.Exit(1)
	}
}

func runDaemon(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("berthd", flag.ExitOnError)
	var o api.DaemonOptions
	fs.StringVar(&o.Sysroot, "sysroot", "/", "serve the berth installation below `DIR`")
	fs.StringVar(&o.ESP, "esp", "", "the mounted ESP (`DIR`; default: efi, boot/efi or boot below the sysroot)")
	fs.DurationVar(&o.IdleTimeout, "idle-timeout", 60*time.Second, "exit after this long without a job or a call (0: never)")
	fs.StringVar(&o.Address, "address", "", "D-Bus `ADDRESS` to serve on (default: the system bus)")
	fs.StringVar(&o.PolicyPath, "policy", "", "containers-policy.json `FILE` for pulls (default: the usual lookup)")
	fs.BoolVar(&o.InsecureTLS, "insecure-tls", false, "allow plain HTTP and unverified TLS to registries")
	fs.Parse(args)
	if fs.NArg() != 0 {
		return fmt.Errorf("unexpected arguments %v", fs.Args())
	}
	return api.RunDaemon(ctx, o)
}

func runHealth(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("berthd health", flag.ExitOnError)
	var dirs multi
	timeout := fs.Duration("timeout", 2*time.Minute, "time limit per check")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	sysroot := fs.String("sysroot", "/", "record the result for the berth installation below `DIR`")
	noUnits := fs.Bool("no-units", false, "do not fail on failed systemd units")
	reboot := fs.Bool("reboot-on-failed-trial", false, "reboot when unhealthy and the booted boot entry is still being tried (boot counting) and another entry can boot")
	fs.Var(&dirs, "dir", "check directory (repeatable; default /usr/lib/berth/health.d and /etc/berth/health.d)")
	fs.Parse(args)
	opts := health.Options{Timeout: *timeout, SkipUnits: *noUnits, IgnoreUnits: []string{"berth-healthcheck.service"}}
	if len(dirs) > 0 {
		opts.Dirs = dirs
	}
	rep, err := health.Run(ctx, opts)
	if err != nil {
		return err
	}
	if *asJSON {
		json.NewEncoder(os.Stdout).Encode(rep)
	} else {
		for _, c := range rep.Checks {
			state := "ok"
			if !c.OK {
				state = "FAILED: " + c.Error
			}
			fmt.Printf("%s: %s (%s)\n", c.Name, state, c.Duration.Round(time.Millisecond))
			if !c.OK {
				// What the check said is why: show it (it also is in health.json).
				for _, line := range strings.Split(strings.TrimSpace(c.Output), "\n") {
					if line != "" {
						fmt.Printf("  %s: %s\n", c.Name, line)
					}
				}
			}
		}
		if len(rep.FailedUnits) > 0 {
			fmt.Printf("failed units: %v\n", rep.FailedUnits)
		}
	}
	booted := deploy.BootedID(*sysroot)
	out, cerr := health.Conclude(*sysroot, api.FindESP(*sysroot), booted, rep)
	if cerr != nil {
		fmt.Fprintln(os.Stderr, "berthd health: record result:", cerr)
	}
	if out.Blessed {
		fmt.Printf("boot entry %s of deployment %s marked good\n", out.Entry, booted)
	}
	if !rep.OK {
		if out.Reboot && *reboot {
			fmt.Printf("deployment %s is on trial and unhealthy: rebooting so the boot loader counts the try (and falls back when none are left)\n", booted)
			if err := health.Reboot(ctx); err != nil {
				fmt.Fprintln(os.Stderr, "berthd health:", err)
			}
		}
		return fmt.Errorf("unhealthy: %s", rep.Summary())
	}
	return nil
}

type multi []string

func (m *multi) String() string     { return fmt.Sprint(*m) }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }
