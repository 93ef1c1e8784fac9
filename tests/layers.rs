//! The import rule of `runtime/src` (docs/ARCHITECTURE.md): a layer imports only the layers
//! below it. Every source file belongs to a layer; every `crate::x` and `super::` path that
//! reaches the crate root names a top-level module, and that module's layer must be one the
//! file's layer may import. A new top-level module or file fails here until it is given a layer.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// (layer, the top-level modules it consists of, the layers it may import besides itself).
const LAYERS: &[(&str, &[&str], &[&str])] = &[
    ("base", &["error", "files", "mem"], &[]),
    ("backend", &["backend"], &["base"]),
    ("protocol", &["protocol"], &["base", "backend"]),
    ("nn", &["nn"], &["base", "backend", "protocol"]),
    ("model", &["model"], &["base", "backend", "protocol", "nn"]),
    ("data", &["data"], &["base", "protocol"]),
    ("args", &["args"], &["base", "backend", "protocol"]),
    ("plugin", &["plugin"], &["base", "protocol"]),
    ("engine", &["engine"], &["base", "backend", "protocol", "nn", "model"]),
    ("generate", &["generate"], &["base", "backend", "protocol", "nn", "model", "engine"]),
    ("train", &["train"], &["base", "backend", "protocol", "nn", "model", "engine", "data", "args", "plugin", "generate"]),
    (
        "command line",
        &["main", "commands", "bench", "example", "jobs", "tools"],
        &["base", "backend", "protocol", "nn", "model", "engine", "data", "args", "plugin", "generate", "train"],
    ),
];

fn layer_of(module: &str) -> Option<&'static str> {
    LAYERS.iter().find(|(_, mods, _)| mods.contains(&module)).map(|(name, _, _)| *name)
}

fn may_import(layer: &str, other: &str) -> bool {
    layer == other || LAYERS.iter().any(|(name, _, allowed)| *name == layer && allowed.contains(&other))
}

/// The source without comments (doc links name other layers without importing them).
fn code_only(src: &str) -> String {
    src.lines().map(|l| l.find("//").map_or(l, |i| &l[..i])).collect::<Vec<_>>().join("\n")
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules a file's code names. `module` is the file's module path
/// (`["backend", "cpu", "loss"]`), which `super::` is resolved against. Grouped imports from
/// the crate root (`crate::{a, b}`) are reported as `{` so that they are written out instead.
fn named_modules(module: &[String], src: &str) -> BTreeSet<String> {
    let code = code_only(src);
    let mut out = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        let after = &rest[i + "crate::".len()..];
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(if after.starts_with('{') { "{".to_string() } else { ident_at(after).to_string() });
        }
        rest = after;
    }
    let mut rest = code.as_str();
    while let Some(i) = rest.find("super::") {
        let before = rest[..i].chars().last();
        let mut after = &rest[i..];
        let mut ups = 0;
        while let Some(a) = after.strip_prefix("super::") {
            ups += 1;
            after = a;
        }
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            // `super` of a module at depth d is its parent; reaching the root names a top module
            if ups >= module.len() {
                out.insert(if after.starts_with('{') || after.starts_with('*') { "{".to_string() } else { ident_at(after).to_string() });
            }
        }
        rest = &rest[i + "super::".len()..];
    }
    out
}

/// The module path of a file under `src`: `backend/cpu/loss.rs` -> backend::cpu::loss,
/// `backend/mod.rs` -> backend, `main.rs` -> main.
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The violations of one file: "path: layer `x` imports `y` (layer `z`)".
fn violations(rel: &Path, src: &str) -> Vec<String> {
    let module = module_path(rel);
    if module == ["lib"] {
        return Vec::new(); // declares the modules
    }
    let Some(layer) = layer_of(&module[0]) else {
        return vec![format!("{}: top-level module `{}` has no layer in LAYERS (and docs/ARCHITECTURE.md)", rel.display(), module[0])];
    };
    let mut out = Vec::new();
    for named in named_modules(&module, src) {
        if named == "{" {
            out.push(format!("{}: a grouped import from the crate root (`crate::{{..}}` or `super::{{..}}` to the root); name each module", rel.display()));
            continue;
        }
        match layer_of(&named) {
            Some(other) if may_import(layer, other) => {}
            Some(other) => out.push(format!("{}: layer `{layer}` imports `{named}` (layer `{other}`)", rel.display())),
            None => out.push(format!("{}: names `{named}`, a top-level module with no layer", rel.display())),
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_layer_imports_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(files.len() > 40, "found only {} source files under {}", files.len(), src.display());
    let mut all = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        all.extend(violations(rel, &std::fs::read_to_string(f).unwrap()));
    }
    assert!(all.is_empty(), "the import rule is broken:\n{}", all.join("\n"));
}

#[test]
fn the_rule_sees_upward_imports_in_every_form() {
    let v = |path: &str, src: &str| violations(Path::new(path), src);
    // the direct form, at any depth
    assert_eq!(v("backend/cpu/loss.rs", "use crate::model::Batch;"), ["backend/cpu/loss.rs: layer `backend` imports `model` (layer `model`)"]);
    assert_eq!(v("data/collate.rs", "fn f() -> crate::model::Batch { todo!() }").len(), 1);
    assert_eq!(v("backend/cuda/mod.rs", "let x = crate::train::optimizer::AdamW::new();").len(), 1);
    // super:: that climbs to the crate root
    assert_eq!(v("backend/mod.rs", "use super::model::Model;").len(), 1);
    assert_eq!(v("backend/cpu/loss.rs", "use super::super::super::train::X;").len(), 1);
    assert!(v("backend/cpu/loss.rs", "use super::math;\nuse super::super::AttnShape;").is_empty(), "super:: inside the layer");
    // grouped imports from the root are refused, so nothing hides in braces
    assert_eq!(v("model/decoder.rs", "use crate::{backend::Backend, train::Trainer};").len(), 1);
    // a module with no layer, and a file of a module with no layer
    assert_eq!(v("backend/mod.rs", "use crate::somewhere::X;").len(), 1);
    assert_eq!(v("newthing/mod.rs", "").len(), 1);
    // allowed: downward, sideways within a layer, comments, and names that merely end in `crate`
    assert!(v("train/trainer.rs", "use crate::model::Model;\nuse crate::data::Example;\nuse crate::plugin::roles::Plugins;").is_empty());
    assert!(v("files.rs", "use crate::error::Result;").is_empty());
    assert!(v("model/mod.rs", "/// see [`crate::train::Trainer`]\nlet a = 1; // crate::train").is_empty());
    assert!(v("model/mod.rs", "let x = mycrate::train::X;").is_empty());
    assert!(v("main.rs", "use runtime::train::Trainer;").is_empty());
}

/// The length of each function in `src` (from its `fn` line to the brace that closes it at the
/// same indentation), by file and name.
fn function_lengths(src: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = src.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let indent = &l[..l.len() - t.len()];
        let t = t.strip_prefix("pub ").or_else(|| t.strip_prefix("pub(super) ")).or_else(|| t.strip_prefix("pub(crate) ")).unwrap_or(t);
        let Some(rest) = t.strip_prefix("fn ") else { continue };
        if l.trim_end().ends_with(';') {
            continue; // a trait method without a body
        }
        let close = format!("{indent}}}");
        if let Some(end) = lines[i..].iter().position(|x| *x == close) {
            out.push((ident_at(rest).to_string(), end + 1));
        }
    }
    out
}

/// Files a reader can hold in mind: none over about 600 lines; and the trainer and the engine in
/// functions of at most about 80 lines (what each function does fits on a screen).
#[test]
fn files_and_the_trainer_and_engine_functions_stay_small() {
    const MAX_FILE_LINES: usize = 620;
    const MAX_FN_LINES: usize = 80;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut big = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let rel = f.strip_prefix(&src).unwrap();
        let n = text.lines().count();
        if n > MAX_FILE_LINES {
            big.push(format!("{}: {n} lines (at most {MAX_FILE_LINES})", rel.display()));
        }
        if rel.starts_with("train") || rel.starts_with("engine") {
            for (name, len) in function_lengths(&text) {
                if len > MAX_FN_LINES {
                    big.push(format!("{}: fn {name} is {len} lines (at most {MAX_FN_LINES})", rel.display()));
                }
            }
        }
    }
    assert!(big.is_empty(), "too big:\n{}", big.join("\n"));
    // the measure itself
    let f = "fn a() {\n    x;\n}\n    pub(super) fn b(&self) -> u8 {\n        1\n    }\n    fn c(&self);\n";
    assert_eq!(function_lengths(f), [("a".to_string(), 3), ("b".to_string(), 3)]);
}
