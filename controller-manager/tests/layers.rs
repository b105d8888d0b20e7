//! The module layers of the controller-manager, checked on its sources: each module imports
//! only the layers below it (`app` → `options`, `serve`, `leader`, `controllers` → `cloud` →
//! `k8s`, `health`, `flags`, `metrics`), so there is no import cycle and nothing but the wiring
//! reaches into the controllers, the flags or the secure port; and no controller imports
//! another.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What each top-level module may import (besides itself).
const ALLOWED: &[(&str, &[&str])] = &[
    ("k8s", &[]),
    ("health", &[]),
    ("flags", &[]),
    ("metrics", &[]),
    ("cluster_cidrs", &[]),
    ("cloud", &["k8s", "health"]),
    ("serve", &["health"]),
    ("leader", &["cloud"]),
    ("options", &["cloud", "flags", "cluster_cidrs"]),
    (
        "controllers",
        &["cloud", "k8s", "health", "flags", "cluster_cidrs"],
    ),
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a source file names as `crate::<module>`.
fn crate_imports(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let rest = &text[at + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    // `use crate::{a, b}` groups.
    for (at, _) in text.match_indices("crate::{") {
        let rest = &text[at + "crate::{".len()..];
        let group = &rest[..rest.find('}').unwrap_or(rest.len())];
        for item in group.split(',') {
            let name: String = item
                .trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

#[test]
fn modules_import_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut violations = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let Some((_, allowed)) = ALLOWED.iter().find(|(module, _)| *module == top) else {
            // app, lib and main wire everything together.
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for import in crate_imports(&text) {
            if import != top && !allowed.contains(&import.as_str()) {
                violations.push(format!("{} imports crate::{import}", relative.display()));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports against the layering:\n{}",
        violations.join("\n")
    );
}

#[test]
fn no_controller_imports_another() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/controllers");
    let controllers: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            path.is_dir()
                .then(|| path.file_name().unwrap().to_string_lossy().to_string())
        })
        .collect();
    assert!(
        controllers.len() >= 2,
        "controller directories: {controllers:?}"
    );
    let mut violations = Vec::new();
    for controller in &controllers {
        let mut files = Vec::new();
        sources(&dir.join(controller), &mut files);
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for other in controllers.iter().filter(|c| *c != controller) {
                for pattern in [format!("super::{other}"), format!("controllers::{other}")] {
                    if text.contains(&pattern) {
                        violations.push(format!("{} names {pattern}", file.display()));
                    }
                }
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_checker_sees_imports() {
    let found = crate_imports(
        "use crate::cloud::Cloud;\nuse crate::{k8s, health::Scope};\n$crate::flags::X",
    );
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        ["cloud", "health", "k8s"]
    );
}
