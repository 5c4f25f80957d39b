//! The crate's module layers, as the crate doc lists them (src/lib.rs, "Layout"), held against
//! every `crate::` path in the source: a module imports only from its own layer and below, the
//! top-level modules import each other in no circle, and the roles never import each other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROLES: &str = "Roles";

/// The layers of the crate doc: `N. **Name**: [`a`], [`b`]` lines (the list may go on over
/// the next lines), in order.
fn documented_layers(lib: &str) -> Vec<(String, Vec<String>)> {
    let links = |text: &str| -> Vec<String> {
        text.split(',')
            .filter_map(|m| m.trim().strip_prefix("[`")?.strip_suffix("`]"))
            .map(str::to_owned)
            .collect()
    };
    let mut layers: Vec<(String, Vec<String>)> = Vec::new();
    let mut open = false;
    for line in lib.lines() {
        let Some(rest) = line.strip_prefix("//! ") else {
            open = false;
            continue;
        };
        if let Some((number, heading)) = rest.split_once(". **")
            && number.parse::<u32>().is_ok()
            && let Some((name, modules)) = heading.split_once("**:")
        {
            layers.push((name.to_owned(), links(modules)));
            open = true;
        } else if open && rest.trim_start().starts_with("[`") {
            if let Some((_, modules)) = layers.last_mut() {
                modules.extend(links(rest));
            }
        } else {
            open = false;
        }
    }
    layers
}

/// The code of a file without comments and without its `#[cfg(test)] mod tests` (tests may
/// reach up: they build whole meshes).
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a piece of code names through `crate::`, including in grouped
/// imports (`use crate::{a, b::c}`).
fn imported(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let mut depth = 0;
            let mut start = 0;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.insert(ident(group[start..j].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(group[start..j].trim()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(after));
        }
        rest = after;
    }
    found.remove("");
    found
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

/// Per top-level module (`src/<m>.rs` and `src/<m>/**`), the top-level modules it imports.
fn import_graph(src: &Path, modules: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = first.to_str().unwrap().trim_end_matches(".rs").to_owned();
        if !modules.contains(&module) {
            continue; // lib.rs, main.rs
        }
        let code = code_of(&std::fs::read_to_string(&file).unwrap());
        let edges = graph.entry(module.clone()).or_default();
        for target in imported(&code) {
            if target != module && modules.contains(&target) {
                edges.insert(target);
            }
        }
    }
    graph
}

/// A circle of the graph, if it has one (depth-first search).
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut found = path[i..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_crate_docs_layers_hold_for_every_import() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let layers = documented_layers(&lib);
    assert!(
        layers.len() >= 5,
        "the crate doc lists its layers: {layers:?}"
    );

    // Every module is in exactly one layer, and every layer's module exists.
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';'))
        .map(str::to_owned)
        .collect();
    let mut layer_of = BTreeMap::new();
    for (i, (name, modules)) in layers.iter().enumerate() {
        for m in modules {
            assert!(
                declared.contains(m),
                "layer {name} lists `{m}`, not a module"
            );
            assert!(
                layer_of.insert(m.clone(), (i, name.clone())).is_none(),
                "`{m}` is in two layers"
            );
        }
    }
    for m in &declared {
        assert!(
            layer_of.contains_key(m),
            "`{m}` is in no layer of the crate doc"
        );
    }

    let graph = import_graph(&root.join("src"), &declared);
    let mut wrong = Vec::new();
    for (from, targets) in &graph {
        let (from_layer, from_name) = &layer_of[from];
        for to in targets {
            let (to_layer, _) = &layer_of[to];
            if to_layer > from_layer {
                wrong.push(format!("{from} ({from_name}) imports {to}, a higher layer"));
            } else if to_layer == from_layer && from_name == ROLES {
                wrong.push(format!("role {from} imports role {to}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(circle(&graph), None, "a circle of imports");
}

#[test]
fn the_import_scan_sees_grouped_nested_and_plain_paths() {
    let code = code_of(
        "use crate::{a, b::{c, d}, e::f};\nfn x() { crate::g::h(); }\n// crate::i\n\
         #[cfg(test)]\nmod tests { use crate::j; }\n",
    );
    let found: Vec<_> = imported(&code).into_iter().collect();
    assert_eq!(found, ["a", "b", "e", "g"]);
    let mut graph = BTreeMap::new();
    graph.insert("x".to_owned(), BTreeSet::from(["y".to_owned()]));
    graph.insert("y".to_owned(), BTreeSet::from(["x".to_owned()]));
    assert!(circle(&graph).is_some());
    graph.get_mut("y").unwrap().clear();
    assert_eq!(circle(&graph), None);
}
