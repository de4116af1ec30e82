package main

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// TestArchitectureListsEveryPackage keeps docs/architecture.md's package
// table in step with internal/: every package (a directory with non-test Go
// files) is named in the table, and every name in the table exists.
func TestArchitectureListsEveryPackage(t *testing.T) {
	internal := filepath.Join("..", "..", "internal")
	have := map[string]bool{}
	err := filepath.WalkDir(internal, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(p, ".go") && !strings.HasSuffix(p, "_test.go") {
			rel, _ := filepath.Rel(internal, filepath.Dir(p))
			have[filepath.ToSlash(rel)] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	doc, err := os.ReadFile(filepath.Join("..", "..", "docs", "architecture.md"))
	if err != nil {
		t.Fatal(err)
	}
	listed := map[string]bool{}
	in := false
	name := regexp.MustCompile("`([a-z0-9/]+)`")
	for _, line := range strings.Split(string(doc), "\n") {
		switch {
		case strings.HasPrefix(line, "## Packages"):
			in = true
			continue
		case in && strings.HasPrefix(line, "## "):
			in = false
		}
		if !in || !strings.HasPrefix(line, "| `") {
			continue
		}
		first := strings.SplitN(line, "|", 3)[1]
		for _, m := range name.FindAllStringSubmatch(first, -1) {
			listed[m[1]] = true
		}
	}
	var missing, stale []string
	for p := range have {
		if !listed[p] {
			missing = append(missing, p)
		}
	}
	for p := range listed {
		if !have[p] {
			stale = append(stale, p)
		}
	}
	sort.Strings(missing)
	sort.Strings(stale)
	if len(missing) > 0 {
		t.Errorf("docs/architecture.md's package table does not list internal/%s", strings.Join(missing, ", internal/"))
	}
	if len(stale) > 0 {
		t.Errorf("docs/architecture.md's package table lists %s, which is not a package under internal/", strings.Join(stale, ", "))
	}
}

// TestDocumentedFlagsExist: every `berth …` command line in README.md and
// docs/*.md names a command that exists, and each --flag on it is a flag of
// that command. A line that says "not built yet" describes a plan and is
// not checked.
func TestDocumentedFlagsExist(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join("..", "..", "docs", "*.md"))
	files = append(files, filepath.Join("..", "..", "README.md"))
	root := newRootCmd()
	cmdLine := regexp.MustCompile("(?:^|`|\\s)(berth(?: [^`|\\n#]*)?)")
	flag := regexp.MustCompile(`^--([a-z0-9][a-z0-9-]*)`)
	checked := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, "not built yet") {
				continue // a plan, said to be one
			}
			for _, m := range cmdLine.FindAllStringSubmatch(line, -1) {
				words := strings.Fields(m[1])
				if len(words) < 2 {
					continue
				}
				cmd, rest := walk(root, words[1:])
				if cmd == root {
					continue // prose ("berth makes …"), not a command line
				}
				for _, w := range rest {
					fm := flag.FindStringSubmatch(w)
					if fm == nil {
						if w == "|" || strings.HasPrefix(w, "&&") || w == ";" {
							break
						}
						continue
					}
					checked++
					if cmd.Flags().Lookup(fm[1]) == nil && cmd.InheritedFlags().Lookup(fm[1]) == nil {
						t.Errorf("%s:%d: `%s` documents --%s, which `berth %s` does not have", f, i+1, strings.TrimSpace(m[1]), fm[1], strings.TrimPrefix(cmd.CommandPath(), "berth "))
					}
				}
			}
		}
	}
	if checked == 0 {
		t.Fatal("no documented flag was found: the pattern is broken")
	}
}

// walk follows words down the command tree and returns the deepest command
// and the words after it.
func walk(c *cobra.Command, words []string) (*cobra.Command, []string) {
	for len(words) > 0 {
		var next *cobra.Command
		for _, sub := range c.Commands() {
			if sub.Name() == words[0] || sub.HasAlias(words[0]) {
				next = sub
			}
		}
		if next == nil {
			break
		}
		c, words = next, words[1:]
	}
	return c, words
}
