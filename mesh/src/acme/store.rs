//! Where certificates, keys and account records live between restarts.
//!
//! A [`CertStore`] is a small key-value store of files. The directory store writes each file
//! atomically (temporary file, fsync, rename, fsync of the directory), so a crash leaves the
//! old file or the new one, never half of either; private keys are `0600`.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A key that would escape the store.
    #[error("invalid store key {0:?}")]
    Key(String),
}

/// Persistent storage for certificates, keys and ACME account records.
pub trait CertStore: Send + Sync + std::fmt::Debug {
    /// The bytes under `key`, or `None` when absent.
    fn read(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Replace `key` atomically; `secret` keeps it readable by the owner only.
    fn write(&self, key: &str, bytes: &[u8], secret: bool) -> Result<(), StoreError>;
    /// Move `key` aside as `<key>.<why>` (kept for inspection, never read again).
    fn set_aside(&self, key: &str, why: &str) -> Result<(), StoreError>;
    /// Move an unreadable `key` aside (`<key>.corrupt`).
    fn quarantine(&self, key: &str) -> Result<(), StoreError> {
        self.set_aside(key, "corrupt")
    }
    /// Where the store lives, for messages.
    fn location(&self) -> String;
}

/// The store key of a domain's file: `*.example.com` becomes `_wildcard.example.com`.
pub fn domain_key(domain: &str, file: &str) -> String {
    let dir = match domain.strip_prefix("*.") {
        Some(base) => format!("_wildcard.{base}"),
        None => domain.to_owned(),
    };
    format!("certs/{dir}/{file}")
}

/// Files in a directory.
#[derive(Debug)]
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// A store rooted at `root` (created with mode `0700` on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        let valid = !key.is_empty()
            && key.split('/').all(|part| {
                !part.is_empty()
                    && part != "."
                    && part != ".."
                    && !part.starts_with('.')
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            });
        match valid {
            true => Ok(self.root.join(key)),
            false => Err(StoreError::Key(key.to_owned())),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn create_dirs(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

impl CertStore for DirStore {
    fn read(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path(key)?;
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn write(&self, key: &str, bytes: &[u8], secret: bool) -> Result<(), StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path(key)?;
        let dir = path.parent().unwrap_or(&self.root).to_owned();
        create_dirs(&dir).map_err(io_err(&dir))?;
        let name = path
            .file_name()
            .map_or_else(Default::default, |n| n.to_string_lossy().into_owned());
        // Unique per write: two tasks may write one file at once (an order and a watch).
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.tmp.{}.{n}", std::process::id()));
        let result = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(if secret { 0o600 } else { 0o644 })
                .open(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            drop(file);
            fs::rename(&tmp, &path)?;
            // The rename itself must survive a crash.
            fs::File::open(&dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(io_err(&path))
    }

    fn set_aside(&self, key: &str, why: &str) -> Result<(), StoreError> {
        if why.is_empty() || why.contains(['/', '\\']) || why.starts_with('.') {
            return Err(StoreError::Key(format!("{key}.{why}")));
        }
        let path = self.path(key)?;
        let mut aside = path.clone().into_os_string();
        aside.push(format!(".{why}"));
        match fs::rename(&path, &aside) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn concurrent_writes_of_one_file_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(DirStore::new(dir.path().join("store")));
        let writers: Vec<_> = (0..4u8)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        store.write("certs/a.example/key.pem", &[i; 64], true)?;
                    }
                    Ok::<_, StoreError>(())
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap().unwrap();
        }
        let bytes = store.read("certs/a.example/key.pem").unwrap().unwrap();
        assert!(bytes.len() == 64 && bytes.iter().all(|b| *b == bytes[0]));
    }

    #[test]
    fn atomic_files_with_modes() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::new(dir.path().join("store"));
        assert_eq!(store.read("certs/a.example/cert.pem").unwrap(), None);
        store
            .write("certs/a.example/key.pem", b"secret", true)
            .unwrap();
        store
            .write("certs/a.example/cert.pem", b"one", false)
            .unwrap();
        store
            .write("certs/a.example/cert.pem", b"two", false)
            .unwrap();
        assert_eq!(
            store.read("certs/a.example/cert.pem").unwrap().unwrap(),
            b"two"
        );
        let mode = |p: &str| {
            fs::metadata(dir.path().join("store").join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("certs/a.example/key.pem"), 0o600);
        assert_eq!(mode("certs/a.example/cert.pem"), 0o644);
        assert_eq!(mode("certs"), 0o700);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path().join("store/certs/a.example"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        store.quarantine("certs/a.example/cert.pem").unwrap();
        assert_eq!(store.read("certs/a.example/cert.pem").unwrap(), None);
    }

    #[test]
    fn keys_cannot_escape() {
        let store = DirStore::new("/nonexistent");
        for key in [
            "../x",
            "certs/../../etc/passwd",
            "/abs",
            "",
            "a//b",
            "certs/.hidden",
            "a b",
        ] {
            assert!(matches!(store.read(key), Err(StoreError::Key(_))), "{key}");
        }
        assert_eq!(
            domain_key("*.example.com", "cert.pem"),
            "certs/_wildcard.example.com/cert.pem"
        );
    }
}
