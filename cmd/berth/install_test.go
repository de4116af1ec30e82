package main

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The command of issue 11: a mistyped image reference with --wipe on a
// disk that holds data is refused, and the disk keeps every byte.
func TestInstallTypoLeavesDiskUntouched(t *testing.T) {
	disk := filepath.Join(t.TempDir(), "disk.img")
	data := make([]byte, 4<<20)
	rand.Read(data)
	if err := os.WriteFile(disk, data, 0o644); err != nil {
		t.Fatal(err)
	}
	staging := t.TempDir()
	global = globalFlags{}
	root := newRootCmd()
	root.SetArgs([]string{"-q", "install", "to-disk", disk, "--image", "oci:/no/such/layout:v1", "--wipe", "--staging-dir", staging})
	err := root.Execute()
	if err == nil || !strings.Contains(err.Error(), "/no/such/layout") {
		t.Fatalf("install of a missing image: %v", err)
	}
	if after, _ := os.ReadFile(disk); !bytes.Equal(after, data) {
		t.Error("the refused install changed the disk")
	}
	if ents, _ := os.ReadDir(staging); len(ents) != 0 {
		t.Errorf("staging directory left: %v", ents)
	}
}

// --kver is the flag; --kernel, its old name, still sets it and is hidden.
func TestKverFlagKeepsKernelAlias(t *testing.T) {
	for _, path := range [][]string{{"install", "to-disk"}, {"install", "to-filesystem"}, {"deploy", "create"}} {
		cmd, _, err := newRootCmd().Find(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.ParseFlags([]string{"--kernel", "6.12.1-old-name"}); err != nil {
			t.Fatal(err)
		}
		if v, _ := cmd.Flags().GetString("kver"); v != "6.12.1-old-name" {
			t.Errorf("%v: --kernel did not set --kver (%q)", path, v)
		}
		if f := cmd.Flags().Lookup("kernel"); f == nil || !f.Hidden || f.Deprecated == "" {
			t.Errorf("%v: --kernel is not a hidden, deprecated alias: %+v", path, f)
		}
	}
}
