//! Replay of the committed fuzz corpora (`fuzz/corpus/<target>/`) on stable `cargo test`, through
//! the same library entry points the `cargo fuzz` targets call.

use std::path::PathBuf;

/// The corpus directory of one fuzz target.
pub fn dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Feeds every file of `target`'s corpus to `run`; a panic names the file. Returns how many files
/// ran, and fails when the corpus is missing or empty (a renamed target must not pass silently).
pub fn replay(target: &str, run: impl Fn(&[u8])) -> usize {
    let dir = dir(target);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) => panic!("corpus {} unreadable: {e}", dir.display()),
    };
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let name = f.display().to_string();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&data)));
        if let Err(p) = r {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!("corpus input {name} failed: {msg}");
        }
    }
    files.len()
}
