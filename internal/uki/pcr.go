package uki

import (
	"crypto"
	_ "crypto/sha1" // PCR banks
	_ "crypto/sha256"
	_ "crypto/sha512"
	"encoding/hex"
	"strconv"
	"strings"
)

// measuredSectionOrder is the canonical UKI section order in which
// systemd-stub (253 and newer) measures sections into PCR 11; .pcrsig is
// never measured (it carries signatures over these very values).
var measuredSectionOrder = []string{
	".linux", ".osrel", ".cmdline", ".initrd", ".ucode", ".splash", ".dtb",
	".uname", ".sbat", ".pcrpkey", ".profile", ".dtbauto", ".hwids",
}

// measuredSectionOrder252 is what systemd-stub 252 (Debian 12) measures:
// it does not know .ucode, .uname, .sbat and later additions.
var measuredSectionOrder252 = []string{
	".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".pcrpkey",
}

// DefaultPhasePaths are the boot phase paths systemd-measure calculates by
// default: systemd-pcrphase extends each phase word into PCR 11 as the boot
// goes on.
var DefaultPhasePaths = []string{
	"enter-initrd",
	"enter-initrd:leave-initrd",
	"enter-initrd:leave-initrd:sysinit",
	"enter-initrd:leave-initrd:sysinit:ready",
}

// MeasuredSection is one UKI section as systemd-stub measures it.
type MeasuredSection struct {
	Name string
	Data []byte
}

// PCRValue is the expected PCR 11 value after a phase path, shaped like an
// entry of `systemd-measure calculate --json` output.
type PCRValue struct {
	Phase string `json:"phase"`
	PCR   int    `json:"pcr"`
	Hash  string `json:"hash"`
}

// PCR11 maps a bank name ("sha1", "sha256", "sha384", "sha512") to the
// expected values per phase path, like `systemd-measure calculate --json`.
type PCR11 map[string][]PCRValue

var pcrBanks = []struct {
	name string
	h    crypto.Hash
}{{"sha1", crypto.SHA1}, {"sha256", crypto.SHA256}, {"sha384", crypto.SHA384}, {"sha512", crypto.SHA512}}

// measuredSections lists the sections of an assembled UKI that the stub of
// the given version measures, in measurement order.
func (p *peImage) measuredSections(stubVersion string) []MeasuredSection {
	order := measuredSectionOrder
	if v, err := strconv.Atoi(strings.SplitN(stubVersion, ".", 2)[0]); err == nil && v <= 252 {
		order = measuredSectionOrder252
	}
	var out []MeasuredSection
	for _, name := range order {
		if i := p.find(name); i >= 0 {
			out = append(out, MeasuredSection{name, p.sectionData(&p.sections[i])})
		}
	}
	return out
}

// PredictPCR11 computes PCR 11 as systemd-stub leaves it (for each section:
// one event over the section name including its NUL, one over its data)
// and then after each phase path (each phase word extended as UTF-8 without
// NUL). phasePaths nil means DefaultPhasePaths.
func PredictPCR11(sections []MeasuredSection, phasePaths []string) PCR11 {
	if phasePaths == nil {
		phasePaths = DefaultPhasePaths
	}
	res := PCR11{}
	for _, bank := range pcrBanks {
		pcr := make([]byte, bank.h.Size())
		extend := func(data []byte) {
			d := bank.h.New()
			d.Write(data)
			ev := d.Sum(nil)
			h := bank.h.New()
			h.Write(pcr)
			h.Write(ev)
			pcr = h.Sum(nil)
		}
		for _, s := range sections {
			extend(append([]byte(s.Name), 0))
			extend(s.Data)
		}
		base := append([]byte(nil), pcr...)
		for _, path := range phasePaths {
			pcr = append([]byte(nil), base...)
			for _, word := range strings.Split(path, ":") {
				if word != "" {
					extend([]byte(word))
				}
			}
			res[bank.name] = append(res[bank.name], PCRValue{Phase: path, PCR: 11, Hash: hex.EncodeToString(pcr)})
		}
	}
	return res
}
