package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/cmdline"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/install"
	"github.com/berth-dev/berth/internal/oci"
	"github.com/berth-dev/berth/internal/progress"
	"github.com/berth-dev/berth/internal/store"
)

func init() { addCommand(newDeployCmd) }

// deployESP finds the ESP of the sysroot (or takes --esp).
func deployESP(flag string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	for _, d := range []string{"efi", "boot/efi", "boot"} {
		p := filepath.Join(global.Sysroot, d)
		if fi, err := os.Stat(filepath.Join(p, "EFI")); err == nil && fi.IsDir() {
			return p, nil
		}
	}
	return "", errors.New("no ESP found below the sysroot (looked for efi/EFI, boot/efi/EFI, boot/EFI); give --esp")
}

// defaultDeployment is the deployment the ESP boots by default ("" when unknown).
func defaultDeployment(esp string) string {
	if esp == "" {
		return ""
	}
	e, err := boot.ESP{Dir: esp}.Default()
	if err != nil || e == nil {
		return ""
	}
	return e.ID
}

func newDeployCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "deploy",
		Short: "List, create, pin and remove deployments",
	}
	var espFlag string
	cmd.PersistentFlags().StringVar(&espFlag, "esp", "", "the mounted EFI System Partition `DIR` (default: efi, boot/efi or boot below --sysroot)")

	list := &cobra.Command{
		Use:   "list",
		Short: "List deployments, oldest first",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			l := store.At(global.Sysroot)
			ds, err := deploy.List(l)
			if err != nil {
				return err
			}
			if global.JSON {
				if ds == nil {
					ds = []*deploy.Deployment{}
				}
				return json.NewEncoder(os.Stdout).Encode(ds)
			}
			booted := deploy.BootedID(global.Sysroot)
			esp, _ := deployESP(espFlag)
			def := defaultDeployment(esp)
			w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "ID\tSTATE\tFLAGS\tKERNEL\tCREATED\tIMAGE")
			for _, d := range ds {
				flags := ""
				if d.ID == booted {
					flags += "booted,"
				}
				if d.ID == def {
					flags += "default,"
				}
				if d.Pinned {
					flags += "pinned,"
				}
				if flags == "" {
					flags = "-"
				} else {
					flags = flags[:len(flags)-1]
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", d.ID, d.State, flags, d.Kernel, d.Created.Format("2006-01-02 15:04"), d.ImageRef)
			}
			return w.Flush()
		},
	}

	var local, kernel string
	var kargs []string
	var noVerity, skipKernel bool
	create := &cobra.Command{
		Use:   "create IMAGE",
		Short: "Deploy an image already in the store: deployment, initramfs, UKI and a boot-counted default entry",
		Args:  cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			img, err := oci.LookupImage(global.Sysroot, args[0])
			if err != nil {
				return err
			}
			esp, err := deployESP(espFlag)
			if err != nil {
				return err
			}
			mode := progress.Plain
			if global.Quiet || global.JSON {
				mode = progress.Quiet
			}
			res, err := install.DeployImage(global.Sysroot, esp, img, install.DeployOptions{
				KernelArgs: kargs, LocalMode: cmdline.LocalMode(local), InsecureNoVerity: noVerity, Kernel: kernel, SkipKernelCheck: skipKernel,
				Progress: progress.New(os.Stderr, progress.Options{Mode: mode}),
			})
			return report(res, err)
		},
	}
	create.Flags().StringVar(&local, "local", "persistent", "local changes: persistent, transient or readonly")
	kverFlag(create.Flags(), &kernel, "kernel `VERSION` (default: the image's newest)")
	create.Flags().BoolVar(&skipKernel, "skip-kernel-check", false, "deploy a kernel whose version looks too old for berth (features backported)")
	create.Flags().StringArrayVar(&kargs, "karg", nil, "append `ARG` to the kernel command line (repeatable)")
	create.Flags().BoolVar(&noVerity, "insecure-no-verity", false, "boot even without fs-verity (berth.composefs=?…)")

	var unpin bool
	pin := &cobra.Command{
		Use:   "pin ID",
		Short: "Keep a deployment from being removed (--unpin to undo)",
		Args:  cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			_, err := deploy.SetPinned(store.At(global.Sysroot), args[0], !unpin)
			return err
		},
	}
	pin.Flags().BoolVar(&unpin, "unpin", false, "unpin instead")

	var force bool
	remove := &cobra.Command{
		Use:   "remove ID",
		Short: "Remove a deployment and its boot entry (never the booted or the default one)",
		Args:  cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			esp, _ := deployESP(espFlag)
			id := args[0]
			if err := deploy.Remove(store.At(global.Sysroot), id, deploy.RemoveOptions{
				Booted: deploy.BootedID(global.Sysroot), Default: defaultDeployment(esp), Force: force,
			}); err != nil {
				return err
			}
			if esp != "" {
				if err := (boot.ESP{Dir: esp}).Remove(id); err != nil {
					return fmt.Errorf("deployment %s removed, but its boot entry: %w", id, err)
				}
			}
			return nil
		},
	}
	remove.Flags().BoolVar(&force, "force", false, "remove a pinned deployment too")

	cleanup := &cobra.Command{
		Use:   "cleanup",
		Short: "Delete leftovers of interrupted deployment changes",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			removed, err := deploy.Cleanup(store.At(global.Sysroot))
			for _, p := range removed {
				if !global.Quiet {
					fmt.Println("removed", p)
				}
			}
			return err
		},
	}
	cmd.AddCommand(list, create, pin, remove, cleanup)
	return cmd
}
