//! The README's Layout table matches the tree: every path it names exists, and every file of
//! the source folders is named, by itself or by a folder below the top-level one.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

/// The folders whose every file the table must account for, and the single files.
const ROOTS: [&str; 9] = [
    "src", "kernels", "tests", "benches", "examples", "bench", "scripts", "docs", ".ci",
];
const SINGLE_FILES: [&str; 1] = ["build.rs"];

/// The backticked paths in the first column of the README's `## Layout` table.
fn listed_paths(readme: &str) -> BTreeSet<String> {
    let section = readme
        .split("\n## Layout\n")
        .nth(1)
        .expect("the README has a `## Layout` section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut paths = BTreeSet::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let first_cell = row.split('|').nth(1).unwrap_or("");
        for piece in first_cell.split('`').skip(1).step_by(2) {
            paths.insert(piece.to_string());
        }
    }
    paths
}

fn files_under(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name == "__pycache__" {
            continue;
        }
        if path.is_dir() {
            files_under(root, &path, out);
        } else {
            let rel = path.strip_prefix(root).unwrap();
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

#[test]
fn the_layout_table_names_every_file_and_only_existing_ones() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    let listed = listed_paths(&readme);
    assert!(listed.len() > 10, "the Layout table lists {listed:?}");
    for path in &listed {
        assert!(
            root.join(path.trim_end_matches('/')).exists(),
            "the README's Layout table names {path}, which does not exist"
        );
        assert_ne!(
            path, "src/",
            "the Layout table must name src/'s modules, not src/"
        );
    }
    let mut files: Vec<String> = SINGLE_FILES.iter().map(|f| f.to_string()).collect();
    for r in ROOTS {
        files_under(root, &root.join(r), &mut files);
    }
    let unlisted: Vec<&String> = files
        .iter()
        .filter(|f| {
            !listed.iter().any(|p| {
                if p.ends_with('/') {
                    f.starts_with(p.as_str())
                } else {
                    *f == p
                }
            })
        })
        .collect();
    assert!(
        unlisted.is_empty(),
        "files the README's Layout table does not name: {unlisted:?}"
    );
}
