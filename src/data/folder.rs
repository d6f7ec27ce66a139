//! An image-folder data set: every file under a root, at any depth (ImageNet's
//! `train/<class>/<file>` layout or any other), in a fixed order. Labels are not needed for
//! pretraining, so the folder names carry no meaning. Names starting with a dot (hidden
//! files and folders such as `.DS_Store`) are not part of the data set; every other file
//! is, and one that turns out not to be a readable JPEG or PNG is skipped with a warning
//! when the loader meets it.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The files of a folder tree, sorted by relative path so every machine sees the same
/// order.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    root: PathBuf,
    /// Relative to `root`.
    files: Vec<Box<Path>>,
}

impl ImageFolder {
    /// Lists every file under `root` (following symbolic links, each folder once).
    pub fn scan(root: &Path) -> Result<ImageFolder> {
        let meta = fs::metadata(root)
            .with_context(|| format!("--data {}: cannot open", root.display()))?;
        if !meta.is_dir() {
            bail!(
                "--data {}: not a folder (give the folder that holds the images, e.g. imagenet/train)",
                root.display()
            );
        }
        let mut files = Vec::new();
        let mut seen = HashSet::new();
        walk(root, Path::new(""), &mut files, &mut seen)?;
        if files.is_empty() {
            bail!(
                "--data {}: no files in this folder tree (expected JPEG or PNG images, at any depth)",
                root.display()
            );
        }
        files.sort_unstable();
        Ok(ImageFolder {
            root: root.to_path_buf(),
            files,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// File `i`'s path relative to the root.
    pub fn relative(&self, i: usize) -> &Path {
        &self.files[i]
    }

    /// The index of the file at `relative`, if the folder has it.
    pub fn index_of(&self, relative: &Path) -> Option<usize> {
        self.files
            .binary_search_by(|f| f.as_ref().cmp(relative))
            .ok()
    }

    /// File `i`'s full path.
    pub fn path(&self, i: usize) -> PathBuf {
        self.root.join(&self.files[i])
    }
}

fn walk(
    dir: &Path,
    relative: &Path,
    files: &mut Vec<Box<Path>>,
    seen: &mut HashSet<PathBuf>,
) -> Result<()> {
    // A symbolic link back up the tree would otherwise loop forever.
    let canonical =
        fs::canonicalize(dir).with_context(|| format!("cannot open folder {}", dir.display()))?;
    if !seen.insert(canonical) {
        return Ok(());
    }
    let entries =
        fs::read_dir(dir).with_context(|| format!("cannot list folder {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list folder {}", dir.display()))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let rel = relative.join(&name);
        // `metadata` follows links; a dangling link is kept as a file, to be reported.
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => walk(&path, &rel, files, seen)?,
            _ => files.push(rel.into_boxed_path()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_files_at_any_depth_sorted_without_hidden_ones() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for f in [
            "b/2.jpg",
            "a/x/1.png",
            "a/0.jpg",
            "top.png",
            ".hidden/z.jpg",
            "a/.DS_Store",
        ] {
            let p = root.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"x").unwrap();
        }
        fs::create_dir_all(root.join("empty")).unwrap();
        let folder = ImageFolder::scan(root).unwrap();
        let names: Vec<_> = (0..folder.len())
            .map(|i| folder.relative(i).to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a/0.jpg", "a/x/1.png", "b/2.jpg", "top.png"]);
        assert_eq!(folder.path(2), root.join("b/2.jpg"));
    }

    #[test]
    fn a_missing_empty_or_non_folder_root_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = ImageFolder::scan(&dir.path().join("nope")).unwrap_err();
        assert!(format!("{err:#}").contains("cannot open"), "{err:#}");
        fs::create_dir_all(dir.path().join("sub/.git")).unwrap();
        let err = ImageFolder::scan(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no files in this folder tree"), "{err}");
        let file = dir.path().join("f.jpg");
        fs::write(&file, b"x").unwrap();
        let err = ImageFolder::scan(&file).unwrap_err().to_string();
        assert!(err.contains("not a folder"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_link_cycle_is_listed_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a")).unwrap();
        fs::write(root.join("a/1.png"), b"x").unwrap();
        std::os::unix::fs::symlink(root, root.join("a/loop")).unwrap();
        let folder = ImageFolder::scan(root).unwrap();
        assert_eq!(folder.len(), 1);
    }
}
