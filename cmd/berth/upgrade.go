package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/berth-dev/berth/internal/api"
	"github.com/berth-dev/berth/internal/progress"
)

func init() {
	addCommand(newUpgradeCmd)
	addCommand(newSwitchCmd)
	addCommand(newRollbackCmd)
}

// jobFlags are the flags of the commands that run a berthd job.
type jobFlags struct {
	apply bool
	local string
}

func (f *jobFlags) register(cmd *cobra.Command, withLocal bool) {
	cmd.Flags().BoolVar(&f.apply, "apply", false, "reboot into the result when the job succeeds")
	if withLocal {
		cmd.Flags().StringVar(&f.local, "local", "keep", "local changes: keep (merge /etc into the new deployment at its first boot) or drop (start clean)")
	}
}

// runJob runs a job through berthd (or directly with --sysroot) and
// prints its result.
func runJob(cmd *cobra.Command, req api.Request) error {
	req.Direct = cmd.Flag("sysroot").Changed
	req.Sysroot = global.Sysroot
	if req.Options.Local != "" && req.Options.Local != "keep" && req.Options.Local != "drop" {
		return fmt.Errorf("--local must be keep or drop, not %q", req.Options.Local)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	rep := progress.New(os.Stderr, progress.Options{Quiet: global.Quiet, JSON: global.JSON})
	res, via, err := api.RunJob(ctx, req, rep)
	if global.JSON {
		out := map[string]string{"kind": req.Kind, "via": via}
		if res != nil {
			out["state"], out["summary"], out["error"] = res.State, res.Summary, res.Error
		} else if err != nil {
			out["state"], out["error"] = api.StateFailed, err.Error()
		}
		json.NewEncoder(cmd.OutOrStdout()).Encode(out)
	} else if err == nil && !global.Quiet && res.Summary != "" {
		fmt.Fprintln(cmd.OutOrStdout(), res.Summary)
	}
	return err
}

func newUpgradeCmd() *cobra.Command {
	var f jobFlags
	var check, auto bool
	cmd := &cobra.Command{
		Use:   "upgrade",
		Short: "Pull the tracked image again and stage it for the next boot",
		Long: "Pull the image the booted deployment was made from; when it changed, make a new deployment\n" +
			"(boot-counted UKI, default for the next boot; the current one stays as rollback).\n" +
			"--check only looks for an update; --apply reboots into it.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if check && f.apply {
				return fmt.Errorf("--check and --apply exclude each other")
			}
			opts := api.UpgradeOptions{Check: check, Apply: f.apply, Local: f.local}
			if auto {
				policy, err := api.ReadAutoUpdatePolicy(api.AutoUpdateFile)
				if err != nil {
					return err
				}
				var ok bool
				if opts, ok = api.ApplyAutoPolicy(policy); !ok {
					fmt.Fprintf(cmd.OutOrStdout(), "automatic updates are off (AutomaticUpdatePolicy=%s in %s)\n", policy, api.AutoUpdateFile)
					return nil
				}
				opts.Local = f.local
			}
			return runJob(cmd, api.Request{Kind: api.KindUpgrade, Options: opts})
		},
	}
	cmd.Flags().BoolVar(&check, "check", false, "only check whether an update is available")
	cmd.Flags().BoolVar(&auto, "auto", false, "do what /etc/berth/auto-update says (AutomaticUpdatePolicy: none, check, stage, apply); for berth-upgrade.service")
	f.register(cmd, true)
	return cmd
}

func newSwitchCmd() *cobra.Command {
	var f jobFlags
	cmd := &cobra.Command{
		Use:   "switch IMAGE",
		Short: "Deploy another image (docker://, oci:, oci-archive:, containers-storage:, docker-archive:) for the next boot",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runJob(cmd, api.Request{Kind: api.KindSwitch, Ref: args[0], Options: api.UpgradeOptions{Apply: f.apply, Local: f.local}})
		},
	}
	f.register(cmd, true)
	return cmd
}

func newRollbackCmd() *cobra.Command {
	var f jobFlags
	cmd := &cobra.Command{
		Use:   "rollback",
		Short: "Make the previous deployment the default for the next boot (again: swap back)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runJob(cmd, api.Request{Kind: api.KindRollback, Options: api.UpgradeOptions{Apply: f.apply}})
		},
	}
	f.register(cmd, false)
	return cmd
}
