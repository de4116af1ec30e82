package composefs

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
)

// The composefs dump format (composefs-dump(5)): one file per line, 11
// space-separated fields (PATH SIZE MODE NLINK UID GID RDEV MTIME PAYLOAD
// CONTENT DIGEST) followed by KEY=VALUE xattrs, with \\ \n \r \t and \xHH
// escapes and "-" for an absent optional field. A MODE starting with '@'
// marks a hardlink whose PAYLOAD is the path of the file it links to.

const (
	dumpMaxLine       = 1 << 20 // far above any valid line; bounds memory on hostile input
	dumpMaxXattrBytes = 65535   // mkcomposefs: "Too many xattrs"
)

// ParseDump reads a dump file (mkcomposefs --from-file input). Hardlinks
// become one *Inode reached from several names. Errors name the line.
func ParseDump(r io.Reader) (*Inode, error) {
	p := &dumpParser{links: map[*Inode]*dumpLink{}}
	br := bufio.NewReaderSize(r, 64<<10)
	lineNo := 0
	var line []byte
	for {
		chunk, err := br.ReadSlice('\n')
		line = append(line, chunk...)
		if errors.Is(err, bufio.ErrBufferFull) {
			if len(line) > dumpMaxLine {
				return nil, fmt.Errorf("composefs dump line %d: longer than %d bytes", lineNo+1, dumpMaxLine)
			}
			continue
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("read composefs dump: %w", err)
		}
		eof := err != nil
		if len(line) > 0 {
			lineNo++
			if len(line) > dumpMaxLine {
				return nil, fmt.Errorf("composefs dump line %d: longer than %d bytes", lineNo, dumpMaxLine)
			}
			if perr := p.line(bytes.TrimSuffix(line, []byte{'\n'})); perr != nil {
				return nil, fmt.Errorf("composefs dump line %d: %w", lineNo, perr)
			}
		}
		line = line[:0]
		if eof {
			break
		}
	}
	if p.root == nil {
		return nil, errors.New("composefs dump: no files (the root \"/\" line is missing)")
	}
	if err := p.resolveLinks(); err != nil {
		return nil, fmt.Errorf("composefs dump: %w", err)
	}
	return p.root, nil
}

type dumpLink struct {
	parent *Inode
	name   string
	target string // path as written
	path   string
}

type dumpParser struct {
	root  *Inode
	links map[*Inode]*dumpLink // hardlink placeholder -> where it goes
	order []*Inode             // placeholders in file order
}

func dumpUnescape(s []byte) ([]byte, error) {
	if bytes.IndexByte(s, '\\') < 0 {
		return append([]byte(nil), s...), nil
	}
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c != '\\' {
			out = append(out, c)
			continue
		}
		i++
		if i >= len(s) {
			return nil, errors.New("no character after escape")
		}
		switch s[i] {
		case '\\':
			out = append(out, '\\')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'x':
			if i+2 >= len(s) {
				return nil, errors.New("no hex characters after hex escape")
			}
			v, err := strconv.ParseUint(string(s[i+1:i+3]), 16, 8)
			if err != nil {
				return nil, errors.New("invalid hex characters after hex escape")
			}
			out = append(out, byte(v))
			i += 2
		default:
			return nil, fmt.Errorf("unsupported escape type %c", s[i])
		}
	}
	return out, nil
}

// dumpOptional unescapes an optional field: "-" means absent (nil, false).
func dumpOptional(s []byte) ([]byte, bool, error) {
	if len(s) == 1 && s[0] == '-' {
		return nil, false, nil
	}
	v, err := dumpUnescape(s)
	return v, err == nil, err
}

func parseDumpUint(field []byte, base int, bits int, what string) (uint64, error) {
	v, err := strconv.ParseUint(string(field), base, bits)
	if err != nil {
		return 0, fmt.Errorf("invalid %s %q", what, field)
	}
	return v, nil
}

func (p *dumpParser) line(line []byte) error {
	if bytes.IndexByte(line, 0) >= 0 {
		return errors.New("embedded NUL character")
	}
	var f [11][]byte
	rest := line
	for i := range f {
		if j := bytes.IndexByte(rest, ' '); j >= 0 {
			f[i], rest = rest[:j], rest[j+1:]
		} else {
			f[i], rest = rest, nil
		}
	}
	pathb, err := dumpUnescape(f[0])
	if err != nil {
		return fmt.Errorf("path: %w", err)
	}
	if len(pathb) == 0 {
		return errors.New("invalid empty path")
	}
	if bytes.IndexByte(pathb, 0) >= 0 {
		return errors.New("path contains NUL")
	}
	path := string(pathb)
	modeField := f[2]
	hardlink := len(modeField) > 0 && modeField[0] == '@'
	if hardlink {
		modeField = modeField[1:]
	}
	mode64, err := parseDumpUint(modeField, 8, 32, "mode")
	if err != nil {
		return err
	}
	mode := uint32(mode64)
	// Like mkcomposefs, only the file type is validated; stray high bits
	// are kept (the image stores the low 16 bits).
	if !wrValidMode(mode) {
		return fmt.Errorf("invalid mode %o", mode)
	}
	n := &Inode{Mode: mode}

	// Place the node in the tree.
	var parent *Inode
	var name string
	if path == "/" {
		if !n.IsDir() {
			return errors.New("root must be a directory")
		}
		if p.root != nil {
			return errors.New("can't have multiple roots")
		}
		if hardlink {
			return errors.New("the root can't be a hardlink")
		}
		n.Children = map[string]*Inode{}
		p.root = n
	} else {
		if p.root == nil {
			return errors.New("root node not present (\"/\" must come first)")
		}
		parts := strings.Split(strings.TrimLeft(path, "/"), "/")
		parent = p.root
		for _, c := range parts[:len(parts)-1] {
			next := parent.Children[c]
			if next == nil || c == "" {
				return fmt.Errorf("parent directory missing for %s", path)
			}
			if !next.IsDir() || p.links[next] != nil {
				return fmt.Errorf("parent must be a directory for %s", path)
			}
			parent = next
		}
		name = parts[len(parts)-1]
		if err := wrValidName(name); err != nil {
			return fmt.Errorf("%s: %v", path, err)
		}
		if _, exists := parent.Children[name]; exists {
			return fmt.Errorf("path %s already exists", path)
		}
		parent.Children[name] = n
	}

	if hardlink {
		if n.IsDir() {
			return errors.New("directories can't be hardlinked")
		}
		target, ok, err := dumpOptional(f[8])
		if err != nil {
			return fmt.Errorf("hardlink target: %w", err)
		}
		if !ok {
			return fmt.Errorf("no target path for the hardlink %s", path)
		}
		p.links[n] = &dumpLink{parent: parent, name: name, target: string(target), path: path}
		p.order = append(p.order, n)
		return nil
	}

	size, err := parseDumpUint(f[1], 10, 64, "size")
	if err != nil {
		return err
	}
	if _, err := parseDumpUint(f[3], 10, 64, "nlink"); err != nil {
		return err
	}
	uid, err := parseDumpUint(f[4], 10, 32, "uid")
	if err != nil {
		return err
	}
	gid, err := parseDumpUint(f[5], 10, 32, "gid")
	if err != nil {
		return err
	}
	rdev, err := parseDumpUint(f[6], 10, 32, "rdev")
	if err != nil {
		return err
	}
	secStr, nsecStr, _ := bytes.Cut(f[7], []byte{'.'})
	sec, err := strconv.ParseInt(string(secStr), 10, 64)
	if err != nil {
		return fmt.Errorf("invalid mtime %q", f[7])
	}
	nsec, err := strconv.ParseUint(string(nsecStr), 10, 32)
	if err != nil || nsec >= 1e9 {
		return fmt.Errorf("invalid mtime %q", f[7])
	}
	payload, hasPayload, err := dumpOptional(f[8])
	if err != nil {
		return fmt.Errorf("payload: %w", err)
	}
	content, hasContent, err := dumpOptional(f[9])
	if err != nil {
		return fmt.Errorf("content: %w", err)
	}
	if hasContent && uint64(len(content)) != size {
		return fmt.Errorf("invalid content size %d, must match size %d", len(content), size)
	}
	digestHex, hasDigest, err := dumpOptional(f[10])
	if err != nil {
		return fmt.Errorf("digest: %w", err)
	}

	n.UID, n.GID = uint32(uid), uint32(gid)
	n.Mtime = Timespec{Sec: sec, Nsec: uint32(nsec)}
	switch n.Type() {
	case SIFCHR, SIFBLK:
		n.Rdev = uint32(rdev)
	}
	switch n.Type() {
	case SIFLNK:
		if !hasPayload || len(payload) == 0 {
			return errors.New("invalid symlink: empty target")
		}
		if len(payload) > wrMaxPathLen || bytes.IndexByte(payload, 0) >= 0 {
			return fmt.Errorf("invalid symlink target of %d bytes", len(payload))
		}
		n.Target = string(payload)
		n.Size = uint64(len(payload))
	case SIFREG:
		n.Size = size
		if hasPayload {
			if len(payload) > wrMaxPathLen || bytes.IndexByte(payload, 0) >= 0 {
				return fmt.Errorf("invalid payload of %d bytes", len(payload))
			}
			n.Payload = string(payload)
		}
		if hasContent && len(content) > 0 {
			if len(content) > wrMaxInlineContent {
				return fmt.Errorf("inline content size %d exceeds maximum %d", len(content), wrMaxInlineContent)
			}
			n.Inline = content
		}
		if hasDigest {
			d, err := hex.DecodeString(string(digestHex))
			if err != nil || (len(d) != 32 && len(d) != 64) {
				return fmt.Errorf("invalid digest %q", digestHex)
			}
			n.Digest = d
		}
	case SIFDIR:
		n.Size = size
		if n.Children == nil {
			n.Children = map[string]*Inode{}
		}
	default:
		n.Size = size
	}

	if len(rest) > dumpMaxXattrBytes {
		return errors.New("too many xattrs")
	}
	for len(rest) > 0 {
		var field []byte
		if j := bytes.IndexByte(rest, ' '); j >= 0 {
			field, rest = rest[:j], rest[j+1:]
		} else {
			field, rest = rest, nil
		}
		k, v, ok := bytes.Cut(field, []byte{'='})
		if !ok {
			return errors.New("missing = in xattr")
		}
		key, err := dumpUnescape(k)
		if err != nil {
			return fmt.Errorf("xattr name: %w", err)
		}
		value, err := dumpUnescape(v)
		if err != nil {
			return fmt.Errorf("xattr value: %w", err)
		}
		if len(key) == 0 || len(key) > wrMaxXattrNameLen || bytes.IndexByte(key, 0) >= 0 {
			return fmt.Errorf("invalid xattr name %q", key)
		}
		if len(value) > wrMaxXattrValueLen {
			return fmt.Errorf("xattr %s value too long", key)
		}
		n.SetXattr(string(key), value)
		if wrXattrAccount(n.Xattrs) > wrMaxXattrAccount {
			return errors.New("xattrs too large")
		}
	}
	return nil
}

// resolveLinks replaces hardlink placeholders with their targets.
func (p *dumpParser) resolveLinks() error {
	resolve := func(ph *Inode) (*Inode, error) {
		start := p.links[ph]
		cur := ph
		for hops := 0; ; hops++ {
			l := p.links[cur]
			if l == nil {
				return cur, nil
			}
			if hops > len(p.links) {
				return nil, fmt.Errorf("hardlink loop at %s", start.path)
			}
			t := p.root.Lookup(l.target)
			if t == nil {
				return nil, fmt.Errorf("no target at %s for hardlink %s", l.target, l.path)
			}
			if t == cur {
				return nil, fmt.Errorf("self-referential hardlink %s", l.path)
			}
			cur = t
		}
	}
	final := make(map[*Inode]*Inode, len(p.order))
	for _, ph := range p.order {
		t, err := resolve(ph)
		if err != nil {
			return err
		}
		if t.IsDir() {
			return fmt.Errorf("hardlink %s points to a directory", p.links[ph].path)
		}
		final[ph] = t
	}
	for _, ph := range p.order {
		l := p.links[ph]
		l.parent.Children[l.name] = final[ph]
	}
	return nil
}

// dumpEscape appends s escaped the way composefs-info dump does.
func dumpEscape(b []byte, s []byte, escapeEqual, loneDash bool) []byte {
	if loneDash && len(s) == 1 && s[0] == '-' {
		return append(b, `\x2d`...)
	}
	const hexdigits = "0123456789abcdef"
	for _, c := range s {
		switch {
		case c == '\\':
			b = append(b, `\\`...)
		case c == '\n':
			b = append(b, `\n`...)
		case c == '\r':
			b = append(b, `\r`...)
		case c == '\t':
			b = append(b, `\t`...)
		case c <= ' ' || c >= 0x7f || (c == '=' && escapeEqual):
			b = append(b, '\\', 'x', hexdigits[c>>4], hexdigits[c&15])
		default:
			b = append(b, c)
		}
	}
	return b
}

// WriteDump writes root in the dump format, depth-first with children in
// byte order. The first name of a hardlinked inode (in that order) gets
// the full line; the others are '@' lines pointing to it. NLINK is
// computed: 2 + subdirectories for directories, the number of names for
// other files.
func WriteDump(w io.Writer, root *Inode) error {
	if root == nil || !root.IsDir() {
		return errors.New("composefs dump: the root must be a directory")
	}
	links := map[*Inode]int{}
	var count func(n *Inode, depth int) error
	count = func(n *Inode, depth int) error {
		links[n]++
		if !n.IsDir() {
			return nil
		}
		if links[n] > 1 || depth > 4096 {
			return errors.New("composefs dump: a directory is reachable twice (cycle or directory hardlink)")
		}
		for _, c := range n.Children {
			if c == nil {
				return errors.New("composefs dump: nil inode in tree")
			}
			if err := count(c, depth+1); err != nil {
				return err
			}
		}
		return nil
	}
	if err := count(root, 0); err != nil {
		return err
	}
	bw := bufio.NewWriterSize(w, 256<<10)
	first := map[*Inode]string{}
	var buf []byte
	var walk func(n *Inode, path string) error
	walk = func(n *Inode, path string) error {
		buf = buf[:0]
		shown := path
		if shown == "" {
			shown = "/"
		}
		buf = dumpEscape(buf, []byte(shown), false, false)
		if prev, ok := first[n]; ok && !n.IsDir() {
			buf = appendDumpFields(buf, n, links[n], true)
			buf = append(buf, ' ')
			buf = dumpEscape(buf, []byte(prev), false, true)
			buf = appendDumpTail(buf, n)
			_, err := bw.Write(buf)
			return err
		}
		first[n] = shown
		nlink := links[n]
		if n.IsDir() {
			nlink = 2
			for _, c := range n.Children {
				if c.IsDir() {
					nlink++
				}
			}
		}
		buf = appendDumpFields(buf, n, nlink, false)
		buf = append(buf, ' ')
		switch {
		case n.Type() == SIFLNK:
			buf = dumpEscape(buf, []byte(n.Target), false, true)
		case n.Type() == SIFREG && n.Payload != "":
			buf = dumpEscape(buf, []byte(n.Payload), false, true)
		default:
			buf = append(buf, '-')
		}
		buf = appendDumpTail(buf, n)
		if _, err := bw.Write(buf); err != nil {
			return err
		}
		if !n.IsDir() {
			return nil
		}
		for _, name := range n.SortedNames() {
			if err := walk(n.Children[name], path+"/"+name); err != nil {
				return err
			}
		}
		return nil
	}
	if err := walk(root, ""); err != nil {
		return fmt.Errorf("write composefs dump: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write composefs dump: %w", err)
	}
	return nil
}

// appendDumpFields appends " SIZE MODE NLINK UID GID RDEV MTIME".
func appendDumpFields(b []byte, n *Inode, nlink int, hardlink bool) []byte {
	size := n.Size
	if n.Type() == SIFLNK {
		size = uint64(len(n.Target))
	}
	at := ""
	if hardlink {
		at = "@"
	}
	rdev := uint32(0)
	if t := n.Type(); t == SIFCHR || t == SIFBLK {
		rdev = n.Rdev
	}
	return fmt.Appendf(b, " %d %s%o %d %d %d %d %d.%d", size, at, n.Mode, nlink, n.UID, n.GID, rdev, n.Mtime.Sec, n.Mtime.Nsec)
}

// appendDumpTail appends " CONTENT DIGEST XATTRS...\n".
func appendDumpTail(b []byte, n *Inode) []byte {
	b = append(b, ' ')
	if n.Type() == SIFREG && len(n.Inline) > 0 {
		b = dumpEscape(b, n.Inline, false, true)
	} else {
		b = append(b, '-')
	}
	b = append(b, ' ')
	if n.Type() == SIFREG && len(n.Digest) > 0 {
		b = hex.AppendEncode(b, n.Digest)
	} else {
		b = append(b, '-')
	}
	xs := append([]Xattr(nil), n.Xattrs...)
	sort.Slice(xs, func(i, j int) bool { return xs[i].Key < xs[j].Key })
	for _, x := range xs {
		b = append(b, ' ')
		b = dumpEscape(b, []byte(x.Key), true, false)
		b = append(b, '=')
		b = dumpEscape(b, x.Value, true, false)
	}
	return append(b, '\n')
}
