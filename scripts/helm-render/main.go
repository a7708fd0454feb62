// helm-render: renders a Helm 3 chart like `helm template`, for machines without a helm binary.
//
// It reproduces Helm's template engine: Go text/template with sprig (minus env/expandenv, as
// Helm), plus Helm's include, tpl, required, toYaml, fromYaml, toJson, fromJson, lookup
// (always empty, as in `helm template`), the .Values/.Release/.Chart/.Capabilities/.Files/
// .Template objects, missingkey=zero with "<no value>" removed, values read the way Helm
// reads them (YAML -> JSON, so every number is a float64), user value files deep-merged over
// values.yaml (null deletes a key), and templates/_* as partials. values.schema.json is NOT
// validated here: scripts/helm-check validates the merged values (--values-out) with a JSON
// Schema library, as Helm would before rendering.
//
// Usage: helm-render -chart DIR [-f values.yaml]... [-name herald] [-namespace herald]
//
//	[-kube-version v1.30.0] [-values-out merged.json] [-notes-out NOTES]
//
// Prints the manifests as `---\n# Source: <chart>/templates/<file>` documents.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"gopkg.in/yaml.v3"
)

type valueFiles []string

func (v *valueFiles) String() string     { return strings.Join(*v, ",") }
func (v *valueFiles) Set(s string) error { *v = append(*v, s); return nil }

// Files is Helm's .Files: every chart file outside templates/ (symlinks followed).
type Files map[string][]byte

func (f Files) Get(name string) string      { return string(f[name]) }
func (f Files) GetBytes(name string) []byte { return f[name] }
func (f Files) Glob(pattern string) Files {
	out := Files{}
	for name, data := range f {
		if ok, _ := path.Match(pattern, name); ok {
			out[name] = data
		}
	}
	return out
}
func (f Files) AsConfig() string {
	if len(f) == 0 {
		return ""
	}
	m := map[string]string{}
	for name, data := range f {
		m[path.Base(name)] = string(data)
	}
	return toYAML(m)
}
func (f Files) AsSecrets() string {
	if len(f) == 0 {
		return ""
	}
	m := map[string]string{}
	for name, data := range f {
		m[path.Base(name)] = sprig.TxtFuncMap()["b64enc"].(func(interface{}) string)(string(data))
	}
	return toYAML(m)
}
func (f Files) Lines(name string) []string {
	s := strings.TrimRight(string(f[name]), "\n")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

// VersionSet is .Capabilities.APIVersions.
type VersionSet []string

func (v VersionSet) Has(apiVersion string) bool {
	for _, x := range v {
		if x == apiVersion {
			return true
		}
	}
	return false
}

func toYAML(v interface{}) string {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(v); err != nil {
		return ""
	}
	return strings.TrimSuffix(buf.String(), "\n")
}

// helmValue converts YAML-decoded data to what Helm hands templates: JSON types.
func helmValue(v interface{}) (interface{}, error) {
	data, err := json.Marshal(jsonable(v))
	if err != nil {
		return nil, err
	}
	var out interface{}
	err = json.Unmarshal(data, &out)
	return out, err
}

func jsonable(v interface{}) interface{} {
	switch t := v.(type) {
	case map[string]interface{}:
		out := map[string]interface{}{}
		for k, x := range t {
			out[k] = jsonable(x)
		}
		return out
	case map[interface{}]interface{}:
		out := map[string]interface{}{}
		for k, x := range t {
			out[fmt.Sprint(k)] = jsonable(x)
		}
		return out
	case []interface{}:
		out := make([]interface{}, len(t))
		for i, x := range t {
			out[i] = jsonable(x)
		}
		return out
	}
	return v
}

func readValues(file string) (map[string]interface{}, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var raw interface{}
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	if raw == nil {
		return map[string]interface{}{}, nil
	}
	v, err := helmValue(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	m, ok := v.(map[string]interface{})
	if !ok {
		return nil, fmt.Errorf("%s: top level is not a map", file)
	}
	return m, nil
}

// coalesce merges src over dst like Helm: maps recursively, a null in src deletes the key.
func coalesce(dst, src map[string]interface{}) {
	for k, v := range src {
		if v == nil {
			delete(dst, k)
			continue
		}
		sm, sok := v.(map[string]interface{})
		dm, dok := dst[k].(map[string]interface{})
		if sok && dok {
			coalesce(dm, sm)
			continue
		}
		dst[k] = v
	}
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "helm-render: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	var files valueFiles
	chartDir := flag.String("chart", "", "chart directory")
	name := flag.String("name", "herald", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	kubeVersion := flag.String("kube-version", "v1.30.0", "Kubernetes version for .Capabilities")
	valuesOut := flag.String("values-out", "", "write the merged values (JSON) here")
	notesOut := flag.String("notes-out", "", "write the rendered NOTES.txt here")
	flag.Var(&files, "f", "values file (repeatable)")
	flag.Parse()
	if *chartDir == "" {
		fail("-chart is required")
	}

	var chartMeta map[string]interface{}
	data, err := os.ReadFile(filepath.Join(*chartDir, "Chart.yaml"))
	if err != nil {
		fail("%v", err)
	}
	if err := yaml.Unmarshal(data, &chartMeta); err != nil {
		fail("Chart.yaml: %v", err)
	}
	chartName, _ := chartMeta["name"].(string)
	if chartName == "" {
		fail("Chart.yaml: name is required")
	}
	chart := map[string]interface{}{}
	for k, v := range chartMeta { // Helm exposes Chart.yaml fields capitalised (.Chart.AppVersion)
		chart[strings.ToUpper(k[:1])+k[1:]] = v
	}

	values, err := readValues(filepath.Join(*chartDir, "values.yaml"))
	if err != nil {
		fail("%v", err)
	}
	for _, f := range files {
		user, err := readValues(f)
		if err != nil {
			fail("%v", err)
		}
		coalesce(values, user)
	}
	if *valuesOut != "" {
		data, _ := json.MarshalIndent(values, "", "  ")
		if err := os.WriteFile(*valuesOut, data, 0o644); err != nil {
			fail("%v", err)
		}
	}

	chartFiles := Files{}
	templates := map[string]string{}
	var walk func(dir, rel string)
	walk = func(dir, rel string) {
		entries, err := os.ReadDir(dir)
		if err != nil {
			fail("%v", err)
		}
		for _, e := range entries {
			full := filepath.Join(dir, e.Name())
			relName := path.Join(rel, e.Name())
			info, err := os.Stat(full) // follows symlinks, as Helm does
			if err != nil {
				fail("%v", err)
			}
			if info.IsDir() {
				walk(full, relName)
				continue
			}
			data, err := os.ReadFile(full)
			if err != nil {
				fail("%v", err)
			}
			if strings.HasPrefix(relName, "templates/") {
				templates[chartName+"/"+relName] = string(data)
			} else if relName != "Chart.yaml" && relName != "values.yaml" && relName != "values.schema.json" {
				chartFiles[relName] = data
			}
		}
	}
	walk(*chartDir, "")

	kv := strings.TrimPrefix(*kubeVersion, "v")
	parts := strings.SplitN(kv, ".", 3)
	if len(parts) < 2 {
		fail("-kube-version: want vMAJOR.MINOR.PATCH")
	}
	top := map[string]interface{}{
		"Values": values,
		"Chart":  chart,
		"Release": map[string]interface{}{
			"Name": *name, "Namespace": *namespace, "Service": "Helm",
			"IsInstall": true, "IsUpgrade": false, "Revision": 1,
		},
		"Capabilities": map[string]interface{}{
			"KubeVersion": map[string]interface{}{
				"Version": "v" + kv, "GitVersion": "v" + kv, "Major": parts[0], "Minor": parts[1],
			},
			"APIVersions": VersionSet{"v1", "apps/v1", "policy/v1", "autoscaling/v2", "networking.k8s.io/v1"},
			"HelmVersion": map[string]interface{}{"Version": "v3.16.0"},
		},
		"Files": chartFiles,
	}

	root := template.New("gotpl").Option("missingkey=zero")
	funcs := sprig.TxtFuncMap()
	delete(funcs, "env")
	delete(funcs, "expandenv")
	includeDepth := map[string]int{}
	funcs["include"] = func(name string, data interface{}) (string, error) {
		if includeDepth[name] > 1000 {
			return "", fmt.Errorf("rendering template has a nested reference name: %s", name)
		}
		includeDepth[name]++
		defer func() { includeDepth[name]-- }()
		var buf bytes.Buffer
		err := root.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	funcs["tpl"] = func(text string, data interface{}) (string, error) {
		t, err := root.Clone()
		if err != nil {
			return "", err
		}
		t, err = t.New("tpl").Parse(text)
		if err != nil {
			return "", err
		}
		var buf bytes.Buffer
		err = t.Execute(&buf, data)
		return strings.ReplaceAll(buf.String(), "<no value>", ""), err
	}
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil {
			return v, fmt.Errorf("%s", msg)
		}
		if s, ok := v.(string); ok && s == "" {
			return v, fmt.Errorf("%s", msg)
		}
		return v, nil
	}
	funcs["toYaml"] = func(v interface{}) string { return toYAML(v) }
	funcs["fromYaml"] = func(s string) map[string]interface{} {
		var raw interface{}
		if err := yaml.Unmarshal([]byte(s), &raw); err != nil {
			return map[string]interface{}{"Error": err.Error()}
		}
		v, _ := helmValue(raw)
		m, _ := v.(map[string]interface{})
		return m
	}
	funcs["toJson"] = func(v interface{}) string {
		data, err := json.Marshal(v)
		if err != nil {
			return ""
		}
		return string(data)
	}
	funcs["fromJson"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	funcs["lookup"] = func(string, string, string, string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	root.Funcs(funcs)

	names := make([]string, 0, len(templates))
	for n := range templates {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if _, err := root.New(n).Parse(templates[n]); err != nil {
			fail("parse error: %v", err)
		}
	}

	render := func(n string) string {
		tmplTop := map[string]interface{}{}
		for k, v := range top {
			tmplTop[k] = v
		}
		tmplTop["Template"] = map[string]interface{}{"Name": n, "BasePath": chartName + "/templates"}
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, n, tmplTop); err != nil {
			fail("execution error: %v", err)
		}
		return strings.ReplaceAll(buf.String(), "<no value>", "")
	}

	var out strings.Builder
	for _, n := range names {
		base := path.Base(n)
		if strings.HasPrefix(base, "_") {
			continue
		}
		rendered := render(n)
		if base == "NOTES.txt" {
			if *notesOut != "" {
				if err := os.WriteFile(*notesOut, []byte(rendered), 0o644); err != nil {
					fail("%v", err)
				}
			}
			continue
		}
		if strings.TrimSpace(rendered) == "" {
			continue
		}
		fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", n, strings.TrimSpace(rendered))
	}
	fmt.Print(out.String())
}
