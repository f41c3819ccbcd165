//! The state dir: keys, the encrypted store, revocations and the audit log.
//!
//! Everything sidekey must not lose lives here and is written atomically
//! (write a temporary file, fsync, rename, fsync the directory), so a crash
//! leaves the old or the new version, never a torn one (SPEC invariant 4).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;

/// Paths inside one state dir.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn signing_key(&self) -> PathBuf {
        self.root.join("token-signing.key")
    }
    pub fn master_key(&self) -> PathBuf {
        self.root.join("master.key")
    }
    pub fn store(&self) -> PathBuf {
        self.root.join("secrets.enc")
    }
    pub fn revocations(&self) -> PathBuf {
        self.root.join("revocations.json")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    /// The CA that signs agents' client certificates (`sidekey cert issue`).
    pub fn agent_ca_cert(&self) -> PathBuf {
        self.root.join("agent-ca.crt")
    }
    pub fn agent_ca_key(&self) -> PathBuf {
        self.root.join("agent-ca.key")
    }
    pub fn admin_socket(&self) -> PathBuf {
        self.root.join("admin.sock")
    }
    /// Serialises writers of the store and the revocation list across processes.
    pub fn lock_file(&self) -> PathBuf {
        self.root.join(".lock")
    }

    /// Creates the directory with mode 0700 if it does not exist. An empty
    /// one made beforehand (`mkdir -p`, a fresh volume) is made 0700 too:
    /// keys are about to go in. One that holds files is kept as it is.
    pub fn create(&self) -> io::Result<()> {
        match fs::metadata(&self.root) {
            Ok(meta) if meta.is_dir() => {
                let empty = fs::read_dir(&self.root)?.next().is_none();
                if empty
                    && meta.uid() == rustix::process::geteuid().as_raw()
                    && meta.mode() & 0o077 != 0
                {
                    fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))?;
                }
                Ok(())
            }
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a directory", self.root.display()),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&self.root)?;
                fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))?;
                // Its name must survive a crash as the keys in it do.
                sync_parent(&self.root);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The state dir and the keys in it that others may enter or read, each
    /// with its mode. sidekey makes them private, but a copy, a restore or
    /// a hand-made dir may not have kept that.
    pub fn open_to_others(&self) -> Vec<(PathBuf, u32)> {
        let private = [
            self.root.clone(),
            self.signing_key(),
            self.master_key(),
            self.store(),
            self.ca_key(),
            self.agent_ca_key(),
        ];
        private
            .into_iter()
            .filter_map(|path| {
                let mode = fs::metadata(&path).ok()?.permissions().mode() & 0o777;
                (mode & 0o077 != 0).then_some((path, mode))
            })
            .collect()
    }

    /// Takes the cross-process writer lock; released when the file is dropped.
    pub fn lock(&self) -> io::Result<File> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.lock_file())?;
        file.lock()?;
        Ok(file)
    }
}

/// The directory `path` is in; `.` for a bare file name.
fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Syncs the directory `path` is in, so a name just made there survives a
/// crash. Best effort: a directory sidekey may write in but not list
/// cannot be opened to sync, and that alone must not stop the caller.
pub fn sync_parent(path: &Path) {
    let _ = File::open(parent_of(path)).and_then(|dir| dir.sync_all());
}

/// Whether two files' metadata are of one file (the same device and inode).
pub fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// The most [`read_limited`] reads of a config, a `file:` secret or a key
/// set: far more than any of them holds.
pub const MAX_OPERATOR_FILE: u64 = 1 << 20;

/// Reads a file an operator names (a config, a `file:` secret, a key set)
/// whole, refusing what is not a regular file or is larger than `limit`:
/// `/dev/zero` would fill memory and a FIFO nobody writes would hang the
/// read (it is opened without blocking, so the check comes first). Sized
/// from the file once, so a secret's bytes are not left behind in a buffer
/// outgrown while reading.
pub fn read_limited(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > limit {
        return Err(too_large(limit));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize + 1);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(limit));
    }
    Ok(bytes)
}

fn too_large(limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("larger than {limit} bytes"),
    )
}

/// Replaces `path` with `bytes` so that a crash at any point leaves either the
/// old or the new content. The file gets `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    put_in_place(path, bytes, mode, |tmp, path| fs::rename(tmp, path))
}

/// Writes `bytes` to a new file with `mode`, failing if it already exists,
/// so that `init` can never overwrite a key. Linked into place only once
/// whole and synced: a full disk or a crash leaves no file, rather than an
/// empty or partial key that a later `init` would take for a good one.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    put_in_place(path, bytes, mode, |tmp, path| {
        fs::hard_link(tmp, path)?;
        fs::remove_file(tmp)
    })
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, gives it
/// `path`'s name with `place`, and syncs the directory. The temporary file
/// goes on any error, and so do any a crash left before (they may hold an
/// old copy of the file, such as a secret since removed).
fn put_in_place(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    place: impl FnOnce(&Path, &Path) -> io::Result<()>,
) -> io::Result<()> {
    let dir = parent_of(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?
        .to_string_lossy();
    let prefix = format!(".{name}.");
    let tmp = dir.join(format!(
        "{prefix}{:016x}.tmp",
        rand::thread_rng().next_u64()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        place(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    remove_leftovers(dir, &prefix);
    result
}

/// Removes temporary files named `PREFIX` + 16 hex digits + `.tmp` that a
/// crash left behind.
fn remove_leftovers(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(random) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.strip_suffix(".tmp"))
        else {
            continue;
        };
        if random.len() == 16 && random.bytes().all(|b| b.is_ascii_hexdigit()) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn write_new_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_new(&path, b"a", 0o600).unwrap();
        assert!(write_new(&path, b"b", 0o600).is_err());
        assert_eq!(fs::read(&path).unwrap(), b"a");
    }

    #[test]
    fn a_crashs_leftover_temporary_files_go_at_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.enc");
        let leftover = dir.path().join(".secrets.enc.0123456789abcdef.tmp");
        let unrelated = dir.path().join(".secrets.enc.notours.tmp");
        fs::write(&leftover, b"old copy").unwrap();
        fs::write(&unrelated, b"keep").unwrap();
        write_atomic(&path, b"new", 0o600).unwrap();
        assert!(!leftover.exists() && unrelated.exists());

        let key = dir.path().join("ca.key");
        let leftover = dir.path().join(".ca.key.fedcba9876543210.tmp");
        fs::write(&leftover, b"").unwrap();
        write_new(&key, b"key", 0o600).unwrap();
        assert!(!leftover.exists());
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [".secrets.enc.notours.tmp", "ca.key", "secrets.enc"]);
        let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
