package uki

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/testenv"
)

const (
	hostStub    = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub"
	guestRootfs = "/var/cache/berth-e2e/trixie-rootfs"
)

// stubCase is a real systemd-stub to build against.
type stubCase struct {
	name string
	path string
}

// realStubs returns the stubs available here: the host's (Debian 12,
// systemd 252) and the trixie guest rootfs's (systemd 257).
func realStubs(t *testing.T) []stubCase {
	var out []stubCase
	if _, err := os.Stat(hostStub); err == nil {
		out = append(out, stubCase{"host", hostStub})
	}
	if guestReady() {
		out = append(out, stubCase{"trixie", guestRootfs + "/usr/lib/systemd/boot/efi/linuxx64.efi.stub"})
	}
	if len(out) == 0 {
		testenv.SkipOrFail(t, "no systemd-stub here: apt-get install systemd-boot-efi, or build the guest rootfs (%s)", testenv.Guest)
	}
	return out
}

func guestReady() bool {
	_, err := os.Stat(guestRootfs + "/.recipe")
	return err == nil
}

// testKernel returns a real kernel image when the guest rootfs has one,
// else a synthetic blob (the appender does not care what .linux holds).
func testKernel(t *testing.T) []byte {
	if guestReady() {
		m, _ := filepath.Glob(guestRootfs + "/boot/vmlinuz-*")
		if len(m) > 0 {
			b, err := os.ReadFile(m[0])
			if err != nil {
				t.Fatal(err)
			}
			return b
		}
	}
	b := make([]byte, 3<<20+17)
	for i := range b {
		b[i] = byte(i * 7)
	}
	return b
}

func testOptions(t *testing.T, stub string) Options {
	s, err := os.ReadFile(stub)
	if err != nil {
		t.Fatal(err)
	}
	initrd := bytes.Repeat([]byte("initrd-data\n"), 50001)
	return Options{
		Stub:      s,
		Linux:     testKernel(t),
		Initrds:   [][]byte{initrd},
		Cmdline:   "root=PARTUUID=0a1b2c3d-0000-4000-8000-000000000001 berth.composefs=" + strings.Repeat("ab", 32) + " berth.deploy=7-abababababab",
		OSRelease: []byte("PRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"13\"\nID=debian\n"),
		Uname:     "6.12.117+deb13-amd64",
	}
}

// toolPackage names the Debian package of each tool the tests run.
var toolPackage = map[string]string{"objdump": "binutils", "objcopy": "binutils", "osslsigncode": "osslsigncode",
	"openssl": "openssl", "sbverify": "sbsigntool"}

func need(t *testing.T, tools ...string) {
	for _, tool := range tools {
		testenv.RequireTool(t, tool, toolPackage[tool])
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

var objdumpSection = regexp.MustCompile(`(?m)^\s*\d+\s+(\.\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)`)

func mustRead(t *testing.T, path string) []byte {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// p0 is the optional header offset of a PE file.
func p0(t *testing.T, path string) int {
	p, err := parsePE(mustRead(t, path))
	if err != nil {
		t.Fatal(err)
	}
	return p.optOff
}

func checkPEChecksum(t *testing.T, path string, header uint32) {
	t.Helper()
	v, _ := exec.Command("osslsigncode", "verify", "-in", path).CombinedOutput()
	if bytes.Contains(v, []byte("invalid PE checksum")) {
		t.Errorf("osslsigncode: invalid PE checksum:\n%s", v)
	}
	m := regexp.MustCompile(`(?m)^PE checksum\s*:\s*([0-9A-Fa-f]+)`).FindSubmatch(v)
	if m == nil {
		t.Fatalf("osslsigncode printed no PE checksum:\n%s", v)
	}
	if got := fmt.Sprintf("%08X", header); got != string(m[1]) {
		t.Errorf("header checksum %s, osslsigncode says %s", got, m[1])
	}
}

func TestChecksumMatchesStub(t *testing.T) {
	for _, sc := range realStubs(t) {
		b, err := os.ReadFile(sc.path)
		if err != nil {
			t.Fatal(err)
		}
		p, err := parsePE(b)
		if err != nil {
			t.Fatal(err)
		}
		want := p.u32(p.optOff + optCheckSum)
		if want == 0 {
			t.Logf("%s: stub carries no checksum, nothing to compare", sc.name)
			continue
		}
		if got := peChecksum(b, p.optOff+optCheckSum); got != want {
			t.Errorf("%s: checksum %#x, stub header says %#x", sc.name, got, want)
		}
	}
}

func TestBuildSectionsObjdump(t *testing.T) {
	need(t, "objdump", "objcopy", "osslsigncode")
	for _, sc := range realStubs(t) {
		t.Run(sc.name, func(t *testing.T) {
			dir := t.TempDir()
			opts := testOptions(t, sc.path)
			out := filepath.Join(dir, "uki.efi")
			res, err := Build(out, opts)
			if err != nil {
				t.Fatal(err)
			}
			dump := run(t, "objdump", "-h", out)
			var names []string
			for _, m := range objdumpSection.FindAllStringSubmatch(dump, -1) {
				names = append(names, m[1])
			}
			joined := strings.Join(names, " ")
			// New sections follow the stub's, in ukify's order.
			if !strings.HasSuffix(joined, ".osrel .cmdline .uname .initrd .linux .sbat") &&
				!strings.HasSuffix(joined, ".osrel .cmdline .uname .initrd .linux") {
				t.Errorf("section order: %s", joined)
			}
			if strings.Count(joined, ".sbat") != 1 {
				t.Errorf("want exactly one .sbat: %s", joined)
			}
			// Section contents as binutils reads them equal the inputs.
			for name, want := range map[string][]byte{
				".linux": opts.Linux, ".initrd": opts.Initrds[0], ".cmdline": []byte(opts.Cmdline),
				".osrel": opts.OSRelease, ".uname": []byte(opts.Uname),
			} {
				f := filepath.Join(dir, "dump"+name)
				run(t, "objcopy", "--dump-section", name+"="+f, out, filepath.Join(dir, "scratch"))
				got, err := os.ReadFile(f)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					t.Errorf("%s: objcopy dumps %d bytes, want %d (equal: %v)", name, len(got), len(want), bytes.Equal(got[:min(len(got), len(want))], want[:min(len(got), len(want))]))
				}
			}
			sbatF := filepath.Join(dir, "dump.sbat")
			run(t, "objcopy", "--dump-section", ".sbat="+sbatF, out, filepath.Join(dir, "scratch"))
			sbat, _ := os.ReadFile(sbatF)
			stubP, _ := parsePE(opts.Stub)
			stubSbat := strings.TrimRight(string(stubP.sectionData(&stubP.sections[stubP.find(".sbat")])), "\x00")
			_, stubEntries, _ := strings.Cut(stubSbat, "\n")
			if !bytes.HasPrefix(sbat, []byte(sbatHeader+"\n"+stubEntries)) || !bytes.HasSuffix(sbat, []byte("\n"+defaultSBAT+"\n\x00")) {
				t.Errorf(".sbat is not the stub's entries merged with the UKI default:\n%q", sbat)
			}
			// The symbol table is gone and the header sizes are right.
			b, _ := os.ReadFile(out)
			p, err := parsePE(b)
			if err != nil {
				t.Fatal(err)
			}
			if p.u32(p.peOff+4+8) != 0 || p.u32(p.peOff+4+12) != 0 {
				t.Error("COFF symbol table fields not cleared")
			}
			if got, want := p.u32(p.optOff+optSizeOfImage), alignUp(p.virtEnd(), p.sectAlign); got != want {
				t.Errorf("SizeOfImage %#x, want %#x", got, want)
			}
			if int(p.rawEnd()) != len(b) {
				t.Errorf("file is %d bytes, sections end at %d", len(b), p.rawEnd())
			}
			for i := 1; i < len(p.sections); i++ {
				a, c := p.sections[i-1], p.sections[i]
				if c.VirtualAddress < a.VirtualAddress+a.VirtualSize {
					t.Errorf("sections %s and %s overlap in memory", a.Name, c.Name)
				}
			}
			// osslsigncode computes the PE checksum independently; it prints
			// one value when it agrees with the header, two and a warning when not.
			checkPEChecksum(t, out, p.u32(p.optOff+optCheckSum))
			if res.Size != int64(len(b)) || len(res.Sections) != len(p.sections) {
				t.Errorf("result describes %d bytes/%d sections, file has %d/%d", res.Size, len(res.Sections), len(b), len(p.sections))
			}
		})
	}
}

// makeCert creates a throwaway RSA db key and certificate with openssl.
func makeCert(t *testing.T, dir string) (key, cert string) {
	need(t, "openssl")
	key, cert = filepath.Join(dir, "db.key"), filepath.Join(dir, "db.crt")
	run(t, "openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
		"-subj", "/CN=berth test db/", "-keyout", key, "-out", cert)
	return key, cert
}

func TestSignedUKIVerifies(t *testing.T) {
	need(t, "sbverify", "osslsigncode")
	for _, sc := range realStubs(t) {
		t.Run(sc.name, func(t *testing.T) {
			dir := t.TempDir()
			keyPath, certPath := makeCert(t, dir)
			key, cert, err := LoadSigner(keyPath, certPath)
			if err != nil {
				t.Fatal(err)
			}
			opts := testOptions(t, sc.path)
			unsigned, err := Build(filepath.Join(dir, "unsigned.efi"), opts)
			if err != nil {
				t.Fatal(err)
			}
			opts.SignKey, opts.SignCert = key, cert
			out := filepath.Join(dir, "signed.efi")
			res, err := Build(out, opts)
			if err != nil {
				t.Fatal(err)
			}
			if !res.Signed {
				t.Fatal("not signed")
			}
			if res.AuthenticodeSHA256 != unsigned.AuthenticodeSHA256 {
				t.Errorf("signing changed the Authenticode digest: %s vs %s", res.AuthenticodeSHA256, unsigned.AuthenticodeSHA256)
			}
			if o := run(t, "sbverify", "--cert", certPath, out); !strings.Contains(o, "Signature verification OK") {
				t.Errorf("sbverify: %s", o)
			}
			// A different certificate must not verify.
			_, otherCert := makeCert(t, t.TempDir())
			if o, err := exec.Command("sbverify", "--cert", otherCert, out).CombinedOutput(); err == nil {
				t.Errorf("sbverify accepted the wrong certificate: %s", o)
			}
			v := run(t, "osslsigncode", "verify", "-in", out, "-CAfile", certPath)
			cur := regexp.MustCompile(`Current message digest\s*:\s*([0-9A-Fa-f]+)`).FindStringSubmatch(v)
			calc := regexp.MustCompile(`Calculated message digest\s*:\s*([0-9A-Fa-f]+)`).FindStringSubmatch(v)
			if cur == nil || calc == nil {
				t.Fatalf("osslsigncode printed no digests:\n%s", v)
			}
			if !strings.EqualFold(cur[1], res.AuthenticodeSHA256) || !strings.EqualFold(calc[1], res.AuthenticodeSHA256) {
				t.Errorf("Authenticode digest: go-uefi %s, osslsigncode current %s calculated %s", res.AuthenticodeSHA256, cur[1], calc[1])
			}
			checkPEChecksum(t, out, binary.LittleEndian.Uint32(mustRead(t, out)[p0(t, out)+optCheckSum:]))
			// The tail after the sections is exactly the certificate table.
			b, _ := os.ReadFile(out)
			p, _ := parsePE(b)
			rva, size := p.dataDir(dirSecurity)
			if int(rva) != int(p.rawEnd()) || int(rva+size) != len(b) {
				t.Errorf("certificate table at %#x+%#x, sections end %#x, file %#x", rva, size, p.rawEnd(), len(b))
			}
		})
	}
}

// systemdMeasure runs systemd 257's systemd-measure from a Debian trixie
// root (the guest rootfs, else the cached tools chroot) with that root's
// own dynamic loader, so input files are read from the host paths.
func systemdMeasure(t *testing.T) func(args ...string) []byte {
	root := guestRootfs
	if !guestReady() {
		root = toolsRoot(t)
	}
	return func(args ...string) []byte {
		cmd := exec.Command(root+"/usr/lib64/ld-linux-x86-64.so.2",
			append([]string{"--library-path", root + "/usr/lib/x86_64-linux-gnu:" + root + "/usr/lib/x86_64-linux-gnu/systemd",
				root + "/usr/lib/systemd/systemd-measure"}, args...)...)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("systemd-measure %v: %v", args, err)
		}
		return out
	}
}

func TestPCR11MatchesSystemdMeasure(t *testing.T) {
	measure := systemdMeasure(t)
	for _, sc := range realStubs(t) {
		t.Run(sc.name, func(t *testing.T) {
			dir := t.TempDir()
			opts := testOptions(t, sc.path)
			out := filepath.Join(dir, "uki.efi")
			res, err := Build(out, opts)
			if err != nil {
				t.Fatal(err)
			}
			secs, err := ReadSectionsFile(out)
			if err != nil {
				t.Fatal(err)
			}
			write := func(name string, b []byte) string {
				f := filepath.Join(dir, "in"+name)
				if err := os.WriteFile(f, b, 0o644); err != nil {
					t.Fatal(err)
				}
				return f
			}
			args := []string{"calculate", "--json=short",
				"--linux=" + write(".linux", opts.Linux),
				"--osrel=" + write(".osrel", opts.OSRelease),
				"--cmdline=" + write(".cmdline", []byte(opts.Cmdline)),
				"--initrd=" + write(".initrd", opts.Initrds[0]),
			}
			// systemd-stub 252 measures neither .uname nor .sbat.
			if !strings.HasPrefix(res.StubVersion, "252") {
				args = append(args, "--uname="+write(".uname", []byte(opts.Uname)), "--sbat="+write(".sbat", secs[".sbat"]))
			}
			var want PCR11
			if err := json.Unmarshal(measure(args...), &want); err != nil {
				t.Fatal(err)
			}
			for _, bank := range []string{"sha1", "sha256", "sha384", "sha512"} {
				if len(want[bank]) != 4 {
					t.Fatalf("systemd-measure gave %d %s values", len(want[bank]), bank)
				}
				for i := range want[bank] {
					if want[bank][i] != res.PCR11[bank][i] {
						t.Errorf("stub %s %s %s: predicted %s, systemd-measure %s", res.StubVersion, bank, want[bank][i].Phase, res.PCR11[bank][i].Hash, want[bank][i].Hash)
					}
				}
			}
			var stored PCR11
			js, err := os.ReadFile(out + ".pcr11.json")
			if err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(js, &stored); err != nil || stored["sha256"][3] != want["sha256"][3] {
				t.Errorf("stored prediction %s differs: %v", js, err)
			}
		})
	}
}

func TestMergeSBATCustom(t *testing.T) {
	for _, sc := range realStubs(t) {
		opts := testOptions(t, sc.path)
		opts.SBAT = "berth,1,Berth,berth,1,https://example.invalid/berth"
		_, res, err := Assemble(opts)
		if err != nil {
			t.Fatal(err)
		}
		_ = res
		opts.SBAT = "berth,notanumber"
		if _, _, err := Assemble(opts); err == nil {
			t.Error("bad SBAT line accepted")
		}
	}
}

// minimalPE builds a small PE32+ image with n sections and the given header
// size, for error-path tests.
func minimalPE(nsec int, sizeOfHeaders uint32) []byte {
	const peOff = 0x40
	b := make([]byte, int(sizeOfHeaders)+nsec*0x200)
	copy(b, "MZ")
	binary.LittleEndian.PutUint32(b[0x3c:], peOff)
	copy(b[peOff:], "PE\x00\x00")
	coff := peOff + 4
	binary.LittleEndian.PutUint16(b[coff:], 0x8664)
	binary.LittleEndian.PutUint16(b[coff+2:], uint16(nsec))
	binary.LittleEndian.PutUint16(b[coff+16:], 240)
	opt := coff + 20
	binary.LittleEndian.PutUint16(b[opt:], magicPE32Plus)
	binary.LittleEndian.PutUint32(b[opt+optSectionAlignment:], 0x200)
	binary.LittleEndian.PutUint32(b[opt+optFileAlignment:], 0x200)
	binary.LittleEndian.PutUint32(b[opt+optSizeOfHeaders:], sizeOfHeaders)
	binary.LittleEndian.PutUint32(b[opt+optNumRvaPE32Plus:], 16)
	sec := opt + 240
	for i := 0; i < nsec; i++ {
		h := b[sec+i*40:]
		copy(h, ".text")
		binary.LittleEndian.PutUint32(h[8:], 0x10)
		binary.LittleEndian.PutUint32(h[12:], sizeOfHeaders+uint32(0x200*i))
		binary.LittleEndian.PutUint32(h[16:], 0x200)
		binary.LittleEndian.PutUint32(h[20:], sizeOfHeaders+uint32(0x200*i))
	}
	binary.LittleEndian.PutUint32(b[opt+optSizeOfImage:], sizeOfHeaders+uint32(0x200*nsec))
	return b
}

func TestNoHeaderRoom(t *testing.T) {
	// 0x200 bytes of header hold the section table of 4 sections at most
	// (0x40 + 24 + 240 = 0x148, +4*40 = 0x1e8); adding sections must fail clearly.
	stub := minimalPE(4, 0x200)
	_, _, err := Assemble(Options{Stub: stub, Linux: []byte("kernel"), Cmdline: "x"})
	if err == nil || !strings.Contains(err.Error(), "no room") {
		t.Fatalf("want a no-room error, got %v", err)
	}
}

func TestMinimalStubAssembles(t *testing.T) {
	// 0x400 bytes of header: room for the new section headers.
	stub := minimalPE(1, 0x400)
	img, res, err := Assemble(Options{Stub: stub, Linux: []byte("kernel"), Cmdline: "x", OSRelease: []byte("ID=t\n")})
	if err != nil {
		t.Fatal(err)
	}
	secs, err := ReadSections(img)
	if err != nil {
		t.Fatal(err)
	}
	if string(secs[".linux"]) != "kernel" || string(secs[".cmdline"]) != "x" || len(res.Sections) != 5 {
		t.Errorf("sections: %v", res.Sections)
	}
}

func TestHostileStubs(t *testing.T) {
	good := minimalPE(1, 0x200)
	signed := append([]byte(nil), good...)
	p, _ := parsePE(signed)
	binary.LittleEndian.PutUint32(signed[p.dirOff+8*dirSecurity:], 0x400)
	binary.LittleEndian.PutUint32(signed[p.dirOff+8*dirSecurity+4:], 0x10)
	hugeSec := append([]byte(nil), good...)
	binary.LittleEndian.PutUint32(hugeSec[p.secOff+16:], 0xfffffff0)
	for name, stub := range map[string][]byte{
		"empty": {}, "mz-only": []byte("MZ"), "signed": signed, "section-past-eof": hugeSec,
		"bad-pe-offset": append([]byte("MZ"), make([]byte, 0x100)...),
	} {
		if _, _, err := Assemble(Options{Stub: stub, Linux: []byte("k")}); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// Every truncation of a real stub is an error, never a panic.
	for _, sc := range realStubs(t) {
		b, _ := os.ReadFile(sc.path)
		for n := 0; n < 0x800 && n < len(b); n += 7 {
			_, _, _ = Assemble(Options{Stub: b[:n], Linux: []byte("k")})
		}
	}
}

func TestFindStub(t *testing.T) {
	testenv.RequireFile(t, hostStub, "systemd-boot-efi")
	b, name, err := FindStub(os.DirFS("/"))
	if err != nil || name != "usr/lib/systemd/boot/efi/linuxx64.efi.stub" || len(b) == 0 {
		t.Fatalf("FindStub: %q %v", name, err)
	}
	_, _, err = FindStub(os.DirFS(t.TempDir()))
	if err == nil || !strings.Contains(err.Error(), "systemd-boot-efi") {
		t.Errorf("want an error naming the packages, got %v", err)
	}
}

// TestRelocationIntoMovedSection: the 252 stub's .sbat/.sdmagic may only be
// moved when no base relocation patches them.
func TestRelocationIntoMovedSection(t *testing.T) {
	testenv.RequireFile(t, hostStub, "systemd-boot-efi")
	b, err := os.ReadFile(hostStub)
	if err != nil {
		t.Fatal(err)
	}
	p, err := parsePE(b)
	if err != nil {
		t.Fatal(err)
	}
	i := p.find(".sdmagic")
	rrva, size := p.dataDir(dirBaseReloc)
	if i < 0 || size < 10 {
		// A property of the stub, not of the machine: nothing to test with this one.
		t.Skip("this stub has no .sdmagic after .sbat or no relocations")
	}
	opts := Options{Stub: b, Linux: []byte("kernel"), Cmdline: "x"}
	if _, _, err := Assemble(opts); err != nil {
		t.Fatalf("unmodified stub: %v", err)
	}
	// Point the first relocation block at the .sdmagic page.
	for _, s := range p.sections {
		if rrva >= s.VirtualAddress && rrva < s.VirtualAddress+s.VirtualSize {
			off := s.PointerToRaw + (rrva - s.VirtualAddress)
			evil := append([]byte(nil), b...)
			binary.LittleEndian.PutUint32(evil[off:], p.sections[i].VirtualAddress&^0xfff)
			binary.LittleEndian.PutUint16(evil[off+8:], 0xa000|uint16(p.sections[i].VirtualAddress&0xfff))
			opts.Stub = evil
			if _, _, err := Assemble(opts); err == nil || !strings.Contains(err.Error(), "base relocation") {
				t.Errorf("relocation into .sdmagic: %v", err)
			}
			return
		}
	}
	t.Fatal("relocation table not found in a section")
}

// toolsRoot returns the cached trixie tools chroot (test/uki/build-tools.sh),
// building it when mmdebstrap is there.
func toolsRoot(t *testing.T) string {
	testenv.RequireRoot(t, "the trixie tools chroot (mmdebstrap, chroot)")
	testenv.RequireTool(t, "mmdebstrap", "mmdebstrap")
	out, err := exec.Command("../../test/uki/build-tools.sh").Output()
	if err != nil {
		t.Fatalf("test/uki/build-tools.sh: %v", err)
	}
	return strings.TrimSpace(string(out))
}

// TestMatchesUkify builds the same UKI with systemd 257's ukify and with
// Build: every section's content (including the merged .sbat) is the same.
func TestMatchesUkify(t *testing.T) {
	testenv.RequireFile(t, guestRootfs+"/.recipe", testenv.Guest) // a real kernel and initrd
	root := toolsRoot(t)
	work, err := os.MkdirTemp(filepath.Join(root, "tmp"), "berth-uki-test-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(work)
	in := "/tmp/" + filepath.Base(work)
	opts := testOptions(t, root+"/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
	for name, b := range map[string][]byte{"linux": opts.Linux, "initrd": opts.Initrds[0], "osrel": opts.OSRelease} {
		if err := os.WriteFile(filepath.Join(work, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	run(t, "chroot", root, "ukify", "build", "--linux="+in+"/linux", "--initrd="+in+"/initrd",
		"--cmdline="+opts.Cmdline, "--os-release=@"+in+"/osrel", "--uname="+opts.Uname,
		"--stub=/usr/lib/systemd/boot/efi/linuxx64.efi.stub", "--output="+in+"/ukify.efi")
	theirs, err := ReadSectionsFile(filepath.Join(work, "ukify.efi"))
	if err != nil {
		t.Fatal(err)
	}
	img, _, err := Assemble(opts)
	if err != nil {
		t.Fatal(err)
	}
	ours, err := ReadSections(img)
	if err != nil {
		t.Fatal(err)
	}
	if len(ours) != len(theirs) {
		t.Errorf("%d sections, ukify %d", len(ours), len(theirs))
	}
	for name, b := range theirs {
		if !bytes.Equal(ours[name], b) {
			t.Errorf("section %s differs from ukify's (%d vs %d bytes)", name, len(ours[name]), len(b))
		}
	}
}

// TestPCRSigMatchesSystemdMeasureSign: the .pcrsig entries equal what
// `systemd-measure sign` computes for the same sections and key (RSA
// PKCS#1 v1.5 signatures are deterministic, so they compare byte for byte).
func TestPCRSigMatchesSystemdMeasureSign(t *testing.T) {
	measure := systemdMeasure(t)
	need(t, "openssl")
	for _, sc := range realStubs(t) {
		t.Run(sc.name, func(t *testing.T) {
			dir := t.TempDir()
			keyPath := filepath.Join(dir, "pcr.key")
			run(t, "openssl", "genrsa", "-out", keyPath, "2048")
			pubPath := filepath.Join(dir, "pcr.pub")
			run(t, "openssl", "rsa", "-in", keyPath, "-pubout", "-out", pubPath)
			key, err := LoadPrivateKey(keyPath)
			if err != nil {
				t.Fatal(err)
			}
			opts := testOptions(t, sc.path)
			opts.PCRSignKey = key
			out := filepath.Join(dir, "uki.efi")
			res, err := Build(out, opts)
			if err != nil {
				t.Fatal(err)
			}
			secs, err := ReadSectionsFile(out)
			if err != nil {
				t.Fatal(err)
			}
			if pub, _ := os.ReadFile(pubPath); !bytes.Equal(secs[".pcrpkey"], pub) {
				t.Errorf(".pcrpkey is not the PEM public key:\n%s", secs[".pcrpkey"])
			}
			var got map[string][]PCRSignature
			if err := json.Unmarshal(secs[".pcrsig"], &got); err != nil {
				t.Fatalf(".pcrsig: %v\n%s", err, secs[".pcrsig"])
			}
			args := []string{"sign", "--json=short", "--bank=sha256", "--private-key=" + keyPath, "--public-key=" + pubPath}
			for _, name := range []string{".linux", ".osrel", ".cmdline", ".initrd", ".uname", ".sbat", ".pcrpkey"} {
				if strings.HasPrefix(res.StubVersion, "252") && (name == ".uname" || name == ".sbat") {
					continue // not measured by systemd-stub 252
				}
				f := filepath.Join(dir, "in"+name)
				os.WriteFile(f, secs[name], 0o644)
				args = append(args, "--"+name[1:]+"="+f)
			}
			for _, ph := range DefaultPhasePaths {
				args = append(args, "--phase="+ph)
			}
			var want map[string][]PCRSignature
			if err := json.Unmarshal(measure(args...), &want); err != nil {
				t.Fatal(err)
			}
			if len(want["sha256"]) != len(DefaultPhasePaths) || len(got["sha256"]) != len(want["sha256"]) {
				t.Fatalf("entries: got %d, systemd-measure %d", len(got["sha256"]), len(want["sha256"]))
			}
			for i := range want["sha256"] {
				g, w := got["sha256"][i], want["sha256"][i]
				if g.Policy != w.Policy || g.Signature != w.Signature || g.Fingerprint != w.Fingerprint || len(g.PCRs) != 1 || g.PCRs[0] != 11 {
					t.Errorf("phase %s: got %+v\nsystemd-measure %+v", DefaultPhasePaths[i], g, w)
				}
			}
			// .pcrsig is the last section and not measured.
			if n := len(res.Sections); res.Sections[n-1].Name != ".pcrsig" {
				t.Errorf("last section %s", res.Sections[n-1].Name)
			}
		})
	}
}
