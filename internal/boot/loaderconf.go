package boot

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
)

// LoaderConfig is loader/loader.conf as a list of lines, so that settings
// berth does not manage survive its edits.
type LoaderConfig struct {
	lines  []string
	exists bool
}

// Get returns the value of the last line setting key ("" if none).
func (c *LoaderConfig) Get(key string) string {
	v := ""
	for _, l := range c.lines {
		if k, val, ok := splitConf(l); ok && k == key {
			v = val
		}
	}
	return v
}

// Set replaces every line setting key by one "key value" line.
func (c *LoaderConfig) Set(key, value string) {
	out := c.lines[:0:0]
	done := false
	for _, l := range c.lines {
		if k, _, ok := splitConf(l); ok && k == key {
			if !done {
				out = append(out, key+" "+value)
				done = true
			}
			continue
		}
		out = append(out, l)
	}
	if !done {
		out = append(out, key+" "+value)
	}
	c.lines = out
}

// String renders the file.
func (c *LoaderConfig) String() string {
	if len(c.lines) == 0 {
		return ""
	}
	return strings.Join(c.lines, "\n") + "\n"
}

func splitConf(line string) (key, value string, ok bool) {
	line = strings.TrimSpace(line)
	if line == "" || strings.HasPrefix(line, "#") {
		return "", "", false
	}
	k, v, _ := strings.Cut(line, " ")
	if i := strings.IndexByte(k, '\t'); i >= 0 {
		k, v = k[:i], k[i+1:]+" "+v
	}
	return k, strings.TrimSpace(v), true
}

// ReadLoaderConf reads loader/loader.conf. It never modifies the ESP (a
// writer may be mid-replacement): when a crash left only the complete
// loader.conf.berth-new (see replaceFile), that one is read; the next
// write puts it in place.
func (e ESP) ReadLoaderConf() (*LoaderConfig, error) {
	p := e.path(LoaderConf)
	b, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		if nb, nerr := os.ReadFile(p + newSuffix); nerr == nil {
			b, err = nb, nil
		} else {
			return &LoaderConfig{}, nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", LoaderConf, err)
	}
	if len(b) > maxConfSize {
		return nil, fmt.Errorf("%s is larger than %d bytes", LoaderConf, maxConfSize)
	}
	text := strings.TrimRight(strings.ReplaceAll(string(b), "\r\n", "\n"), "\n")
	c := &LoaderConfig{exists: true}
	if text != "" {
		c.lines = strings.Split(text, "\n")
	}
	return c, nil
}

// WriteLoaderConf replaces loader/loader.conf (crash-safe on FAT).
func (e ESP) WriteLoaderConf(c *LoaderConfig) error {
	for _, l := range c.lines {
		if strings.ContainsAny(l, "\r\x00") {
			return fmt.Errorf("write %s: line %q contains a control character", LoaderConf, l)
		}
	}
	if err := os.MkdirAll(e.path("loader"), 0o755); err != nil {
		return fmt.Errorf("write %s: %w", LoaderConf, err)
	}
	if err := replaceFile(e.path(LoaderConf), writeString(c.String())); err != nil {
		return fmt.Errorf("write %s: %w", LoaderConf, err)
	}
	c.exists = true
	return nil
}

// SetTimeout sets the boot menu timeout in seconds (0 hides the menu).
func (e ESP) SetTimeout(seconds int) error {
	if seconds < 0 {
		return fmt.Errorf("negative boot menu timeout %d", seconds)
	}
	c, err := e.ReadLoaderConf()
	if err != nil {
		return err
	}
	c.Set("timeout", fmt.Sprint(seconds))
	return e.WriteLoaderConf(c)
}
