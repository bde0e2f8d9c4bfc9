//! The crate's layering, checked: every module uses only modules of a lower layer (or
//! itself), and no source file depends on itself through others. Reads `src/` as text; no
//! stack needed. Run it alone with `cargo test --test layers`.
//!
//! What counts as a dependency: every `use` and every path through `crate::`, `super::`,
//! `self::` or a child module, in code (comments, strings and `#[cfg(test)]` modules
//! aside). A path to an item re-exported by a module (`pub use child::Item`) counts as a
//! dependency on the file that defines it; the re-export itself is the module's interface,
//! not a dependency of the module's own code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers, bottom up: a module may use modules of a lower layer.
const LAYERS: &[&[&str]] = &[
    &[
        "secret",
        "tls",
        "net",
        "backoff",
        "metrics",
        "signals",
        "wake",
        "failpoint",
    ],
    &["config"],
    &["auth", "clickhouse", "kafka"],
    &["upstream"],
    &["picker"],
    &["gateway", "sink"],
    &["admin", "http", "native"],
    &["ingest", "proxy", "cdc"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// A source file: its module path (`["picker", "view"]`) and its code.
struct Source {
    module: Vec<String>,
    /// `mod.rs` and `lib.rs`: the module is the directory.
    is_dir_module: bool,
    code: String,
}

fn sources() -> BTreeMap<PathBuf, Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&root).unwrap();
            let mut module: Vec<String> = rel
                .iter()
                .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            let last = module.pop().unwrap();
            let is_dir_module = last == "mod" || last == "lib" || last == "main";
            if last == "main" {
                continue;
            }
            if !is_dir_module {
                module.push(last);
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = without_test_modules(&strip(&text));
            out.insert(
                rel.to_path_buf(),
                Source {
                    module,
                    is_dir_module,
                    code,
                },
            );
        }
    }
    out
}

/// The text with comments, strings and char literals blanked out (lines kept).
fn strip(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < c.len() {
        if c[i] == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            loop {
                if i >= c.len() {
                    break;
                }
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && (at(i + 1) == '"' || (at(i + 1) == '#' && matches!(at(i + 2), '"' | '#')))
            && (i == 0 || !(c[i - 1].is_alphanumeric() || c[i - 1] == '_'))
        {
            // A raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            j += 1;
            'raw: while j < c.len() {
                if c[j] == '"' && (0..hashes).all(|h| c.get(j + 1 + h) == Some(&'#')) {
                    j += 1 + hashes;
                    break 'raw;
                }
                if c[j] == '\n' {
                    out.push('\n');
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                if c.get(i) == Some(&'\n') {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c[i] == '\''
            && (at(i + 2) == '\'' || (at(i + 1) == '\\' && c[i + 2..].contains(&'\'')))
        {
            // A char literal ('x', '\n', '\u{..}'); anything else after a quote is a lifetime.
            let mut j = i + 1;
            if c[j] == '\\' {
                j += 2;
            } else {
                j += 1;
            }
            while j < c.len() && c[j] != '\'' {
                j += 1;
            }
            i = j + 1;
            out.push_str("' '");
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// The code without `#[cfg(test)] mod ... { ... }` blocks.
fn without_test_modules(code: &str) -> String {
    let mut out = code.to_string();
    while let Some(at) = out.find("#[cfg(test)]") {
        let after = &out[at + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        let is_mod = trimmed.starts_with("mod ")
            || trimmed.starts_with("pub mod ")
            || trimmed.starts_with("pub(crate) mod ");
        let Some(open) = after.find('{').filter(|_| is_mod) else {
            // An attribute on something else: drop just the attribute.
            out.replace_range(at..at + "#[cfg(test)]".len(), "");
            continue;
        };
        let start = at + "#[cfg(test)]".len() + open;
        let mut depth = 0;
        let mut end = start;
        for (k, ch) in out[start..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = start + k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.replace_range(at..end, "");
    }
    out
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// Every path in `code` that starts at `crate`, `super`, `self` or one of `children`,
/// expanded (`a::{b, c::d}` gives `a::b` and `a::c::d`), with whether it is a `pub use`.
fn paths(code: &str, children: &BTreeSet<String>) -> Vec<(Vec<String>, bool)> {
    let c: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        if !is_ident(c[i]) || (i > 0 && (is_ident(c[i - 1]) || c[i - 1] == ':')) {
            i += 1;
            continue;
        }
        let start = i;
        while i < c.len() && is_ident(c[i]) {
            i += 1;
        }
        let word: String = c[start..i].iter().collect();
        let rooted =
            matches!(word.as_str(), "crate" | "super" | "self") || children.contains(&word);
        if !rooted || c.get(i) != Some(&':') || c.get(i + 1) != Some(&':') {
            continue;
        }
        // Is this path the start of a `pub use`?
        let before: String = c[..start]
            .iter()
            .rev()
            .take(40)
            .collect::<String>()
            .chars()
            .rev()
            .collect();
        let is_pub_use =
            before.trim_end().ends_with("pub use") || before.trim_end().ends_with("pub(crate) use");
        let mut expanded = Vec::new();
        i = expand(&c, i, vec![word], &mut expanded);
        out.extend(expanded.into_iter().map(|p| (p, is_pub_use)));
    }
    out
}

/// Reads `::seg::seg` or `::{...}` after `prefix`; returns where it stopped.
fn expand(c: &[char], mut i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix;
    loop {
        if c.get(i) != Some(&':') || c.get(i + 1) != Some(&':') {
            out.push(path);
            return i;
        }
        i += 2;
        while c.get(i).is_some_and(|ch| ch.is_whitespace()) {
            i += 1;
        }
        if c.get(i) == Some(&'{') {
            i += 1;
            loop {
                while c.get(i).is_some_and(|ch| ch.is_whitespace() || *ch == ',') {
                    i += 1;
                }
                match c.get(i) {
                    None => return i,
                    Some('}') => return i + 1,
                    _ => {}
                }
                let start = i;
                while c.get(i).is_some_and(|ch| is_ident(*ch) || *ch == '*') {
                    i += 1;
                }
                let seg: String = c[start..i].iter().collect();
                if seg.is_empty() {
                    i += 1;
                    continue;
                }
                let mut sub = path.clone();
                if seg != "self" {
                    sub.push(seg);
                }
                i = expand(c, i, sub, out);
                // Skip `as alias`.
                while c.get(i).is_some_and(|ch| *ch != ',' && *ch != '}') {
                    i += 1;
                }
            }
        }
        let start = i;
        while c.get(i).is_some_and(|ch| is_ident(*ch)) {
            i += 1;
        }
        if start == i {
            out.push(path);
            return i;
        }
        path.push(c[start..i].iter().collect());
    }
}

struct Crate {
    sources: BTreeMap<PathBuf, Source>,
    /// Module path -> file.
    files: BTreeMap<Vec<String>, PathBuf>,
    /// (module path, exported name) -> the absolute path it re-exports.
    reexports: BTreeMap<(Vec<String>, String), Vec<String>>,
}

impl Crate {
    fn load() -> Self {
        let sources = sources();
        let files = sources
            .iter()
            .map(|(p, s)| (s.module.clone(), p.clone()))
            .collect();
        let mut krate = Crate {
            sources,
            files,
            reexports: BTreeMap::new(),
        };
        let mut reexports = BTreeMap::new();
        for s in krate.sources.values() {
            for (path, is_pub_use) in paths(&s.code, &krate.children(&s.module)) {
                if is_pub_use {
                    if let Some(abs) = krate.absolute(s, &path) {
                        if let Some(name) = abs.last().cloned() {
                            reexports.insert((s.module.clone(), name), abs);
                        }
                    }
                }
            }
        }
        krate.reexports = reexports;
        krate
    }

    fn children(&self, module: &[String]) -> BTreeSet<String> {
        self.files
            .keys()
            .filter(|m| m.len() == module.len() + 1 && m.starts_with(module))
            .map(|m| m.last().unwrap().clone())
            .collect()
    }

    /// `path` as seen from `s`, made absolute (without `crate`).
    fn absolute(&self, s: &Source, path: &[String]) -> Option<Vec<String>> {
        let (first, rest) = path.split_first()?;
        let mut base: Vec<String> = match first.as_str() {
            "crate" => Vec::new(),
            "self" => s.module.clone(),
            "super" => {
                let mut m = s.module.clone();
                m.pop()?;
                m
            }
            child => {
                let mut m = s.module.clone();
                m.push(child.to_string());
                m
            }
        };
        let mut rest = rest;
        while rest.first().is_some_and(|r| r == "super") {
            base.pop()?;
            rest = &rest[1..];
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    /// The file an absolute path's item is defined in, through re-exports.
    fn file_of(&self, path: &[String], depth: usize) -> Option<PathBuf> {
        let mut module = Vec::new();
        for (k, seg) in path.iter().enumerate() {
            let mut next = module.clone();
            next.push(seg.clone());
            if self.files.contains_key(&next) {
                module = next;
                continue;
            }
            if depth < 8 {
                if let Some(target) = self.reexports.get(&(module.clone(), seg.clone())) {
                    let mut full = target.clone();
                    full.extend(path[k + 1..].iter().cloned());
                    if full != path {
                        return self.file_of(&full, depth + 1);
                    }
                }
            }
            break;
        }
        self.files.get(&module).cloned()
    }

    /// Every file each file depends on.
    fn graph(&self) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
        let mut graph = BTreeMap::new();
        for (file, s) in &self.sources {
            let mut deps = BTreeSet::new();
            for (path, is_pub_use) in paths(&s.code, &self.children(&s.module)) {
                if is_pub_use && s.is_dir_module {
                    continue;
                }
                let Some(abs) = self.absolute(s, &path) else {
                    continue;
                };
                if let Some(dep) = self.file_of(&abs, 0) {
                    if &dep != file {
                        deps.insert(dep);
                    }
                }
            }
            graph.insert(file.clone(), deps);
        }
        graph
    }
}

#[test]
fn every_module_uses_only_lower_layers() {
    let krate = Crate::load();
    let mut wrong = Vec::new();
    for (file, s) in &krate.sources {
        let Some(top) = s.module.first() else {
            continue;
        };
        let Some(own) = layer_of(top) else {
            wrong.push(format!(
                "{}: module {top} is in no layer of tests/layers.rs",
                file.display()
            ));
            continue;
        };
        for (path, _) in paths(&s.code, &krate.children(&s.module)) {
            let Some(abs) = krate.absolute(s, &path) else {
                continue;
            };
            let Some(target) = abs.first() else { continue };
            if target == top {
                continue;
            }
            match layer_of(target) {
                Some(l) if l < own => {}
                Some(_) => wrong.push(format!(
                    "{}: {top} uses {} ({target} is not below {top})",
                    file.display(),
                    abs.join("::")
                )),
                // Not a module of ours (an item of the crate root, say): nothing to check.
                None => {}
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "upward or sideways uses:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_file_depends_on_itself() {
    let graph = Crate::load().graph();
    // Tarjan's strongly connected components: any with more than one file is a cycle.
    struct T<'a> {
        graph: &'a BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        index: BTreeMap<&'a PathBuf, usize>,
        low: BTreeMap<&'a PathBuf, usize>,
        stack: Vec<&'a PathBuf>,
        on: BTreeSet<&'a PathBuf>,
        next: usize,
        cycles: Vec<Vec<String>>,
    }
    impl<'a> T<'a> {
        fn visit(&mut self, v: &'a PathBuf) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                if !self.graph.contains_key(w) {
                    continue;
                }
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    component.push(w.display().to_string());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.cycles.push(component);
                }
            }
        }
    }
    let mut t = T {
        graph: &graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        cycles: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    let cycles: Vec<String> = t.cycles.iter().map(|c| c.join(" <-> ")).collect();
    assert!(
        cycles.is_empty(),
        "files that depend on each other:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_checker_sees_what_it_should() {
    let children: BTreeSet<String> = ["child".to_string()].into();
    let code = strip(
        "use crate::a::{b, c::{d, e as f}};\n// use crate::nope::x;\nlet s = \"crate::nope2\";\nchild::run(); super::x::Y; pub use crate::z::W;",
    );
    let found: Vec<(String, bool)> = paths(&code, &children)
        .into_iter()
        .map(|(p, pubuse)| (p.join("::"), pubuse))
        .collect();
    let names: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        names,
        [
            "crate::a::b",
            "crate::a::c::d",
            "crate::a::c::e",
            "child::run",
            "super::x::Y",
            "crate::z::W"
        ]
    );
    assert!(found.last().unwrap().1, "a pub use is seen as one");
    assert!(!found[0].1);
    let cut = without_test_modules(
        "fn a() {}\n#[cfg(test)]\nmod tests { use super::*; fn t() { {} } }\nfn b() {}",
    );
    assert!(!cut.contains("super") && cut.contains("fn b"), "{cut}");
    assert_eq!(
        strip("let c = '{'; let l: &'a str;"),
        "let c = ' '; let l: &'a str;"
    );
}
