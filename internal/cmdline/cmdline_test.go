package cmdline

import (
	"errors"
	"strings"
	"testing"
)

const (
	h64  = "3fa2c41b09de5f0e6a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b"
	h128 = h64 + h64
)

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		line    string
		want    Args
		wantErr string // substring; "" = success
	}{
		{name: "plain stock boot", line: "BOOT_IMAGE=/vmlinuz root=UUID=1234 ro quiet",
			want: Args{Root: "UUID=1234", ReadOnly: true, RootModeSet: true}},
		{name: "berth sha256", line: "root=PARTUUID=ab-cd rw berth.composefs=" + h64 + " berth.deploy=7-3fa2c41b09de\n",
			want: Args{Root: "PARTUUID=ab-cd", RootModeSet: true, Composefs: &Digest{Hex: h64}, Deploy: "7-3fa2c41b09de", Local: LocalPersistent}},
		{name: "berth sha512 optional transient", line: "berth.composefs=?" + strings.ToUpper(h128) + " berth.deploy=x berth.local=transient",
			want: Args{Composefs: &Digest{Hex: h128, Optional: true}, Deploy: "x", Local: LocalTransient}},
		{name: "readonly + debug + root flags", line: `root=LABEL="my root" rootfstype=ext4 rootflags=noatime,discard init=/lib/systemd/systemd berth.composefs=` + h64 + ` berth.deploy=a berth.local=readonly berth.debug=shell`,
			want: Args{Root: "LABEL=my root", RootFSType: "ext4", RootFlags: "noatime,discard", Init: "/lib/systemd/systemd", Composefs: &Digest{Hex: h64}, Deploy: "a", Local: LocalReadonly, DebugShell: true}},
		{name: "ro then rw: last wins", line: "ro rw", want: Args{RootModeSet: true}},
		{name: "identical duplicate ok", line: "berth.composefs=" + h64 + " berth.composefs=" + h64 + " berth.deploy=d", want: Args{Composefs: &Digest{Hex: h64}, Deploy: "d", Local: LocalPersistent}},
		{name: "after -- belongs to init", line: "root=/dev/vda2 -- berth.bogus=1", want: Args{Root: "/dev/vda2"}},
		{name: "debug alone", line: "berth.debug=shell", want: Args{DebugShell: true}},

		{name: "short digest", line: "berth.composefs=abc berth.deploy=d", wantErr: "64 (sha256) or 128 (sha512) hex digits, got 3"},
		{name: "non-hex digest", line: "berth.composefs=" + h64[:63] + "g berth.deploy=d", wantErr: "non-hex character at position 64"},
		{name: "empty digest", line: "berth.composefs= berth.deploy=d", wantErr: "got 0 characters"},
		{name: "only question mark", line: "berth.composefs=? berth.deploy=d", wantErr: "got 0 characters"},
		{name: "no value", line: "berth.composefs", wantErr: "berth.composefs needs a value"},
		{name: "conflicting digests", line: "berth.composefs=" + h64 + " berth.composefs=?" + h64 + " berth.deploy=d", wantErr: "given twice with different values"},
		{name: "unknown berth arg", line: "berth.compsefs=" + h64, wantErr: "unknown berth argument"},
		{name: "bad local", line: "berth.composefs=" + h64 + " berth.deploy=d berth.local=tmp", wantErr: "must be persistent, transient or readonly"},
		{name: "bad debug", line: "berth.debug=1", wantErr: "the only value is shell"},
		{name: "deploy traversal", line: "berth.composefs=" + h64 + " berth.deploy=../../etc", wantErr: "deployment id is"},
		{name: "deploy slash", line: "berth.composefs=" + h64 + " berth.deploy=a/b", wantErr: "deployment id is"},
		{name: "deploy without digest", line: "berth.deploy=7-abc", wantErr: "without berth.composefs"},
		{name: "local without digest", line: "berth.local=transient", wantErr: "without berth.composefs"},
		{name: "digest without deploy", line: "berth.composefs=" + h64, wantErr: "without berth.deploy"},
		{name: "deploy names other digest", line: "berth.composefs=" + h64 + " berth.deploy=7-000000000000", wantErr: "names digest 000000000000"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse(tt.line)
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("Parse(%q) = %+v, want error containing %q", tt.line, got, tt.wantErr)
				}
				if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Parse(%q) error = %v, want ErrMalformed containing %q", tt.line, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%q): %v", tt.line, err)
			}
			if (got.Composefs == nil) != (tt.want.Composefs == nil) || got.Composefs != nil && *got.Composefs != *tt.want.Composefs {
				t.Errorf("Composefs = %+v, want %+v", got.Composefs, tt.want.Composefs)
			}
			g, w := *got, tt.want
			g.Composefs, w.Composefs = nil, nil
			if g != w {
				t.Errorf("Parse(%q) = %+v, want %+v", tt.line, g, w)
			}
		})
	}
}

func TestDigestHelpers(t *testing.T) {
	a, err := Parse("berth.composefs=?" + h128 + " berth.deploy=x")
	if err != nil {
		t.Fatal(err)
	}
	if a.Composefs.AlgorithmName() != "sha512" || len(a.Composefs.Bytes()) != 64 || a.Composefs.String() != "?"+h128 {
		t.Fatalf("digest helpers: %s %d %s", a.Composefs.AlgorithmName(), len(a.Composefs.Bytes()), a.Composefs)
	}
	if !a.Berth() {
		t.Fatal("Berth() = false with berth.composefs set")
	}
}

func TestSplit(t *testing.T) {
	got := Split(" a  b=\"c d\"\t\"e f\"=g \"\" h\n")
	want := []string{"a", "b=c d", "e f=g", "", "h"}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("Split = %q, want %q", got, want)
	}
}

// FuzzParse checks that Parse never panics and that what it accepts
// survives a render/parse round trip unchanged.
func FuzzParse(f *testing.F) {
	f.Add("root=UUID=1 ro berth.composefs=" + h64 + " berth.deploy=1-3fa2c41b09de")
	f.Add("berth.composefs=?" + h128 + " berth.deploy=x berth.local=readonly berth.debug=shell")
	f.Add(`root="a b" berth.local=transient -- x`)
	f.Add("berth.composefs")
	f.Fuzz(func(t *testing.T, line string) {
		a, err := Parse(line)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error not wrapping ErrMalformed: %v", err)
			}
			return
		}
		if a.Composefs == nil {
			return
		}
		if len(a.Composefs.Hex) != 64 && len(a.Composefs.Hex) != 128 || a.Deploy == "" || strings.ContainsAny(a.Deploy, "/\x00") {
			t.Fatalf("accepted invalid berth args: %+v", a)
		}
		b, err := Parse(strings.Join(a.Render(), " "))
		if err != nil {
			t.Fatalf("rendered args do not parse: %v", err)
		}
		if *b.Composefs != *a.Composefs || b.Deploy != a.Deploy || b.Local != a.Local || b.DebugShell != a.DebugShell {
			t.Fatalf("round trip changed args: %+v -> %+v", a, b)
		}
	})
}
