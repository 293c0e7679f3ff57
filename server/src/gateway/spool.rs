//! The settlement spool: settlements the database could not take before their
//! answer went out, kept on local disk until it does (DESIGN.md R7).
//!
//! A proxied request's settlement is committed before the answer's last byte.
//! When the database is held up past the tries made while the request waits
//! (another process holds SQLite's write lock, PostgreSQL is away), the answer
//! goes out all the same and the settlement is tried again in the background
//! ([`super::hold`]). Before the answer goes out it is written here, one file per
//! settlement (`{reservation id}.json`, JSON, synced to disk with its folder),
//! so that a process stopped or killed meanwhile loses none: the next start, and
//! every lease sweep of a running process, replays what is here
//! ([`super::hold::replay_spool`]). A settlement carries its idempotency key
//! and bills a hold the sweep released meanwhile (`Settlement::bill_if_lapsed`),
//! so a replay never bills twice, whichever process makes it and however often.
//!
//! The folder is `settlement_spool` in the config; by default the database
//! file's path with `-settlements` appended on SQLite, `tollgate-settlements` in
//! the working directory on PostgreSQL. Several processes may share one folder.

use std::{
    collections::HashSet,
    io::Write,
    path::{Path, PathBuf},
    sync::Mutex,
};

use app::domain::Usage;
use app::store::ReservationId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A settlement not yet written to the database: what the request's end
/// reported, enough to settle it later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSettlement {
    /// The reservation it ends.
    pub reservation: ReservationId,
    /// The id of the model that served the request (for the metrics and logs).
    pub served: String,
    /// The usage the upstream reported, in tokens; `None` bills the estimate
    /// (the reserved amount) and flags the event (R7).
    pub usage: Option<Usage>,
    /// When the request finished: the settlement's time in the ledger.
    pub finished_at: DateTime<Utc>,
}

/// A folder of [`PendingSettlement`]s (see the module doc).
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    /// Entries a task of this process is still settling: a replay leaves them
    /// to it.
    claimed: Mutex<HashSet<ReservationId>>,
}

/// The suffix of an entry's file.
const ENTRY: &str = ".json";
/// The suffix an entry that cannot be read is renamed to: kept for the
/// operator, no longer replayed.
const UNREADABLE: &str = ".unreadable";

impl Spool {
    /// The spool in `dir`, created (owner only) when the first entry is written.
    pub fn new(dir: PathBuf) -> Spool {
        Spool {
            dir,
            claimed: Mutex::new(HashSet::new()),
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the folder (owner only) if it is missing and writes a file in it
    /// the way an entry is written, then removes it, so that a folder that
    /// cannot take entries stops the server at start rather than fail the
    /// first settlement that needs it.
    ///
    /// Errors: the I/O error (no permission, a file in the way, a read-only or
    /// full file system).
    pub async fn prepare(&self) -> std::io::Result<()> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            create_private_dir(&dir)?;
            // Hidden, so never taken for an entry; a name of its own, since
            // several processes may check one folder at the same instant.
            let probe = dir.join(format!(".write-check-{}", uuid::Uuid::new_v4()));
            let mut file = open_private(&probe)?;
            file.write_all(b"{}")?;
            file.commit()?;
            std::fs::remove_file(probe)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    /// Writes `entry` durably (synced with its folder before this returns) and
    /// claims it for the caller, who settles it and then calls [`Spool::remove`]
    /// or [`Spool::unclaim`]. An entry of the same reservation is replaced.
    ///
    /// Errors: the I/O error when the folder cannot be created or the file
    /// written (no space, no permission); then nothing is claimed.
    pub async fn put(&self, entry: &PendingSettlement) -> std::io::Result<()> {
        let path = self.path_of(&entry.reservation);
        let dir = self.dir.clone();
        let json = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        self.claim(&entry.reservation);
        let written = tokio::task::spawn_blocking(move || {
            create_private_dir(&dir)?;
            let mut file = open_private(&path)?;
            file.write_all(&json)?;
            file.commit()
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if written.is_err() {
            self.unclaim(&entry.reservation);
        }
        written
    }

    /// Removes the entry of `reservation` (settled, or refused for good) and
    /// its claim. An entry already gone (another process settled it) is fine;
    /// any other failure is logged, and a later replay finds the settlement
    /// recorded and removes it then.
    pub async fn remove(&self, reservation: &ReservationId) {
        let path = self.path_of(reservation);
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_file(path))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(reservation = %reservation, error = %e,
                "could not remove a settled entry from the settlement spool"),
        }
        self.unclaim(reservation);
    }

    /// Gives up the claim on `reservation`'s entry, left for a replay.
    pub fn unclaim(&self, reservation: &ReservationId) {
        self.claimed().remove(reservation);
    }

    /// Claims the entry of `reservation`; false when a task of this process
    /// already has it.
    pub fn claim(&self, reservation: &ReservationId) -> bool {
        self.claimed().insert(reservation.clone())
    }

    /// The entries waiting, oldest finished first, claimed ones included. A file
    /// that is not an entry (a write cut off leaves only a hidden temporary file,
    /// never a partial entry) is skipped; an entry that cannot be read is renamed
    /// `….unreadable`, logged as an error and no longer replayed. A missing
    /// folder holds nothing.
    ///
    /// Errors: the I/O error when the folder cannot be listed.
    pub async fn entries(&self) -> std::io::Result<Vec<PendingSettlement>> {
        let dir = self.dir.clone();
        let mut entries = tokio::task::spawn_blocking(move || read_entries(&dir))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))?;
        entries.sort_by_key(|entry| entry.finished_at);
        Ok(entries)
    }

    fn claimed(&self) -> std::sync::MutexGuard<'_, HashSet<ReservationId>> {
        // A panic elsewhere while holding it left a set that is still whole.
        self.claimed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `{dir}/{reservation}.json`: see [`entry_name`].
    fn path_of(&self, reservation: &ReservationId) -> PathBuf {
        self.dir.join(entry_name(reservation))
    }
}

/// The file name of `reservation`'s entry: `{id}.json` for a UUID (the store's
/// ids), `x{hex of the id}.json` for any other text, so a name is always one
/// plain path component, and a file of another name (an operator's, in a
/// folder shared with other files) is never taken for an entry.
fn entry_name(reservation: &ReservationId) -> String {
    let id = &reservation.0;
    match uuid::Uuid::try_parse(id) {
        Ok(uuid) if uuid.hyphenated().to_string() == *id => format!("{id}{ENTRY}"),
        _ => format!("x{}{ENTRY}", hex::encode(id)),
    }
}

/// Whether `name` is the file name of some reservation's entry.
fn is_entry_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(ENTRY) else {
        return false;
    };
    match stem.strip_prefix('x') {
        Some(hex) => hex::decode(hex)
            .ok()
            .and_then(|id| String::from_utf8(id).ok())
            .is_some_and(|id| entry_name(&ReservationId(id)) == name),
        None => entry_name(&ReservationId(stem.to_owned())) == name,
    }
}

/// Where the unreadable entry `path` is kept: `{stem}.unreadable`, or
/// `{stem}.2.unreadable` and so on when an earlier one of the same name is
/// kept there already, so none is overwritten.
fn set_aside_name(path: &Path) -> PathBuf {
    let first = path.with_extension(&UNREADABLE[1..]);
    let stem = path.with_extension("");
    std::iter::once(first)
        .chain((2..).map(|n| {
            let mut name = stem.clone().into_os_string();
            name.push(format!(".{n}{UNREADABLE}"));
            PathBuf::from(name)
        }))
        .find(|candidate| !candidate.exists())
        .unwrap_or_else(|| unreachable!("the names go on without end"))
}

/// Creates `dir` and its missing parents, readable by their owner only.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Opens `path` to be written atomically (in full, or not at all), readable
/// by its owner only as the database file is: an entry names the user, the
/// API key and the usage of a request.
fn open_private(path: &Path) -> std::io::Result<atomic_write_file::AtomicWriteFile> {
    use std::os::unix::fs::OpenOptionsExt;
    atomic_write_file::OpenOptions::new().mode(0o600).open(path)
}

fn read_entries(dir: &Path) -> std::io::Result<Vec<PendingSettlement>> {
    let listing = match std::fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut entries = Vec::new();
    for item in listing {
        let item = item?;
        // Only regular files named as entries: never a folder, a link or a FIFO
        // (reading one would wait for a writer forever), nor another's file.
        let Some(name) = item.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !is_entry_name(&name) || !item.file_type()?.is_file() {
            continue;
        }
        let path = item.path();
        let read = std::fs::read(&path).and_then(|bytes| {
            let entry = serde_json::from_slice::<PendingSettlement>(&bytes)
                .map_err(std::io::Error::other)?;
            // Removed by its reservation's name once settled: any other name
            // would be replayed for ever.
            match entry_name(&entry.reservation) == name {
                true => Ok(entry),
                false => Err(std::io::Error::other(format!(
                    "it holds the settlement of reservation {}, not of its own name",
                    entry.reservation
                ))),
            }
        });
        match read {
            Ok(entry) => entries.push(entry),
            // Settled and removed by another process since the listing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                let kept = set_aside_name(&path);
                tracing::error!(file = %path.display(), kept = %kept.display(), error = %e,
                    "an entry of the settlement spool cannot be read: kept aside, not billed");
                if let Err(e) = std::fs::rename(&path, &kept) {
                    tracing::error!(file = %path.display(), error = %e,
                        "could not set aside an unreadable entry of the settlement spool");
                }
            }
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, usage: Option<Usage>, second: i64) -> PendingSettlement {
        PendingSettlement {
            reservation: ReservationId(id.into()),
            served: "big".into(),
            usage,
            finished_at: DateTime::from_timestamp(1_780_000_000 + second, 0).unwrap(),
        }
    }

    #[tokio::test]
    async fn entries_come_back_as_written_oldest_first_and_go_when_removed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path().join("spool"));
        assert_eq!(spool.entries().await.unwrap(), []);
        let usage = Usage {
            prompt_tokens: 1200,
            cached_tokens: 200,
            completion_tokens: 300,
            reasoning_tokens: 100,
        };
        let later = entry("0193a1b2-0000-7000-8000-000000000002", Some(usage), 5);
        let earlier = entry("0193a1b2-0000-7000-8000-000000000001", None, 1);
        spool.put(&later).await.unwrap();
        spool.put(&earlier).await.unwrap();
        assert_eq!(
            spool.entries().await.unwrap(),
            [earlier.clone(), later.clone()]
        );
        // Claimed by the writer until removed or given up.
        assert!(!spool.claim(&later.reservation));
        spool.remove(&later.reservation).await;
        assert!(spool.claim(&later.reservation));
        assert_eq!(
            spool.entries().await.unwrap(),
            std::slice::from_ref(&earlier)
        );
        // Removing twice (another process was first) is fine.
        spool.remove(&later.reservation).await;
        spool.unclaim(&earlier.reservation);
        assert!(spool.claim(&earlier.reservation));
    }

    #[tokio::test]
    async fn the_folder_and_its_entries_are_private_and_entries_whole() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path().join("a/b"));
        let id = "0193a1b2-0000-7000-8000-00000000000a";
        spool.put(&entry(id, None, 0)).await.unwrap();
        let mode = std::fs::metadata(spool.dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let file = spool.dir().join(format!("{id}.json"));
        let mode = std::fs::metadata(file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<String> = std::fs::read_dir(spool.dir())
            .unwrap()
            .map(|item| item.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [format!("{id}.json")]);
    }

    #[tokio::test]
    async fn an_unreadable_entry_is_set_aside_and_other_files_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path().to_owned());
        let good = entry("0193a1b2-0000-7000-8000-000000000001", None, 0);
        spool.put(&good).await.unwrap();
        let bad = "0193a1b2-0000-7000-8000-000000000002";
        std::fs::write(dir.path().join(format!("{bad}.json")), b"{\"reservation\":").unwrap();
        // Whole, but of another reservation than its name says.
        let moved = "0193a1b2-0000-7000-8000-000000000003";
        std::fs::copy(
            dir.path().join(format!("{}.json", good.reservation)),
            dir.path().join(format!("{moved}.json")),
        )
        .unwrap();
        // Not entries: left as they are, never read.
        std::fs::write(dir.path().join(".good.json.tmp1234"), b"{").unwrap();
        std::fs::write(dir.path().join("package.json"), b"{}").unwrap();
        std::fs::create_dir(dir.path().join("0193a1b2-0000-7000-8000-000000000004.json")).unwrap();
        let fifo = dir.path().join("0193a1b2-0000-7000-8000-000000000005.json");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());

        assert_eq!(spool.entries().await.unwrap(), std::slice::from_ref(&good));
        for set_aside in [bad, moved] {
            assert!(dir.path().join(format!("{set_aside}.unreadable")).exists());
            assert!(!dir.path().join(format!("{set_aside}.json")).exists());
        }
        assert!(dir.path().join(".good.json.tmp1234").exists());
        assert!(dir.path().join("package.json").exists());
        assert!(fifo.exists());
        // Not reported again.
        assert_eq!(spool.entries().await.unwrap(), std::slice::from_ref(&good));
        // Another unreadable entry of the same name keeps the first one.
        std::fs::write(dir.path().join(format!("{bad}.json")), b"[]").unwrap();
        assert_eq!(spool.entries().await.unwrap(), std::slice::from_ref(&good));
        assert_eq!(
            std::fs::read(dir.path().join(format!("{bad}.unreadable"))).unwrap(),
            b"{\"reservation\":"
        );
        assert_eq!(
            std::fs::read(dir.path().join(format!("{bad}.2.unreadable"))).unwrap(),
            b"[]"
        );
    }

    #[tokio::test]
    async fn an_id_that_is_not_a_plain_name_stays_inside_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path().join("spool"));
        let odd = entry("../../etc/x", None, 0);
        spool.put(&odd).await.unwrap();
        assert_eq!(spool.entries().await.unwrap(), std::slice::from_ref(&odd));
        let names: Vec<String> = std::fs::read_dir(spool.dir())
            .unwrap()
            .map(|item| item.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [format!("x{}.json", hex::encode("../../etc/x"))]);
    }

    #[tokio::test]
    async fn a_folder_that_cannot_be_made_is_an_error_and_claims_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"").unwrap();
        let spool = Spool::new(file.join("spool"));
        let pending = entry("r-1", None, 0);
        assert!(spool.put(&pending).await.is_err());
        assert!(spool.claim(&pending.reservation));
    }

    /// Several processes started at once in one folder each check it: none
    /// may take another's check file for its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn processes_checking_one_folder_at_once_all_pass_and_leave_it_empty() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("spool");
        let checks = (0..64).map(|_| {
            let spool = Spool::new(folder.clone());
            tokio::spawn(async move { spool.prepare().await })
        });
        for check in futures::future::join_all(checks).await {
            check.unwrap().unwrap();
        }
        let left: Vec<_> = std::fs::read_dir(&folder).unwrap().collect();
        assert!(left.is_empty(), "left in the folder: {left:?}");
    }
}
