//! Crash-safe state on disk: append-only JSON-lines files, each line written in one `write`
//! and fsynced before the operation returns. Loading is strict: a truncated or corrupt line
//! is an error naming the file and line, never a silent reset.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Serialize, de::DeserializeOwned};

use crate::error::CaError;

/// One append-only JSON-lines file.
#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Opens (creating if absent) for appending.
    pub(crate) fn open(path: &Path) -> Result<Self, CaError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| CaError::io(path, e))?;
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    /// Appends already-encoded lines as one write, then fsyncs.
    pub(crate) fn write_raw(&mut self, buf: &[u8]) -> Result<(), CaError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(buf)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| CaError::io(&self.path, e))
    }

    /// Appends several records as one write, then fsyncs.
    pub(crate) fn append<T: Serialize>(&mut self, records: &[T]) -> Result<(), CaError> {
        let mut buf = Vec::with_capacity(256 * records.len());
        for r in records {
            serde_json::to_writer(&mut buf, r).map_err(|e| CaError::Internal(e.to_string()))?;
            buf.push(b'\n');
        }
        self.file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| CaError::io(&self.path, e))
    }
}

/// Reads every record of a JSON-lines file; a missing file is empty.
pub(crate) fn read_all<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, CaError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CaError::io(path, e)),
    };
    let mut out = Vec::new();
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    let mut n = 0usize;
    loop {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .map_err(|e| CaError::corrupt(path, format!("line {}: unreadable: {e}", n + 1)))?;
        if read == 0 {
            break;
        }
        n += 1;
        if !line.ends_with('\n') {
            return Err(CaError::corrupt(
                path,
                format!("line {n} is truncated (no newline): the file was cut mid-write"),
            ));
        }
        let rec = serde_json::from_str(line.trim_end())
            .map_err(|e| CaError::corrupt(path, format!("line {n}: {e}")))?;
        out.push(rec);
    }
    Ok(out)
}

/// Writes a whole file atomically (temp file, fsync, rename, fsync dir).
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| CaError::io(&tmp, e))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(|e| CaError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| CaError::io(path, e))?;
    sync_dir(path);
    Ok(())
}

/// Creates a new file that must not exist yet (refuse to overwrite), fsynced.
pub(crate) fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CaError::AlreadyExists(path.to_owned())
            } else {
                CaError::io(path, e)
            }
        })?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(|e| CaError::io(path, e))?;
    sync_dir(path);
    Ok(())
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(dir)
    {
        // Best effort: durability of the rename itself; the data is already synced.
        let _ = d.sync_all();
    }
}

/// Reads a whole text file, naming it in any error.
pub(crate) fn read_text(path: &Path) -> Result<String, CaError> {
    let bytes = std::fs::read(path).map_err(|e| CaError::io(path, e))?;
    String::from_utf8(bytes).map_err(|_| CaError::corrupt(path, "not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("index.jsonl");
        let mut j = Journal::open(&p).unwrap();
        j.append(&[serde_json::json!({"a": 1})]).unwrap();
        assert_eq!(read_all::<serde_json::Value>(&p).unwrap().len(), 1);
        std::fs::write(&p, b"{\"a\": 1}\n{\"a\"").unwrap();
        let err = read_all::<serde_json::Value>(&p).unwrap_err().to_string();
        assert!(
            err.contains("index.jsonl") && err.contains("line 2"),
            "{err}"
        );
    }
}
