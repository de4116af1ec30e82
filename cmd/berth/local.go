package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"go.podman.io/storage/pkg/reexec"

	"github.com/berth-dev/berth/internal/api"
	"github.com/berth-dev/berth/internal/localchanges"
	"github.com/berth-dev/berth/internal/localchanges/commit"
)

func init() {
	// Writing to containers-storage (berth commit) runs helpers by
	// re-executing this binary; they must start here, before the CLI.
	if reexec.Init() {
		os.Exit(0)
	}
	addCommand(newDiffCmd)
	addCommand(newResetCmd)
	addCommand(newCommitCmd)
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

var kindLetter = map[string]string{
	localchanges.KindAdded:    "A",
	localchanges.KindModified: "M",
	localchanges.KindDeleted:  "D",
	localchanges.KindReplaced: "R",
}

func writeChanges(w io.Writer, cs []localchanges.Change) {
	for _, c := range cs {
		p := c.Path
		if c.Type == "dir" {
			p += "/"
		}
		fmt.Fprintf(w, "%s %s\n", kindLetter[c.Kind], p)
	}
}

func newDiffCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "diff [DEPLOYMENT]",
		Short: "List the local changes of a deployment (its persistent writable layer)",
		Long: "List what was changed locally against the deployment's image: A added, M modified (content or\n" +
			"metadata), D deleted, R replaced (a directory that hides the image's). A directory marked A or R\n" +
			"stands for everything below it. Shared state (/var, /home, /root, /srv) is not a local change.\n" +
			"Without DEPLOYMENT: the booted one (with --sysroot: the newest).\n" +
			"Asks berthd when it is on the system bus (polkit action org.berth1.local-changes); with\n" +
			"--sysroot (or without berthd) reads the disk directly. --json prints the DiffResult of docs/dbus-api.md.",
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id := ""
			if len(args) == 1 {
				id = args[0]
			}
			res, _, err := api.DiffAuto(global.Sysroot, cmd.Flag("sysroot").Changed, "", id)
			if err != nil {
				return err
			}
			if global.JSON {
				return printJSON(cmd.OutOrStdout(), res)
			}
			if global.Quiet {
				return nil
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "deployment %s: %d local changes\n", res.Deployment, len(res.Changes))
			writeChanges(w, res.Changes)
			if pr := res.PendingReset; pr != nil {
				what := "all local changes"
				if !pr.All {
					what = strings.Join(pr.Paths, " ")
				}
				fmt.Fprintf(w, "reset pending for the next boot: %s\n", what)
			}
			return nil
		},
	}
}

func newResetCmd() *cobra.Command {
	var deployment string
	var cancel bool
	cmd := &cobra.Command{
		Use:   "reset [PATH...]",
		Short: "Drop local changes so the image's version shows again (all of them without PATH)",
		Long: "Remove the local changes at each PATH (an absolute path in the deployment, with everything\n" +
			"below it) from the deployment's writable layer; without PATH remove all local changes (/usr, /etc,\n" +
			"...). Shared state (/var, /home, /root, /srv) is never touched; the per-deployment package\n" +
			"databases (/var/lib/dpkg, /var/lib/rpm, /var/lib/pacman) are reset with the rest.\n" +
			"The booted deployment's layer is in use, so its reset is recorded and applied at the next boot,\n" +
			"before the root is mounted; another deployment's is reset at once. --cancel drops a pending reset.\n" +
			"Goes through berthd when it is on the system bus (polkit action org.berth1.local-changes).",
		RunE: func(cmd *cobra.Command, args []string) error {
			if cancel && len(args) > 0 {
				return errors.New("--cancel takes no paths")
			}
			req := api.ResetRequest{Sysroot: global.Sysroot, Direct: cmd.Flag("sysroot").Changed, Deployment: deployment, Paths: args, All: len(args) == 0 && !cancel, Cancel: cancel}
			res, _, err := api.ResetAuto(req)
			if err != nil {
				return err
			}
			if global.JSON {
				return printJSON(cmd.OutOrStdout(), res)
			}
			if global.Quiet {
				return nil
			}
			w := cmd.OutOrStdout()
			what := fmt.Sprintf("%d paths", len(res.Paths))
			if len(res.Paths) == 1 {
				what = "1 path"
			}
			if res.All {
				what = "all local changes"
			}
			switch {
			case cancel && res.Cancelled:
				fmt.Fprintf(w, "deployment %s: pending reset cancelled\n", res.Deployment)
			case cancel:
				fmt.Fprintf(w, "deployment %s: no reset was pending\n", res.Deployment)
			case res.Pending:
				fmt.Fprintf(w, "reset at next boot: %s (%d changes now); reboot to apply\n", what, len(res.Changes))
				writeChanges(w, res.Changes)
			default:
				fmt.Fprintf(w, "deployment %s: reset %s, %d changes removed\n", res.Deployment, what, len(res.Changes))
				writeChanges(w, res.Changes)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&deployment, "deployment", "", "reset deployment `ID` (default: the booted one; with --sysroot: the newest)")
	cmd.Flags().BoolVar(&cancel, "cancel", false, "drop the reset recorded for the next boot")
	return cmd
}

func newCommitCmd() *cobra.Command {
	var tag, base, policy, message string
	var insecure bool
	cmd := &cobra.Command{
		Use:   "commit --tag REF [DEPLOYMENT]",
		Short: "Write a deployment's local changes as an OCI layer on top of its image",
		Long: "Make an image from the deployment's image plus one layer with its local changes (what berth diff\n" +
			"lists; shared state is left out) and write it to REF: oci-archive:PATH[:TAG], oci:DIR[:TAG],\n" +
			"containers-storage:NAME[:TAG], docker://NAME:TAG, ...; a REF without transport is containers-storage.\n" +
			"The base image's layers are copied unchanged from where the deployment was pulled (its image\n" +
			"reference, pinned to the deployed manifest digest), so they keep their digests; when that source is\n" +
			"gone or holds another image, --base names a copy of the same image (the manifest digest must match).\n" +
			"Without DEPLOYMENT: the booted one (with --sysroot: the newest). Needs root: it mounts the deployment.",
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if tag == "" {
				return errors.New("--tag REF is required (e.g. --tag oci-archive:/tmp/mine.tar)")
			}
			id := ""
			if len(args) == 1 {
				id = args[0]
			} else {
				var err error
				if id, err = api.DefaultDeployment(global.Sysroot); err != nil {
					return err
				}
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			opts := commit.Options{Sysroot: global.Sysroot, Deployment: id, Dest: tag, Base: base, PolicyPath: policy,
				InsecureSkipTLSVerify: insecure, Message: message}
			res, err := commit.Commit(ctx, opts)
			if err != nil {
				return err
			}
			if global.JSON {
				return printJSON(cmd.OutOrStdout(), res)
			}
			if !global.Quiet {
				fmt.Fprintf(cmd.OutOrStdout(), "committed deployment %s (%d entries, %d deletions) on %s\nto %s, manifest %s\n",
					res.Deployment, res.Stats.Entries, res.Stats.Whiteouts, res.Base, res.Dest, res.ManifestDigest)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&tag, "tag", "", "where to write the image: a containers/image `REF` (oci-archive:PATH, containers-storage:NAME, ...)")
	cmd.Flags().StringVar(&base, "base", "", "copy the base image from `REF` instead of the deployment's image reference")
	cmd.Flags().StringVar(&message, "message", "", "history comment of the new layer")
	cmd.Flags().StringVar(&policy, "policy", "", "containers-policy.json `FILE` for the base image (default: as podman looks it up)")
	cmd.Flags().BoolVar(&insecure, "insecure-skip-tls-verify", false, "allow plain HTTP and unverified TLS registries")
	return cmd
}
