// mkguest builds (or reuses) the VM lane's guest images: the Debian root filesystem from
// test/guest (mmdebstrap, cached by recipe hash) packed as a multi-layer oci-archive.
// It prints one line per image: name, archive path, manifest digest.
//
//	mkguest [-recipe NAME|all] [-rootfs DIR -out FILE]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/berth-dev/berth/test/e2e/harness"
)

func main() {
	recipe := flag.String("recipe", "trixie", "guest recipe: "+names()+" or all")
	rootfs := flag.String("rootfs", "", "pack this root filesystem directory instead of a recipe")
	out := flag.String("out", "", "with -rootfs: the oci-archive to write")
	flag.Parse()
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	if err := run(ctx, *recipe, *rootfs, *out); err != nil {
		fmt.Fprintln(os.Stderr, "mkguest:", err)
		os.Exit(1)
	}
}

func names() string {
	var n []string
	for _, r := range harness.AllRecipes {
		n = append(n, r.Name)
	}
	return strings.Join(n, ", ")
}

func run(ctx context.Context, recipe, rootfs, out string) error {
	if rootfs != "" {
		if out == "" {
			return fmt.Errorf("-rootfs needs -out")
		}
		res, err := harness.PackOCIArchive(rootfs, out, harness.PackOptions{Skip: []string{".recipe"}})
		if err != nil {
			return err
		}
		fmt.Printf("%s %s %s\n", rootfs, res.Path, res.ManifestDigest)
		return nil
	}
	var recipes []harness.Recipe
	for _, r := range harness.AllRecipes {
		if recipe == "all" || recipe == r.Name {
			recipes = append(recipes, r)
		}
	}
	if len(recipes) == 0 {
		return fmt.Errorf("unknown recipe %q (%s, all)", recipe, names())
	}
	for _, r := range recipes {
		g, err := harness.EnsureImage(ctx, r, os.Stderr)
		if err != nil {
			return err
		}
		fmt.Printf("%s %s %s\n", r.Name, g.Archive, g.Pack.ManifestDigest)
	}
	return nil
}
