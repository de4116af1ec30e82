package etcmerge

import (
	"fmt"
	"sort"
	"strings"
	"testing"
)

func file(content string, mode uint32) *Entry {
	return &Entry{Type: File, Mode: mode, Content: "c:" + content}
}
func dir(mode uint32) *Entry            { return &Entry{Type: Dir, Mode: mode} }
func link(target string) *Entry         { return &Entry{Type: Symlink, Mode: 0o777, Target: target} }
func owned(e *Entry, uid uint32) *Entry { c := *e; c.UID, c.GID = uid, uid; return &c }

// render prints a result tree as "path=entry (side)" lines, sorted.
func render(r *Result) string {
	var lines []string
	for p, e := range r.Tree {
		lines = append(lines, fmt.Sprintf("%s=%s (%s)", p, e, r.From[p]))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func conflicts(r *Result) string {
	var s []string
	for _, c := range r.Conflicts {
		s = append(s, c.Path+":"+c.Kind+":"+c.Theirs)
	}
	return strings.Join(s, ",")
}

func TestMerge(t *testing.T) {
	for _, tc := range []struct {
		name               string
		base, ours, theirs Tree
		want               Tree // expected merged tree (entries compared with same())
		wantFrom           map[string]Side
		wantConflicts      string
	}{
		{
			name: "unchanged everywhere",
			base: Tree{"hostname": file("a", 0o644)}, ours: Tree{"hostname": file("a", 0o644)}, theirs: Tree{"hostname": file("a", 0o644)},
			want: Tree{"hostname": file("a", 0o644)},
		},
		{
			name: "only we modified",
			base: Tree{"hostname": file("a", 0o644)}, ours: Tree{"hostname": file("mine", 0o644)}, theirs: Tree{"hostname": file("a", 0o644)},
			want: Tree{"hostname": file("mine", 0o644)}, wantFrom: map[string]Side{"hostname": Ours},
		},
		{
			name: "only the image modified",
			base: Tree{"os-release": file("v1", 0o644)}, ours: Tree{"os-release": file("v1", 0o644)}, theirs: Tree{"os-release": file("v2", 0o644)},
			want: Tree{"os-release": file("v2", 0o644)}, wantFrom: map[string]Side{"os-release": Theirs},
		},
		{
			name: "modify/modify conflict keeps ours, theirs beside",
			base: Tree{"fstab": file("a", 0o644)}, ours: Tree{"fstab": file("mine", 0o644)}, theirs: Tree{"fstab": file("new", 0o644)},
			want:          Tree{"fstab": file("mine", 0o644), "fstab.berth-new": file("new", 0o644)},
			wantFrom:      map[string]Side{"fstab": Ours, "fstab.berth-new": Theirs},
			wantConflicts: "fstab:modify/modify:fstab.berth-new",
		},
		{
			name: "both made the same change",
			base: Tree{"x": file("a", 0o644)}, ours: Tree{"x": file("b", 0o644)}, theirs: Tree{"x": file("b", 0o644)},
			want: Tree{"x": file("b", 0o644)},
		},
		{
			name: "add/add same",
			base: Tree{}, ours: Tree{"new.conf": file("z", 0o600)}, theirs: Tree{"new.conf": file("z", 0o600)},
			want: Tree{"new.conf": file("z", 0o600)},
		},
		{
			name: "add/add different is a conflict",
			base: Tree{}, ours: Tree{"new.conf": file("mine", 0o600)}, theirs: Tree{"new.conf": file("theirs", 0o644)},
			want:          Tree{"new.conf": file("mine", 0o600), "new.conf.berth-new": file("theirs", 0o644)},
			wantConflicts: "new.conf:add/add:new.conf.berth-new",
		},
		{
			name: "we added, the image added elsewhere",
			base: Tree{}, ours: Tree{"a": file("1", 0o644)}, theirs: Tree{"b": file("2", 0o644)},
			want: Tree{"a": file("1", 0o644), "b": file("2", 0o644)},
		},
		{
			name: "we deleted, image unchanged: stays deleted",
			base: Tree{"motd": file("hi", 0o644)}, ours: Tree{}, theirs: Tree{"motd": file("hi", 0o644)},
			want: Tree{},
		},
		{
			name: "image deleted, we did not change it: deleted",
			base: Tree{"old.conf": file("x", 0o644)}, ours: Tree{"old.conf": file("x", 0o644)}, theirs: Tree{},
			want: Tree{},
		},
		{
			name: "delete/modify: we deleted, image changed",
			base: Tree{"motd": file("hi", 0o644)}, ours: Tree{}, theirs: Tree{"motd": file("hello", 0o644)},
			want:          Tree{"motd.berth-new": file("hello", 0o644)},
			wantConflicts: "motd:delete/modify:motd.berth-new",
		},
		{
			name: "modify/delete: we changed, image deleted",
			base: Tree{"old.conf": file("x", 0o644)}, ours: Tree{"old.conf": file("mine", 0o644)}, theirs: Tree{},
			want:          Tree{"old.conf": file("mine", 0o644)},
			wantConflicts: "old.conf:modify/delete:",
		},
		{
			name: "permission-only change on our side merges with the image's content change",
			base: Tree{"shadow": file("v1", 0o640)}, ours: Tree{"shadow": file("v1", 0o600)}, theirs: Tree{"shadow": file("v2", 0o640)},
			want: Tree{"shadow": file("v2", 0o600)},
		},
		{
			name: "content change on our side merges with the image's permission change",
			base: Tree{"sudoers": file("v1", 0o440)}, ours: Tree{"sudoers": file("mine", 0o440)}, theirs: Tree{"sudoers": file("v1", 0o400)},
			want: Tree{"sudoers": file("mine", 0o400)}, wantFrom: map[string]Side{"sudoers": Ours},
		},
		{
			name: "both changed permissions differently: conflict",
			base: Tree{"f": file("v", 0o644)}, ours: Tree{"f": file("v", 0o600)}, theirs: Tree{"f": file("v", 0o640)},
			want:          Tree{"f": file("v", 0o600), "f.berth-new": file("v", 0o640)},
			wantConflicts: "f:modify/modify:f.berth-new",
		},
		{
			name: "ownership-only change on our side",
			base: Tree{"f": file("v1", 0o644)}, ours: Tree{"f": owned(file("v1", 0o644), 1000)}, theirs: Tree{"f": file("v2", 0o644)},
			want: Tree{"f": owned(file("v2", 0o644), 1000)},
		},
		{
			name: "symlink retargeted by us",
			base: Tree{"localtime": link("/usr/share/zoneinfo/UTC")}, ours: Tree{"localtime": link("/usr/share/zoneinfo/Europe/Berlin")}, theirs: Tree{"localtime": link("/usr/share/zoneinfo/UTC")},
			want: Tree{"localtime": link("/usr/share/zoneinfo/Europe/Berlin")},
		},
		{
			name: "symlink retargeted on both sides: conflict",
			base: Tree{"resolv.conf": link("a")}, ours: Tree{"resolv.conf": link("b")}, theirs: Tree{"resolv.conf": link("c")},
			want:          Tree{"resolv.conf": link("b"), "resolv.conf.berth-new": link("c")},
			wantConflicts: "resolv.conf:modify/modify:resolv.conf.berth-new",
		},
		{
			name: "type change by us (symlink to file), image unchanged",
			base: Tree{"resolv.conf": link("../run/resolv.conf")}, ours: Tree{"resolv.conf": file("nameserver 1.1.1.1", 0o644)}, theirs: Tree{"resolv.conf": link("../run/resolv.conf")},
			want: Tree{"resolv.conf": file("nameserver 1.1.1.1", 0o644)},
		},
		{
			name: "type change by us and content change by the image: conflict",
			base: Tree{"resolv.conf": file("a", 0o644)}, ours: Tree{"resolv.conf": link("/run/x")}, theirs: Tree{"resolv.conf": file("b", 0o644)},
			want:          Tree{"resolv.conf": link("/run/x"), "resolv.conf.berth-new": file("b", 0o644)},
			wantConflicts: "resolv.conf:modify/modify:resolv.conf.berth-new",
		},
		{
			name: "image turned a file into a directory, we did not touch it",
			base: Tree{"foo": file("x", 0o644)}, ours: Tree{"foo": file("x", 0o644)}, theirs: Tree{"foo": dir(0o755), "foo/a": file("1", 0o644)},
			want: Tree{"foo": dir(0o755), "foo/a": file("1", 0o644)},
		},
		{
			name:   "we turned a directory into a file, the image added to the directory",
			base:   Tree{"d": dir(0o755), "d/a": file("1", 0o644)},
			ours:   Tree{"d": file("flat", 0o644)},
			theirs: Tree{"d": dir(0o755), "d/a": file("1", 0o644), "d/b": file("2", 0o644)},
			// Only we changed d, so ours wins; what the image added below
			// d has no place under a file and is reported.
			want:          Tree{"d": file("flat", 0o644)},
			wantConflicts: "d/b:delete/modify:",
			wantFrom:      map[string]Side{"d": Ours},
		},
		{
			name:          "we deleted a directory the image changed a file in",
			base:          Tree{"d": dir(0o755), "d/a": file("1", 0o644), "d/b": file("2", 0o644)},
			ours:          Tree{},
			theirs:        Tree{"d": dir(0o755), "d/a": file("1-new", 0o644), "d/b": file("2", 0o644)},
			want:          Tree{"d": dir(0o755), "d/a.berth-new": file("1-new", 0o644)},
			wantConflicts: "d/a:delete/modify:d/a.berth-new",
		},
		{
			name:   "directory permission changed by us, files inside changed by the image",
			base:   Tree{"ssh": dir(0o755), "ssh/sshd_config": file("v1", 0o644)},
			ours:   Tree{"ssh": dir(0o700), "ssh/sshd_config": file("v1", 0o644)},
			theirs: Tree{"ssh": dir(0o755), "ssh/sshd_config": file("v2", 0o644)},
			want:   Tree{"ssh": dir(0o700), "ssh/sshd_config": file("v2", 0o644)},
		},
		{
			name: "directory permission changed on both sides",
			base: Tree{"ssh": dir(0o755)}, ours: Tree{"ssh": dir(0o700)}, theirs: Tree{"ssh": dir(0o750)},
			want:          Tree{"ssh": dir(0o700)},
			wantConflicts: "ssh:modify/modify:",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := Merge(tc.base, tc.ours, tc.theirs)
			for p, w := range tc.want {
				if !same(res.Tree[p], w) {
					t.Errorf("%s: got %s, want %s", p, res.Tree[p], w)
				}
			}
			for p := range res.Tree {
				if tc.want[p] == nil {
					t.Errorf("unexpected %s=%s", p, res.Tree[p])
				}
			}
			for p, s := range tc.wantFrom {
				if res.From[p] != s {
					t.Errorf("%s taken from %s, want %s", p, res.From[p], s)
				}
			}
			if got := conflicts(res); got != tc.wantConflicts {
				t.Errorf("conflicts %q, want %q", got, tc.wantConflicts)
			}
			if t.Failed() {
				t.Logf("result:\n%s", render(res))
			}
			// Pure: the same inputs give the same result.
			if render(Merge(tc.base, tc.ours, tc.theirs)) != render(res) {
				t.Error("second merge of the same trees differs")
			}
			// Stable: merging the result again against an unchanged image
			// (base = theirs) keeps it as it is.
			again := Merge(tc.theirs, res.Tree, tc.theirs)
			for p, e := range res.Tree {
				if !same(again.Tree[p], e) {
					t.Errorf("re-merge changed %s: %s -> %s", p, e, again.Tree[p])
				}
			}
			if len(again.Tree) != len(res.Tree) || len(again.Conflicts) != 0 {
				t.Errorf("re-merge: %d entries (want %d), conflicts %q", len(again.Tree), len(res.Tree), conflicts(again))
			}
		})
	}
}

func TestMergeDoesNotChangeInputs(t *testing.T) {
	base := Tree{"f": file("v1", 0o640)}
	ours := Tree{"f": file("v1", 0o600)}
	theirs := Tree{"f": file("v2", 0o640)}
	Merge(base, ours, theirs)
	if theirs["f"].Mode != 0o640 || ours["f"].Content != "c:v1" || len(base) != 1 {
		t.Fatal("Merge modified its inputs")
	}
}
