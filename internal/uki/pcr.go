package uki

import (
	"crypto"
	"crypto/rsa"
	_ "crypto/sha1" // PCR banks
	"crypto/sha256"
	_ "crypto/sha512"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
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

// policyPCRDigest is the TPM2 policy digest of TPM2_PolicyPCR over PCR 11
// of the sha256 bank holding value, starting from an empty policy:
// H(0…0 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION{sha256: PCR 11} || H(value)).
func policyPCRDigest(value []byte) []byte {
	const ccPolicyPCR, algSHA256 = 0x0000017f, 0x000b
	pcrDigest := sha256.Sum256(value)
	b := make([]byte, sha256.Size, 128)
	b = binary.BigEndian.AppendUint32(b, ccPolicyPCR)
	b = binary.BigEndian.AppendUint32(b, 1) // one selection
	b = binary.BigEndian.AppendUint16(b, algSHA256)
	b = append(b, 3, 0, 1<<(11-8), 0) // 3 bitmap bytes, PCR 11
	b = append(b, pcrDigest[:]...)
	d := sha256.Sum256(b)
	return d[:]
}

// PCRSignature is one entry of a .pcrsig section (systemd-measure sign).
type PCRSignature struct {
	PCRs        []int  `json:"pcrs"`
	Fingerprint string `json:"pkfp"` // sha256 of the PKCS#1 DER public key
	Policy      string `json:"pol"`  // TPM2 PolicyPCR digest
	Signature   string `json:"sig"`  // base64 RSA PKCS#1 v1.5 signature over the policy digest (SHA-256)
}

// signPCR11 produces .pcrsig JSON for the sha256 bank.
func signPCR11(key crypto.Signer, sections []MeasuredSection, phasePaths []string) ([]byte, error) {
	pub, ok := key.Public().(*rsa.PublicKey)
	if !ok {
		return nil, errors.New("PCR signing key: only RSA keys are supported")
	}
	fp := sha256.Sum256(x509.MarshalPKCS1PublicKey(pub))
	var out []PCRSignature
	for _, v := range PredictPCR11(sections, phasePaths)["sha256"] {
		value, _ := hex.DecodeString(v.Hash)
		pol := policyPCRDigest(value)
		h := sha256.Sum256(pol)
		sig, err := key.Sign(nil, h[:], crypto.SHA256)
		if err != nil {
			return nil, fmt.Errorf("sign PCR 11 policy for %s: %w", v.Phase, err)
		}
		out = append(out, PCRSignature{PCRs: []int{11}, Fingerprint: hex.EncodeToString(fp[:]),
			Policy: hex.EncodeToString(pol), Signature: base64.StdEncoding.EncodeToString(sig)})
	}
	return json.Marshal(map[string][]PCRSignature{"sha256": out})
}

// publicKeyPEM is the PEM SubjectPublicKeyInfo of key, the .pcrpkey format.
func publicKeyPEM(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return nil, fmt.Errorf("PCR signing key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}
