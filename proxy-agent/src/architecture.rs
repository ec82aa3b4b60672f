//! The module map, checked: each module of the agent may use only the
//! modules listed for it here (docs/ARCHITECTURE.md has the same table).
//! Data flows sources → store → translate → engine → reconcile → datapath;
//! no stage knows a later one, so there is no arrow pointing back up:
//! reconcile and the datapath meet only in the contract (`programmed`).

use std::{collections::BTreeSet, fs, path::Path};

/// Module → the `crate::` modules its non-test code may use.
const ALLOWED: &[(&str, &[&str])] = &[
    // Shared vocabulary and pure helpers.
    ("maglev", &[]),
    ("model", &["maglev"]),
    ("node", &["model"]),
    ("netlink", &[]),
    ("ifaces", &["netlink"]),
    ("routes", &["netlink"]),
    ("host", &[]),
    ("sockdiag", &[]),
    ("kube_proxy", &[]),
    // The flow.
    ("store", &[]),
    ("kube_source", &["store"]),
    ("manifests", &["store"]),
    ("translate", &["store", "model", "maglev"]),
    ("engine", &["store", "translate", "model"]),
    ("programmed", &["model"]),
    ("reconcile", &["programmed", "model", "maglev"]),
    ("datapath", &["programmed", "model"]),
    // Around the flow.
    ("conntrack", &["datapath", "metrics"]),
    ("metrics", &["datapath", "model"]),
    ("health", &["metrics"]),
    ("healthcheck", &["model"]),
    ("inspect", &["datapath", "programmed", "model", "maglev"]),
    (
        "diagnose",
        &[
            "inspect",
            "model",
            "store",
            "translate",
            "reconcile",
            "kube_source",
        ],
    ),
    // The loop wires everything.
    (
        "agent",
        &[
            "conntrack",
            "datapath",
            "engine",
            "health",
            "healthcheck",
            "host",
            "ifaces",
            "kube_source",
            "manifests",
            "metrics",
            "model",
            "node",
            "programmed",
            "reconcile",
            "routes",
            "sockdiag",
            "store",
            "translate",
        ],
    ),
];

/// The modules named right after `crate::` in `code`, including each name
/// of a `crate::{a, b::c}` group.
fn crate_uses(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0usize;
            let mut item = String::new();
            let mut at_start = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => at_start = true,
                    c if at_start && (c.is_alphanumeric() || c == '_') => item.push(c),
                    _ if at_start && !item.is_empty() => {
                        out.insert(std::mem::take(&mut item));
                        at_start = false;
                    }
                    _ => {}
                }
            }
            if !item.is_empty() {
                out.insert(item);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    out
}

/// Non-test code of every file of module `name` (`name.rs` or `name/`).
fn module_code(src: &Path, name: &str) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let single = src.join(format!("{name}.rs"));
    if single.exists() {
        files.push(single);
    }
    if let Ok(dir) = fs::read_dir(src.join(name)) {
        files.extend(
            dir.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "rs"))
                .filter(|p| p.file_name().is_some_and(|f| f != "tests.rs")),
        );
    }
    files
        .into_iter()
        .map(|f| {
            let text = fs::read_to_string(&f).unwrap();
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
            (f.display().to_string(), code.to_owned())
        })
        .collect()
}

#[test]
fn modules_use_only_what_the_map_allows() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut problems = Vec::new();
    for (module, allowed) in ALLOWED {
        let files = module_code(&src, module);
        assert!(!files.is_empty(), "module {module} has no source");
        for (file, code) in files {
            for used in crate_uses(&code) {
                if used != *module && !allowed.contains(&used.as_str()) {
                    problems.push(format!("{file}: uses crate::{used}"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn every_module_is_in_the_map() {
    let lib = include_str!("lib.rs");
    for line in lib.lines() {
        if let Some(name) = line.strip_prefix("pub mod ") {
            let name = name.trim_end_matches(';');
            assert!(
                ALLOWED.iter().any(|(m, _)| *m == name),
                "{name} is missing from the module map"
            );
        }
    }
}

#[test]
fn the_scanner_reads_groups_and_paths() {
    let code = "use crate::{\n    model::{Cidr, Protocol},\n    store::Store, maglev,\n};\nlet x = crate::datapath::read();";
    let found: Vec<String> = crate_uses(code).into_iter().collect();
    assert_eq!(found, ["datapath", "maglev", "model", "store"]);
}
