// Package jsonschema checks JSON documents against the subset of JSON
// Schema berth's own schemas use (docs/status.schema.json). Only tests
// import it: berth does not validate its own output at run time, so the
// binaries do not link it.
package jsonschema

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
	"sort"
	"strings"
)

// Validate checks doc against schema, supporting the subset of
// JSON Schema (2020-12) that docs/status.schema.json uses: type (a name or
// a list), properties, required, additionalProperties (boolean), items,
// enum, const, pattern, minimum, $defs with local $ref. Anything else in
// the schema is an error, so the schema cannot silently say more than is
// checked.
func Validate(schema, doc []byte) error {
	var s map[string]any
	if err := json.Unmarshal(schema, &s); err != nil {
		return fmt.Errorf("parse schema: %w", err)
	}
	d := json.NewDecoder(bytes.NewReader(doc))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		return fmt.Errorf("parse document: %w", err)
	}
	return validate(s, s, v, "$")
}

var schemaKeywords = map[string]bool{
	"$schema": true, "$id": true, "$defs": true, "$ref": true, "$comment": true, "title": true, "description": true,
	"type": true, "properties": true, "required": true, "additionalProperties": true, "items": true,
	"enum": true, "const": true, "pattern": true, "minimum": true,
}

func validate(root, s map[string]any, v any, at string) error {
	for k := range s {
		if !schemaKeywords[k] {
			return fmt.Errorf("%s: schema keyword %q is not supported by this validator", at, k)
		}
	}
	if ref, ok := s["$ref"].(string); ok {
		name, found := strings.CutPrefix(ref, "#/$defs/")
		defs, _ := root["$defs"].(map[string]any)
		sub, _ := defs[name].(map[string]any)
		if !found || sub == nil {
			return fmt.Errorf("%s: unresolvable $ref %q", at, ref)
		}
		return validate(root, sub, v, at)
	}
	if t, ok := s["type"]; ok {
		var types []string
		switch t := t.(type) {
		case string:
			types = []string{t}
		case []any:
			for _, x := range t {
				types = append(types, fmt.Sprint(x))
			}
		}
		if !typeMatches(types, v) {
			return fmt.Errorf("%s: %s is not of type %v", at, jsonKind(v), types)
		}
	}
	if e, ok := s["enum"].([]any); ok {
		found := false
		for _, x := range e {
			if fmt.Sprint(x) == fmt.Sprint(v) {
				found = true
			}
		}
		if !found {
			return fmt.Errorf("%s: %v is not one of %v", at, v, e)
		}
	}
	if c, ok := s["const"]; ok && fmt.Sprint(c) != fmt.Sprint(v) {
		return fmt.Errorf("%s: %v is not %v", at, v, c)
	}
	if p, ok := s["pattern"].(string); ok {
		if str, isStr := v.(string); isStr {
			re, err := regexp.Compile(p)
			if err != nil {
				return fmt.Errorf("%s: bad pattern %q: %w", at, p, err)
			}
			if !re.MatchString(str) {
				return fmt.Errorf("%s: %q does not match %s", at, str, p)
			}
		}
	}
	if m, ok := s["minimum"].(float64); ok {
		if n, isNum := v.(json.Number); isNum {
			f, _ := n.Float64()
			if f < m {
				return fmt.Errorf("%s: %v is less than %v", at, n, m)
			}
		}
	}
	if obj, ok := v.(map[string]any); ok {
		props, _ := s["properties"].(map[string]any)
		if req, ok := s["required"].([]any); ok {
			for _, r := range req {
				if _, has := obj[fmt.Sprint(r)]; !has {
					return fmt.Errorf("%s: required property %q is missing", at, r)
				}
			}
		}
		keys := make([]string, 0, len(obj))
		for k := range obj {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			sub, known := props[k].(map[string]any)
			if !known {
				if ap, ok := s["additionalProperties"].(bool); ok && !ap {
					return fmt.Errorf("%s: property %q is not in the schema", at, k)
				}
				continue
			}
			if err := validate(root, sub, obj[k], at+"."+k); err != nil {
				return err
			}
		}
	}
	if arr, ok := v.([]any); ok {
		if items, ok := s["items"].(map[string]any); ok {
			for i, x := range arr {
				if err := validate(root, items, x, fmt.Sprintf("%s[%d]", at, i)); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

func jsonKind(v any) string {
	switch v := v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case json.Number:
		if _, err := v.Int64(); err == nil {
			return "integer"
		}
		return "number"
	case string:
		return "string"
	case []any:
		return "array"
	case map[string]any:
		return "object"
	}
	return fmt.Sprintf("%T", v)
}

func typeMatches(types []string, v any) bool {
	k := jsonKind(v)
	for _, t := range types {
		if t == k || (t == "number" && k == "integer") {
			return true
		}
	}
	return false
}
