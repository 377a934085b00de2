//! The shape of `src/`, checked from its imports (issue 12's "done means"):
//! no role module imports another role (only `dev` composes them), and no
//! two files of `src/` import each other, directly or through others.
//!
//! The graph is drawn from `crate::`, `super::` and `self::` paths in each
//! file, test modules and comments left out. A parent `mod.rs` declaring its
//! children, and children using their parent's items, are how Rust modules
//! are built, not loops, so edges between a `mod.rs` and its own submodules
//! are left out too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Stages of the pipeline (and the ops tools, which read the stores, never a
/// role's internals).
const ROLES: &[&str] = &["serve", "relay", "worker", "project", "ops"];
/// Where roles may be composed.
const COMPOSERS: &[&str] = &["dev", "main", "cli"];

#[test]
fn no_role_module_imports_another_role() {
    let graph = Graph::of_src();
    let mut offences = Vec::new();
    for (from, targets) in &graph.edges {
        let Some(from_role) = role_of(from) else {
            continue;
        };
        for to in targets {
            if let Some(to_role) = role_of(to) {
                if to_role != from_role {
                    offences.push(format!("{from} -> {to}"));
                }
            }
        }
    }
    assert!(offences.is_empty(), "role imports another role: {offences:#?}");
    // The check must see the composer's imports, or it proves nothing.
    let dev = graph.edges.get("dev").expect("dev module is in the graph");
    assert!(dev.iter().any(|m| role_of(m) == Some("serve")), "dev imports: {dev:?}");
}

#[test]
fn no_import_loop_between_files_of_src() {
    let graph = Graph::of_src();
    assert!(graph.edges.len() > 50, "too few files seen: {}", graph.edges.len());
    let cycles = graph.cycles();
    assert!(cycles.is_empty(), "import loops: {cycles:#?}");
}

#[test]
fn the_loop_finder_finds_a_planted_loop() {
    let mut graph = Graph::default();
    graph.add_file("a", "use crate::b::Thing;\n");
    graph.add_file("b", "fn f() { crate::c::g() }\n");
    graph.add_file("c", "pub(crate) use crate::{a::{X, Y as Z}, d};\n");
    graph.add_file("d", "use super::c;\n");
    graph.add_file("e::f", "use super::g::H;\n");
    graph.add_file("e::g", "fn k() -> crate::e::f::T { todo!() }\n");
    // A parent and its own child: not a loop.
    graph.add_file("h", "pub use self::i::J;\n");
    graph.add_file("h::i", "use super::K;\n");
    // Comments, strings that say "use", and test modules draw no edge.
    graph.add_file("x", "use crate::y;\n");
    graph.add_file(
        "y",
        "// crate::x::A\nconst M: &str = \"in use by x;\";\n#[cfg(test)]\nmod tests { use crate::x::Z; }\n",
    );
    graph.resolve();
    let cycles = graph.cycles();
    assert_eq!(cycles, vec![vec!["a", "b", "c", "d"], vec!["e::f", "e::g"]]);
}

fn role_of(module: &str) -> Option<&'static str> {
    let top = module.split("::").next()?;
    if COMPOSERS.contains(&top) {
        return None;
    }
    ROLES.iter().copied().find(|role| *role == top)
}

/// Files as module paths (`log::writer`, `db` for `db/mod.rs`, `` for lib.rs).
#[derive(Default)]
struct Graph {
    /// Module path -> the raw paths it names, before resolution.
    paths: BTreeMap<String, Vec<Vec<String>>>,
    /// Module path -> modules (files) it imports.
    edges: BTreeMap<String, BTreeSet<String>>,
}

impl Graph {
    fn of_src() -> Graph {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut graph = Graph::default();
        for file in rust_files(&root) {
            let module = module_of(&root, &file);
            if module.is_empty() || module == "main" {
                continue; // lib.rs and main.rs declare, they are not part of any loop
            }
            let text = std::fs::read_to_string(&file).unwrap();
            graph.add_file(&module, &text);
        }
        graph.resolve();
        graph
    }

    fn add_file(&mut self, module: &str, text: &str) {
        let code = strip_comments(without_tests(text));
        let paths = named_paths(&code)
            .into_iter()
            .filter_map(|path| absolute(module, &path))
            .collect();
        self.paths.insert(module.to_string(), paths);
    }

    /// Each named path becomes the longest module prefix that is a file.
    fn resolve(&mut self) {
        let modules: BTreeSet<String> = self.paths.keys().cloned().collect();
        for (module, paths) in &self.paths {
            let mut targets = BTreeSet::new();
            for path in paths {
                let target = (1..=path.len())
                    .rev()
                    .map(|n| path[..n].join("::"))
                    .find(|prefix| modules.contains(prefix));
                if let Some(target) = target {
                    if target != *module && !parent_and_child(module, &target) {
                        targets.insert(target);
                    }
                }
            }
            self.edges.insert(module.clone(), targets);
        }
    }

    /// Strongly connected components of more than one file, each sorted.
    fn cycles(&self) -> Vec<Vec<String>> {
        let mut found = Vec::new();
        let mut seen = BTreeSet::new();
        for start in self.edges.keys() {
            if seen.contains(start) {
                continue;
            }
            let component: Vec<String> = self
                .reachable(start)
                .into_iter()
                .filter(|m| self.reachable(m).contains(start))
                .collect();
            seen.extend(component.iter().cloned());
            if component.len() > 1 {
                found.push(component);
            }
        }
        found
    }

    fn reachable(&self, start: &str) -> BTreeSet<String> {
        let mut reached = BTreeSet::from([start.to_string()]);
        let mut stack = vec![start.to_string()];
        while let Some(module) = stack.pop() {
            for next in self.edges.get(&module).into_iter().flatten() {
                if reached.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        reached
    }
}

/// `a` is `b`'s parent module (a `mod.rs` and one of its own files), or the
/// other way round.
fn parent_and_child(a: &str, b: &str) -> bool {
    let is_parent = |parent: &str, child: &str| {
        child.rsplit_once("::").map(|(p, _)| p) == Some(parent)
    };
    is_parent(a, b) || is_parent(b, a)
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

fn module_of(root: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(root).unwrap().with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts.join("::")
}

/// The file up to its `#[cfg(test)]` module: tests sit at the end of each file
/// and their `super::` means the file itself.
fn without_tests(text: &str) -> &str {
    match text.find("#[cfg(test)]") {
        Some(at) => &text[..at],
        None => text,
    }
}

fn strip_comments(code: &str) -> String {
    code.lines()
        .map(|line| match line.find("//") {
            // `//` inside a string ("http://...") is not a comment, but such
            // strings never contain `crate::` either, so cutting is harmless.
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::`/`super::`/`self::` path, with `use` trees expanded.
fn named_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = &rest[..at];
        paths.extend(inline_paths(before));
        let statement_end = rest[at..].find(';').map_or(rest.len(), |end| at + end);
        let tree = &rest[at + 4..statement_end];
        let is_word_start = at == 0 || {
            let c = rest.as_bytes()[at - 1];
            !(c.is_ascii_alphanumeric() || c == b'_')
        };
        if is_word_start && looks_like_use_tree(tree) {
            paths.extend(expand_use_tree(tree));
        } else {
            paths.extend(inline_paths(tree));
        }
        rest = &rest[statement_end.min(rest.len())..];
        rest = rest.strip_prefix(';').unwrap_or(rest);
    }
    paths.extend(inline_paths(rest));
    paths
}

/// Paths written in expressions and types: `crate::log::Segment::new(..)`.
fn inline_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    for anchor in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(found) = code[from..].find(anchor) {
            let start = from + found;
            let preceded_by_ident = start > 0 && {
                let c = code.as_bytes()[start - 1];
                c.is_ascii_alphanumeric() || c == b'_' || c == b':'
            };
            let path: String = code[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            if !preceded_by_ident {
                paths.push(split_path(&path));
            }
            from = start + path.len().max(1);
        }
    }
    paths
}

/// `use crate::a::{b, c}` rather than "in use by a class;" in a string.
fn looks_like_use_tree(tree: &str) -> bool {
    let tree = tree.trim_start();
    let head: String = tree
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let after = &tree[head.len()..];
    (tree.starts_with('{') || (!head.is_empty() && after.starts_with("::")))
        && tree
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_:{},* \n\t\r".contains(c))
}

fn expand_use_tree(tree: &str) -> Vec<Vec<String>> {
    // `x as y` renames nothing we care about: drop `as y`, then the spaces.
    let mut words = Vec::new();
    let mut iter = tree.split_whitespace();
    while let Some(word) = iter.next() {
        if word == "as" {
            let renamed = iter.next().unwrap_or("");
            words.push(renamed.trim_start_matches(|c: char| c.is_alphanumeric() || c == '_'));
        } else {
            words.push(word);
        }
    }
    let tree = words.concat();
    let mut out = Vec::new();
    expand(&tree, &mut Vec::new(), &mut out);
    out
}

fn expand(tree: &str, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    for item in split_top_level(tree) {
        match item.find('{') {
            Some(open) => {
                let head = split_path(item[..open].trim_end_matches("::"));
                let inner = &item[open + 1..item.rfind('}').unwrap_or(item.len())];
                let depth = prefix.len();
                prefix.extend(head);
                expand(inner, prefix, out);
                prefix.truncate(depth);
            }
            None if !item.is_empty() => {
                let mut path = prefix.clone();
                path.extend(split_path(item));
                out.push(path);
            }
            None => {}
        }
    }
}

fn split_top_level(tree: &str) -> Vec<&str> {
    let (mut depth, mut start, mut items) = (0, 0, Vec::new());
    for (i, c) in tree.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&tree[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&tree[start..]);
    items
}

fn split_path(path: &str) -> Vec<String> {
    path.split("::")
        .filter(|s| !s.is_empty() && *s != "*")
        .map(str::to_string)
        .collect()
}

/// A path relative to `module` made absolute from the crate root; `None` for
/// paths into other crates.
fn absolute(module: &str, path: &[String]) -> Option<Vec<String>> {
    let mut here: Vec<String> = split_path(module);
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            here.clear();
            rest = &rest[1..];
        }
        Some("super" | "self") => {
            while let Some(step) = rest.first().map(String::as_str) {
                match step {
                    "super" => {
                        here.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                rest = &rest[1..];
            }
        }
        _ => return None,
    }
    here.extend(rest.iter().cloned());
    Some(here)
}

/// Every metric the source records is in `telemetry::METRICS` (so it has a `# HELP` line),
/// and every entry there is still recorded somewhere.
#[test]
fn every_recorded_metric_is_described() {
    let mut recorded = std::collections::BTreeSet::new();
    let names = recorded_names();
    for file in rust_files(Path::new("src")) {
        let text = std::fs::read_to_string(&file).unwrap();
        for name in names(&text) {
            recorded.insert(name);
        }
    }
    let described: std::collections::BTreeSet<String> =
        spiced::telemetry::METRICS.iter().map(|(name, _)| name.to_string()).collect();
    assert!(recorded.len() > 30, "the scan found the metrics: {recorded:?}");
    let undescribed: Vec<_> = recorded.difference(&described).collect();
    let stale: Vec<_> = described.difference(&recorded).collect();
    assert!(undescribed.is_empty(), "recorded without a description in telemetry::METRICS: {undescribed:?}");
    assert!(stale.is_empty(), "described but never recorded: {stale:?}");
}

/// The names in `metrics::counter!("…"`, `gauge!` and `histogram!` calls of a source text.
fn recorded_names() -> impl Fn(&str) -> Vec<String> {
    |text| {
        let mut names = Vec::new();
        for macro_name in ["metrics::counter!(", "metrics::gauge!(", "metrics::histogram!("] {
            for (at, _) in text.match_indices(macro_name) {
                let rest = text[at + macro_name.len()..].trim_start();
                if let Some(quoted) = rest.strip_prefix('"') {
                    names.push(quoted[..quoted.find('"').unwrap()].to_string());
                }
            }
        }
        names
    }
}
