// Package fsck checks a berth store for consistency without changing it:
// every composefs image is named by its fs-verity digest and finds all
// its objects at the right size, every image record and deployment names
// an image that exists, every berth boot entry boots a deployment that
// exists. Leftovers that a cleanup or a recovery removes (temporary files,
// unreferenced objects, an unfinished job) are warnings, not errors.
package fsck

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/oci"
	"github.com/berth-dev/berth/internal/store"
)

// Options configure Check.
type Options struct {
	Sysroot string // the store is Sysroot/berth; "" means "/"
	// ESP is the mounted ESP whose berth-* boot entries are checked; ""
	// looks for one below Sysroot as berth does (efi, boot/efi, boot).
	ESP string
	// VerifyObjects recomputes every object's fs-verity digest and
	// compares it with its name (reads all content: slow on a big store).
	VerifyObjects bool
}

// Problem is one finding. Path is the file or directory concerned.
type Problem struct {
	Path    string `json:"path"`
	Message string `json:"message"`
	Fix     string `json:"fix,omitempty"`
}

func (p Problem) String() string {
	s := p.Path + ": " + p.Message
	if p.Fix != "" {
		s += " (" + p.Fix + ")"
	}
	return s
}

// Report is what Check found.
type Report struct {
	Sysroot         string    `json:"sysroot"`
	ESP             string    `json:"esp,omitempty"`
	Images          int       `json:"images"`
	Objects         int       `json:"objects"`
	ObjectsVerified int       `json:"objects_verified"`
	Records         int       `json:"records"`
	LayerIndexes    int       `json:"layer_indexes"`
	Deployments     int       `json:"deployments"`
	BootEntries     int       `json:"boot_entries"`
	Errors          []Problem `json:"errors"`
	Warnings        []Problem `json:"warnings"`
}

// OK reports whether the store has no errors (warnings are allowed).
func (r *Report) OK() bool { return len(r.Errors) == 0 }

func (r *Report) errorf(path, format string, args ...any) {
	r.Errors = append(r.Errors, Problem{Path: path, Message: fmt.Sprintf(format, args...)})
}

func (r *Report) warn(path, fix, format string, args ...any) {
	r.Warnings = append(r.Warnings, Problem{Path: path, Message: fmt.Sprintf(format, args...), Fix: fix})
}

// Fixes named in warnings.
const (
	fixCleanup       = "run `berth cleanup`"
	fixDeployCleanup = "run `berth deploy cleanup`"
	fixRecovery      = "the next berth job or berthd start recovers it"
)

// maxPerImage caps the missing/wrong-size object errors listed for one
// image; the rest are counted.
const maxPerImage = 20

var (
	hexNameRe = regexp.MustCompile(`^([0-9a-f]{64}|[0-9a-f]{128})$`)
	payloadRe = regexp.MustCompile(`^[0-9a-f]{2}/([0-9a-f]{62}|[0-9a-f]{126})$`)
)

func algFor(hexLen int) fsverity.Algorithm {
	if hexLen == 128 {
		return fsverity.SHA512
	}
	return fsverity.SHA256
}

// checker carries what one Check learned so far.
type checker struct {
	opts Options
	l    store.Layout
	rep  *Report
	// objects referenced by images or layer indexes (payload path -> a
	// referrer, for messages).
	referenced map[string]bool
	images     map[string]bool // image files present with a valid name
	imageUsers map[string]bool // images named by a record or deployment
}

// Check examines the store below opts.Sysroot. It returns an error only
// when the check itself cannot proceed (no store, unreadable directory);
// what is wrong with the store is in the report.
func Check(opts Options) (*Report, error) {
	if opts.Sysroot == "" {
		opts.Sysroot = "/"
	}
	l := store.At(opts.Sysroot)
	if fi, err := os.Stat(l.Repo()); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("fsck: no berth store at %s (is --sysroot right?)", l.Repo())
	}
	c := &checker{opts: opts, l: l, rep: &Report{Sysroot: opts.Sysroot, Errors: []Problem{}, Warnings: []Problem{}},
		referenced: map[string]bool{}, images: map[string]bool{}, imageUsers: map[string]bool{}}
	// Shared like an import: a cleanup cannot remove files while we
	// look; imports may go on (their temporaries show as warnings).
	if lock, err := l.LockShared(); err == nil {
		defer lock.Unlock()
	} else {
		c.rep.warn(l.Repo(), "", "could not take the repository lock (%v): a concurrent cleanup may cause false findings", err)
	}
	for _, step := range []func() error{c.checkImages, c.records, c.layerIndexes, c.objects, c.deployments, c.unusedImages, c.bootEntries, c.journal} {
		if err := step(); err != nil {
			return nil, fmt.Errorf("fsck: %w", err)
		}
	}
	return c.rep, nil
}

// readDir lists dir; a missing directory is empty.
func readDir(dir string) ([]fs.DirEntry, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	return ents, err
}

// checkImages checks repo/images: names are fs-verity digests, content is a
// valid composefs image, and every object it names exists at its size.
func (c *checker) checkImages() error {
	dir := c.l.Images()
	ents, err := readDir(dir)
	if err != nil {
		return err
	}
	for _, de := range ents {
		name := de.Name()
		p := filepath.Join(dir, name)
		if strings.HasPrefix(name, ".tmp") {
			c.rep.warn(p, fixCleanup, "leftover of an interrupted image write")
			continue
		}
		if !hexNameRe.MatchString(name) {
			c.rep.errorf(p, "unexpected entry in the image directory: not named by a fs-verity digest")
			continue
		}
		if !de.Type().IsRegular() {
			c.rep.errorf(p, "image is not a regular file (%s)", de.Type())
			continue
		}
		c.rep.Images++
		c.images[name] = true
		got, err := fsverity.DigestFile(p, algFor(len(name)))
		if err != nil {
			c.rep.errorf(p, "cannot read image: %v", err)
			continue
		}
		if h := hex.EncodeToString(got); h != name {
			c.rep.errorf(p, "image file name is not its fs-verity digest (content digest is %s)", h)
		}
		c.imageObjects(p)
	}
	return nil
}

// imageObjects checks the objects one composefs image references.
func (c *checker) imageObjects(p string) {
	im, err := composefs.OpenImage(p)
	if err == nil {
		err = im.Check()
	}
	if err != nil {
		c.rep.errorf(p, "not a valid composefs image: %v", err)
		return
	}
	seen := map[string]bool{}
	bad := 0
	err = im.Walk(func(path string, n *composefs.Inode) error {
		if n.Payload == "" || seen[n.Payload] {
			return nil
		}
		seen[n.Payload] = true
		if !payloadRe.MatchString(n.Payload) {
			c.rep.errorf(p, "file %s names object %q, which is not an object path", path, n.Payload)
			return nil
		}
		c.referenced[n.Payload] = true
		if n.Digest != nil && composefs.PayloadPath(n.Digest) != n.Payload {
			c.rep.errorf(p, "file %s has fs-verity digest %x but names object %s", path, n.Digest, n.Payload)
		}
		op := filepath.Join(c.l.Objects(), n.Payload)
		fi, err := os.Lstat(op)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			bad++
			if bad <= maxPerImage {
				c.rep.errorf(p, "file %s: object %s is missing", path, op)
			}
		case err != nil:
			bad++
			c.rep.errorf(p, "file %s: object %s: %v", path, op, err)
		case !fi.Mode().IsRegular():
			bad++
			c.rep.errorf(p, "file %s: object %s is not a regular file", path, op)
		case uint64(fi.Size()) != n.Size:
			bad++
			if bad <= maxPerImage {
				c.rep.errorf(p, "file %s: object %s is %d bytes, the image says %d", path, op, fi.Size(), n.Size)
			}
		}
		return nil
	})
	if err != nil {
		c.rep.errorf(p, "not a valid composefs image: %v", err)
	}
	if bad > maxPerImage {
		c.rep.errorf(p, "%d more objects missing or of the wrong size", bad-maxPerImage)
	}
}

// records checks repo/oci/images: each record parses and names an image
// that exists.
func (c *checker) records() error {
	dir := filepath.Join(c.l.OCI(), "images")
	ents, err := readDir(dir)
	if err != nil {
		return err
	}
	for _, de := range ents {
		p := filepath.Join(dir, de.Name())
		if strings.HasPrefix(de.Name(), ".tmp") {
			c.rep.warn(p, fixCleanup, "leftover of an interrupted record write")
			continue
		}
		if !strings.HasSuffix(de.Name(), ".json") {
			continue
		}
		c.rep.Records++
		var img oci.Image
		if err := readJSON(p, &img); err != nil {
			c.rep.errorf(p, "image record does not parse: %v", err)
			continue
		}
		if !hexNameRe.MatchString(img.ComposefsDigest) {
			c.rep.errorf(p, "image record of %s has composefs digest %q, not a hex digest", img.Ref, img.ComposefsDigest)
			continue
		}
		if !c.imageExists(img.ComposefsDigest) {
			c.rep.errorf(p, "image record of %s names composefs image %s, which is missing", img.Ref, c.l.Image(img.ComposefsDigest))
		}
		for _, d := range []string{img.ManifestDigest, img.ConfigDigest} {
			bp := filepath.Join(c.l.OCI(), "blobs", "sha256", strings.TrimPrefix(d, "sha256:"))
			if _, err := os.Stat(bp); err != nil && strings.HasPrefix(d, "sha256:") {
				c.rep.warn(bp, "pull "+img.Ref+" again", "manifest or config of %s is missing (only kept for inspection)", img.Ref)
			}
		}
	}
	return nil
}

// layerIndexes reads repo/oci/layers. An index whose objects are gone is
// not used by a pull (the layer is fetched again), so that is a warning.
func (c *checker) layerIndexes() error {
	dir := filepath.Join(c.l.OCI(), "layers")
	ents, err := readDir(dir)
	if err != nil {
		return err
	}
	for _, de := range ents {
		p := filepath.Join(dir, de.Name())
		if strings.HasPrefix(de.Name(), ".tmp") {
			c.rep.warn(p, fixCleanup, "leftover of an interrupted layer index write")
			continue
		}
		c.rep.LayerIndexes++
		var li oci.LayerIndex
		if err := readJSON(p, &li); err != nil {
			c.rep.warn(p, fixCleanup, "layer index does not parse (%v): pulls ignore it", err)
			continue
		}
		missing := 0
		for _, e := range li.Entries {
			b, err := hex.DecodeString(e.Digest)
			if e.Digest == "" || err != nil || len(b) < 2 {
				continue
			}
			pp := composefs.PayloadPath(b)
			c.referenced[pp] = true
			if _, err := os.Lstat(filepath.Join(c.l.Objects(), pp)); err != nil {
				missing++
			}
		}
		if missing > 0 {
			c.rep.warn(p, "", "%d objects of this layer are missing: the next pull of an image with this layer fetches it again", missing)
		}
	}
	return nil
}

// objects walks repo/objects: temporaries and unreferenced objects are
// warnings; with VerifyObjects each object's content must hash to its
// name.
func (c *checker) objects() error {
	dir := c.l.Objects()
	fans, err := readDir(dir)
	if err != nil {
		return err
	}
	var unref []string
	var unrefBytes int64
	var h *fsverity.Hasher
	for _, fan := range fans {
		fp := filepath.Join(dir, fan.Name())
		if strings.HasPrefix(fan.Name(), ".tmp") {
			c.rep.warn(fp, fixCleanup, "leftover of an interrupted object import")
			continue
		}
		if !fan.IsDir() || len(fan.Name()) != 2 || !isHex(fan.Name()) {
			c.rep.warn(fp, "", "unexpected entry in the object store")
			continue
		}
		files, err := os.ReadDir(fp)
		if err != nil {
			return err
		}
		for _, f := range files {
			rel := fan.Name() + "/" + f.Name()
			p := filepath.Join(fp, f.Name())
			if strings.HasPrefix(f.Name(), ".tmp") {
				c.rep.warn(p, fixCleanup, "leftover of an interrupted object import")
				continue
			}
			if !payloadRe.MatchString(rel) {
				c.rep.warn(p, "", "unexpected entry in the object store: not named by a fs-verity digest")
				continue
			}
			if !f.Type().IsRegular() {
				c.rep.errorf(p, "object is not a regular file (%s)", f.Type())
				continue
			}
			c.rep.Objects++
			if !c.referenced[rel] {
				unref = append(unref, p)
				if fi, err := f.Info(); err == nil {
					unrefBytes += fi.Size()
				}
			}
			if !c.opts.VerifyObjects {
				continue
			}
			name := fan.Name() + f.Name()
			alg := algFor(len(name))
			if h == nil || h.Algorithm() != alg {
				h = fsverity.New(alg)
			}
			got, err := digestWith(h, p)
			if err != nil {
				c.rep.errorf(p, "cannot read object: %v", err)
				continue
			}
			c.rep.ObjectsVerified++
			if g := hex.EncodeToString(got); g != name {
				c.rep.errorf(p, "object content does not match its name: its fs-verity digest is %s", g)
			}
		}
	}
	if len(unref) > 0 {
		sort.Strings(unref)
		ex := unref[0]
		if len(unref) > 1 {
			ex += ", ..."
		}
		c.rep.warn(dir, fixCleanup, "%d objects (%d bytes) are referenced by no image or layer index (%s)", len(unref), unrefBytes, ex)
	}
	return nil
}

// digestWith hashes one file with a reused Hasher.
func digestWith(h *fsverity.Hasher, p string) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if err := h.ReadFile(f, fi.Size(), false); err != nil {
		return nil, err
	}
	return h.Sum(), nil
}

// deployments checks berth/deploy: each deployment.json parses and names
// an image that exists.
func (c *checker) deployments() error {
	dir := c.l.Deployments()
	ents, err := readDir(dir)
	if err != nil {
		return err
	}
	for _, de := range ents {
		name := de.Name()
		p := filepath.Join(dir, name)
		switch {
		case name == ".serial" || name == ".lock":
			continue
		case strings.HasPrefix(name, ".tmp-"):
			c.rep.warn(p, fixDeployCleanup, "leftover of an interrupted deployment")
			continue
		case strings.HasPrefix(name, ".rm-"):
			c.rep.warn(p, fixDeployCleanup, "leftover of an interrupted deployment removal")
			continue
		}
		if _, _, err := deploy.ParseID(name); err != nil || !de.IsDir() {
			c.rep.warn(p, "", "not a deployment (%s)", "name is not <serial>-<12 hex digits>")
			continue
		}
		c.rep.Deployments++
		d, err := deploy.Read(c.l, name)
		if err != nil {
			c.rep.errorf(filepath.Join(p, deploy.MetadataFile), "%v", err)
			continue
		}
		if !c.imageExists(d.ComposefsDigest) {
			c.rep.errorf(filepath.Join(p, deploy.MetadataFile), "deployment %s names composefs image %s, which is missing: it cannot boot", d.ID, c.l.Image(d.ComposefsDigest))
		}
	}
	// Shared state being seeded when a deployment was interrupted.
	ents, err = readDir(c.l.State())
	if err != nil {
		return err
	}
	for _, de := range ents {
		if strings.HasPrefix(de.Name(), ".tmp-") {
			c.rep.warn(filepath.Join(c.l.State(), de.Name()), fixDeployCleanup, "leftover of interrupted state seeding")
		}
	}
	return nil
}

// bootEntries checks that every berth-* entry on the ESP boots a
// deployment that exists.
func (c *checker) bootEntries() error {
	esp := c.opts.ESP
	if esp == "" {
		esp = boot.MountedESP(c.opts.Sysroot)
	}
	if esp == "" {
		return nil
	}
	c.rep.ESP = esp
	entries, err := boot.ESP{Dir: esp}.Entries()
	if err != nil {
		c.rep.errorf(esp, "cannot read the boot entries: %v", err)
		return nil
	}
	for _, e := range entries {
		c.rep.BootEntries++
		p := filepath.Join(esp, filepath.FromSlash(e.Path))
		fi, err := os.Stat(filepath.Join(c.l.Deployment(e.ID), deploy.MetadataFile))
		if err != nil || !fi.Mode().IsRegular() {
			c.rep.errorf(p, "boot entry of deployment %s, which does not exist (%s is missing): booting it fails", e.ID, c.l.Deployment(e.ID))
		}
	}
	return nil
}

// journal reports an unfinished job: its half-made deployment or files
// are removed by recovery, not by hand.
func (c *checker) journal() error {
	p := filepath.Join(c.l.Root, "job.json")
	// The journal's fields (internal/api.JobRecord) read here directly:
	// internal/api's tests use fsck, so fsck cannot import api.
	var rec struct {
		ID      uint64    `json:"id"`
		Kind    string    `json:"kind"`
		PID     int       `json:"pid"`
		Started time.Time `json:"started"`
	}
	b, err := os.ReadFile(p)
	if err == nil {
		err = json.Unmarshal(b, &rec)
	}
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		c.rep.warn(p, fixRecovery, "unreadable job journal (%v): an interrupted job", err)
	default:
		c.rep.warn(p, fixRecovery, "job %d (%s) of process %d, started %s, has not finished: if it is not running, it was interrupted and may have left a half-made deployment",
			rec.ID, rec.Kind, rec.PID, rec.Started.Format("2006-01-02 15:04:05 MST"))
	}
	return nil
}

// unusedImages reports images no record or deployment names.
func (c *checker) unusedImages() error {
	var unused []string
	for d := range c.images {
		if !c.imageUsers[d] {
			unused = append(unused, d)
		}
	}
	sort.Strings(unused)
	for _, d := range unused {
		c.rep.warn(c.l.Image(d), fixCleanup, "no image record or deployment uses this image")
	}
	return nil
}

func (c *checker) imageExists(hexDigest string) bool {
	c.imageUsers[hexDigest] = true
	if c.images[hexDigest] {
		return true
	}
	// Written after the image directory was listed (a concurrent import).
	fi, err := os.Stat(c.l.Image(hexDigest))
	return err == nil && fi.Mode().IsRegular()
}

func readJSON(p string, v any) error {
	data, err := os.ReadFile(p)
	if err != nil {
		return err
	}
	return json.Unmarshal(data, v)
}

func isHex(s string) bool {
	for _, c := range s {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
