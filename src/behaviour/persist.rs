//! Local durability for the memory store: a snapshot file plus an append-only journal.
//!
//! Takes the store, its key hasher and `snapshot_path`; restores both files into the store at
//! start ([`restore`]), then ([`FileBackend`]) appends every sanction change to
//! `<snapshot_path>.journal` and fsyncs it, and rewrites the snapshot every
//! `snapshot_interval_secs` and on shutdown. Called by the tracker; the files are written by
//! one dedicated thread (`behaviour-journal`), never on the async runtime.
//!
//! ## Files
//! - Snapshot: `CGBSNAP1`, the key hasher's two key words, the unix ms it was written, the
//!   record count, then per record `key u64 | score f32 | seen u32 | until u32 | level u8`
//!   (little-endian), and a 64-bit checksum of everything before. Written to `.tmp`, fsynced,
//!   renamed over the old one, and the directory fsynced.
//! - Journal: `CGBJRNL1`, the two key words and their checksum, then 30-byte entries
//!   `1 | key | score | seen | until | level | checksum of the 22 bytes before`. An entry
//!   overwrites the saved part of the user's record on replay. A torn last entry (a crash in
//!   mid-write) ends the replay with a warning.
//!
//! ## Ordering
//! A snapshot first moves the journal aside (`.journal.prev`) and starts a new one, then
//! collects the store, writes the snapshot, and deletes `.journal.prev`. Every change is
//! applied to the store before it is queued here, so a change queued before the move is in
//! the snapshot, and one queued after it is in the new journal; a crash at any point leaves
//! files that restore everything fsynced.
//!
//! A snapshot that cannot be written (disk full) is logged and retried at the next interval;
//! until one succeeds, `.journal.prev` is kept and the journal is not moved again. At start-up
//! the snapshot of what was restored is written before the journal is truncated, so a start
//! that fails on a full disk loses nothing either.

use super::BehaviourError;
use super::SanctionState;
use super::backend::{Backend, Change};
use super::state::{Policy, SavedUser};
use super::store::{KeyHasher, MemoryStore, UserKey, checksum, unix_now_ms};
use futures_util::future::BoxFuture;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::oneshot;

const SNAPSHOT_MAGIC: &[u8; 8] = b"CGBSNAP1";
const JOURNAL_MAGIC: &[u8; 8] = b"CGBJRNL1";
/// Bytes of one snapshot record.
const RECORD_BYTES: usize = 21;
/// Bytes of one journal entry.
const ENTRY_BYTES: usize = 30;
/// Bytes of the journal header.
const JOURNAL_HEADER_BYTES: usize = 32;
/// Bytes of the snapshot header.
const SNAPSHOT_HEADER_BYTES: usize = 40;
/// Journal entries written between two fsyncs at most (group commit).
const MAX_GROUP: usize = 4096;

/// The three files of one `snapshot_path`.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    /// The snapshot.
    snapshot: PathBuf,
    /// Where the snapshot is written before the rename.
    snapshot_tmp: PathBuf,
    /// The live journal.
    journal: PathBuf,
    /// The journal moved aside during a snapshot.
    journal_prev: PathBuf,
}

impl Paths {
    /// The files for `snapshot_path`.
    pub(crate) fn new(snapshot: &Path) -> Paths {
        let with = |suffix: &str| {
            let mut s = snapshot.as_os_str().to_owned();
            s.push(suffix);
            PathBuf::from(s)
        };
        Paths {
            snapshot: snapshot.to_owned(),
            snapshot_tmp: with(".tmp"),
            journal: with(".journal"),
            journal_prev: with(".journal.prev"),
        }
    }
}

fn restore_error(path: &Path, reason: impl Into<String>) -> BehaviourError {
    BehaviourError::Restore {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> BehaviourError + '_ {
    move |source| BehaviourError::Write {
        path: path.to_owned(),
        source,
    }
}

/// Reads a whole file; `None` if it does not exist.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, BehaviourError> {
    match File::open(path) {
        Ok(mut f) => {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)
                .map_err(|e| restore_error(path, e.to_string()))?;
            Ok(Some(buf))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(restore_error(path, e.to_string())),
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// Encodes `key` + `saved` (21 bytes) into `out`.
fn put_record(out: &mut Vec<u8>, key: UserKey, saved: &SavedUser) {
    out.extend_from_slice(&key.to_le_bytes());
    out.extend_from_slice(&saved.score.to_le_bytes());
    out.extend_from_slice(&saved.seen.to_le_bytes());
    out.extend_from_slice(&saved.until.to_le_bytes());
    out.push(saved.level.to_u8());
}

/// Decodes 21 bytes written by [`put_record`].
fn get_record(b: &[u8]) -> Option<(UserKey, SavedUser)> {
    let score = f32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if !score.is_finite() || score < 0.0 {
        return None;
    }
    Some((
        u64_at(b, 0),
        SavedUser {
            score,
            seen: u32_at(b, 12),
            until: u32_at(b, 16),
            level: SanctionState::from_u8(b[20])?,
        },
    ))
}

/// What [`restore`] found.
#[derive(Debug, Default)]
pub(crate) struct Restored {
    /// The key hasher the files were written with; `None` when there were no files.
    pub(crate) keys: Option<KeyHasher>,
    /// Records from the snapshot.
    pub(crate) snapshot_records: usize,
    /// Entries replayed from the journals.
    pub(crate) journal_entries: usize,
}

/// Reads the snapshot and journals of `paths` into `store` (records overwrite in file order).
/// A damaged snapshot or a journal written under another key is an error; a torn journal tail
/// is not.
pub(crate) fn restore(paths: &Paths, store: &MemoryStore) -> Result<Restored, BehaviourError> {
    let now = store.now();
    let mut out = Restored::default();
    let apply = |key: UserKey, saved: SavedUser| {
        store.update(key, now, |u, _| u.overwrite(&saved));
    };
    if let Some(b) = read_optional(&paths.snapshot)? {
        let bad = |why: &str| restore_error(&paths.snapshot, why);
        if b.len() < SNAPSHOT_HEADER_BYTES + 8 || &b[..8] != SNAPSHOT_MAGIC {
            return Err(bad("not a chatguard behaviour snapshot"));
        }
        let body = b.len() - 8;
        if checksum(&b[..body]) != u64_at(&b, body) {
            return Err(bad("checksum mismatch (damaged file)"));
        }
        let count = usize::try_from(u64_at(&b, 32)).unwrap_or(usize::MAX);
        if count.checked_mul(RECORD_BYTES) != Some(body - SNAPSHOT_HEADER_BYTES) {
            return Err(bad("record count does not match the file size"));
        }
        out.keys = Some(KeyHasher::from_parts(u64_at(&b, 8), u64_at(&b, 16)));
        for rec in b[SNAPSHOT_HEADER_BYTES..body].chunks_exact(RECORD_BYTES) {
            let (key, saved) = get_record(rec).ok_or_else(|| bad("invalid record"))?;
            apply(key, saved);
            out.snapshot_records += 1;
        }
    }
    for path in [&paths.journal_prev, &paths.journal] {
        let Some(b) = read_optional(path)? else {
            continue;
        };
        if b.len() < JOURNAL_HEADER_BYTES {
            // Created but the header never made it to disk: nothing was journaled in it.
            tracing::warn!(path = %path.display(), "empty behaviour journal ignored");
            continue;
        }
        if &b[..8] != JOURNAL_MAGIC || checksum(&b[..24]) != u64_at(&b, 24) {
            return Err(restore_error(path, "not a chatguard behaviour journal"));
        }
        let keys = (u64_at(&b, 8), u64_at(&b, 16));
        match out.keys {
            Some(k) if k.parts() != keys => {
                return Err(restore_error(
                    path,
                    "written with another key than the snapshot (files from two instances?)",
                ));
            }
            _ => out.keys = Some(KeyHasher::from_parts(keys.0, keys.1)),
        }
        let entries = &b[JOURNAL_HEADER_BYTES..];
        for (i, e) in entries.chunks(ENTRY_BYTES).enumerate() {
            let valid = e.len() == ENTRY_BYTES && e[0] == 1 && checksum(&e[..22]) == u64_at(e, 22);
            let record = if valid { get_record(&e[1..22]) } else { None };
            let Some((key, saved)) = record else {
                tracing::warn!(
                    path = %path.display(), entry = i,
                    "behaviour journal ends in a torn or damaged entry; replay stops there"
                );
                break;
            };
            apply(key, saved);
            out.journal_entries += 1;
        }
    }
    Ok(out)
}

/// Work for the journal thread.
enum Cmd {
    /// Append one entry.
    Append([u8; ENTRY_BYTES]),
    /// Answer once everything before is fsynced.
    Sync(oneshot::Sender<()>),
    /// Write a final snapshot and stop.
    Shutdown(oneshot::Sender<()>),
}

/// The `memory` backend's durability: see the module docs.
pub(crate) struct FileBackend {
    /// To the journal thread; `None` after shutdown.
    tx: Mutex<Option<Sender<Cmd>>>,
}

/// State of the journal thread.
struct Writer {
    /// The files.
    paths: Paths,
    /// The records to snapshot.
    store: Arc<MemoryStore>,
    /// Saved with the files so that keys mean the same after a restart.
    keys: KeyHasher,
    /// The live journal.
    journal: BufWriter<File>,
    /// Failed journal writes, fsyncs and snapshots (`/metrics`).
    errors: Arc<AtomicU64>,
}

impl FileBackend {
    /// Compacts what [`restore`] read into a fresh snapshot, starts an empty journal, and
    /// starts the journal thread. Blocking (file I/O): call at start-up, off the runtime.
    pub(crate) fn start(
        paths: Paths,
        store: Arc<MemoryStore>,
        keys: KeyHasher,
        interval: Duration,
        errors: Arc<AtomicU64>,
    ) -> Result<FileBackend, BehaviourError> {
        if let Some(dir) = paths.snapshot.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(write_error(dir))?;
        }
        // The snapshot takes over both old journals. It is written before the journal is
        // truncated, so a start-up that fails here (disk full) loses nothing.
        write_snapshot(&paths, &store, keys).map_err(write_error(&paths.snapshot))?;
        let journal = open_journal(&paths.journal, keys).map_err(write_error(&paths.journal))?;
        remove_if_exists(&paths.journal_prev).map_err(write_error(&paths.journal_prev))?;
        let writer = Writer {
            paths,
            store,
            keys,
            journal,
            errors,
        };
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("behaviour-journal".into())
            .spawn(move || writer.run(rx, interval))
            .map_err(|source| BehaviourError::Write {
                path: PathBuf::from("<journal thread>"),
                source,
            })?;
        Ok(FileBackend {
            tx: Mutex::new(Some(tx)),
        })
    }

    fn send(&self, cmd: Cmd) -> bool {
        let tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        tx.as_ref().is_some_and(|tx| tx.send(cmd).is_ok())
    }
}

impl Backend for FileBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn submit(&self, change: &Change) {
        let Change::Sanction { key, saved, .. } = change else {
            return;
        };
        let mut entry = Vec::with_capacity(ENTRY_BYTES);
        entry.push(1);
        put_record(&mut entry, *key, saved);
        entry.extend_from_slice(&checksum(&entry).to_le_bytes());
        let mut bytes = [0u8; ENTRY_BYTES];
        bytes.copy_from_slice(&entry);
        if !self.send(Cmd::Append(bytes)) {
            tracing::error!("behaviour journal is closed: a sanction change was not journaled");
        }
    }

    fn sync(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (done_tx, done_rx) = oneshot::channel();
            if self.send(Cmd::Sync(done_tx)) {
                let _ = done_rx.await;
            }
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (done_tx, done_rx) = oneshot::channel();
            let sent = self.send(Cmd::Shutdown(done_tx));
            self.tx
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if sent {
                let _ = done_rx.await;
            }
        })
    }
}

fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// fsyncs the directory holding `path`, so that a rename or create in it is durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Creates (truncates) a journal at `path` with its header, fsynced.
fn open_journal(path: &Path, keys: KeyHasher) -> std::io::Result<BufWriter<File>> {
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    let (k0, k1) = keys.parts();
    let mut header = Vec::with_capacity(JOURNAL_HEADER_BYTES);
    header.extend_from_slice(JOURNAL_MAGIC);
    header.extend_from_slice(&k0.to_le_bytes());
    header.extend_from_slice(&k1.to_le_bytes());
    header.extend_from_slice(&checksum(&header).to_le_bytes());
    file.write_all(&header)?;
    file.sync_all()?;
    sync_dir(path)?;
    Ok(BufWriter::with_capacity(64 << 10, file))
}

/// Whether a record is worth a place in the snapshot: a sanction or cool-down to keep, or a
/// score above 1% of `throttle_at` (smaller ones decay to nothing before they matter).
fn worth_saving(saved: &SavedUser, now: u32, policy: &Policy) -> bool {
    let state = saved.to_state();
    state.protected(now, policy) || state.score_at(now, policy) >= 0.01 * policy.throttle_at
}

impl Writer {
    fn run(mut self, rx: Receiver<Cmd>, interval: Duration) {
        let mut next_snapshot = std::time::Instant::now() + interval;
        loop {
            let wait = next_snapshot.saturating_duration_since(std::time::Instant::now());
            let cmd = match rx.recv_timeout(wait) {
                Ok(cmd) => cmd,
                Err(RecvTimeoutError::Timeout) => {
                    self.snapshot_logged();
                    next_snapshot = std::time::Instant::now() + interval;
                    continue;
                }
                // Every handle is gone without a shutdown (a crash-like stop): the journal is
                // all there is; make sure it is on disk.
                Err(RecvTimeoutError::Disconnected) => {
                    self.sync_logged();
                    return;
                }
            };
            match cmd {
                Cmd::Append(first) => {
                    self.append(&first);
                    // Group commit: take whatever else queued meanwhile, then one fsync.
                    let mut pending = Vec::new();
                    for _ in 1..MAX_GROUP {
                        match rx.try_recv() {
                            Ok(Cmd::Append(e)) => self.append(&e),
                            Ok(other) => {
                                pending.push(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.sync_logged();
                    for cmd in pending {
                        if self.other(cmd) {
                            return;
                        }
                    }
                }
                other => {
                    if self.other(other) {
                        return;
                    }
                }
            }
        }
    }

    /// Handles a command other than `Append`; true when the thread should stop.
    fn other(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Append(e) => {
                self.append(&e);
                self.sync_logged();
                false
            }
            Cmd::Sync(done) => {
                self.sync_logged();
                let _ = done.send(());
                false
            }
            Cmd::Shutdown(done) => {
                self.snapshot_logged();
                let _ = done.send(());
                true
            }
        }
    }

    fn append(&mut self, entry: &[u8; ENTRY_BYTES]) {
        if let Err(e) = self.journal.write_all(entry) {
            self.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, path = %self.paths.journal.display(),
                "cannot write the behaviour journal");
        }
    }

    fn sync_logged(&mut self) {
        let synced = self
            .journal
            .flush()
            .and_then(|()| self.journal.get_ref().sync_data());
        if let Err(e) = synced {
            self.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, path = %self.paths.journal.display(),
                "cannot fsync the behaviour journal");
        }
    }

    fn snapshot_logged(&mut self) {
        let started = std::time::Instant::now();
        match self.rotate_and_snapshot() {
            Ok(records) => tracing::debug!(
                records,
                took_ms = started.elapsed().as_millis() as u64,
                "behaviour snapshot written"
            ),
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, path = %self.paths.snapshot.display(),
                    "cannot write the behaviour snapshot; the journal keeps growing");
            }
        }
    }

    /// Moves the journal aside, writes the snapshot, deletes the old journal.
    ///
    /// After a failed snapshot, `.journal.prev` still holds changes that no snapshot on disk
    /// has: it is kept, and the journal is not moved (that would replace it) but keeps growing
    /// until a snapshot succeeds. Its entries are then older than the snapshot or equal to it,
    /// as entries queued during a rotation already are.
    fn rotate_and_snapshot(&mut self) -> std::io::Result<usize> {
        self.journal.flush()?;
        self.journal.get_ref().sync_data()?;
        if !self.paths.journal_prev.exists() {
            std::fs::rename(&self.paths.journal, &self.paths.journal_prev)?;
            self.journal = open_journal(&self.paths.journal, self.keys)?;
        }
        let records = self.write_snapshot()?;
        remove_if_exists(&self.paths.journal_prev)?;
        Ok(records)
    }

    /// [`write_snapshot`] of this writer's store.
    fn write_snapshot(&mut self) -> std::io::Result<usize> {
        write_snapshot(&self.paths, &self.store, self.keys)
    }
}

/// Writes the snapshot of `store` (tmp, fsync, rename, fsync dir); returns its size in records.
fn write_snapshot(paths: &Paths, store: &MemoryStore, keys: KeyHasher) -> std::io::Result<usize> {
    let now = store.now().tick;
    let policy = store.policy().clone();
    let mut body = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + 1024);
    let (k0, k1) = keys.parts();
    body.extend_from_slice(SNAPSHOT_MAGIC);
    body.extend_from_slice(&k0.to_le_bytes());
    body.extend_from_slice(&k1.to_le_bytes());
    body.extend_from_slice(&unix_now_ms().to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    let mut count = 0u64;
    store.for_each(|key, user| {
        let saved = user.saved();
        if worth_saving(&saved, now, &policy) {
            put_record(&mut body, key, &saved);
            count += 1;
        }
    });
    body[32..40].copy_from_slice(&count.to_le_bytes());
    let sum = checksum(&body);
    body.extend_from_slice(&sum.to_le_bytes());
    let mut tmp = File::create(&paths.snapshot_tmp)?;
    tmp.write_all(&body)?;
    tmp.sync_all()?;
    drop(tmp);
    std::fs::rename(&paths.snapshot_tmp, &paths.snapshot)?;
    sync_dir(&paths.snapshot)?;
    Ok(usize::try_from(count).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::behaviour::BehaviourConfig;
    use crate::behaviour::state::Now;

    fn store() -> Arc<MemoryStore> {
        Arc::new(MemoryStore::new(&BehaviourConfig::default()))
    }

    fn saved(level: SanctionState, until: u32, score: f32) -> SavedUser {
        SavedUser {
            score,
            seen: until.saturating_sub(100),
            until,
            level,
        }
    }

    fn sanction(key: UserKey, s: SavedUser) -> Change {
        Change::Sanction {
            key,
            tenant: Arc::from("t"),
            user: "u".into(),
            saved: s,
            manual: false,
            reason: "abuse_rate".into(),
        }
    }

    #[tokio::test]
    async fn journal_and_snapshot_restore_in_order_and_survive_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = Paths::new(&dir.path().join("state").join("behaviour.snap"));
        let first = store();
        let keys = KeyHasher::random();
        let now = first.now();
        let far = now.tick + 3600;
        // A sanctioned user in the store at start goes into the first snapshot.
        first.update(1, now, |u, _| {
            u.overwrite(&saved(SanctionState::Block, far, 20.0))
        });
        let backend = FileBackend::start(
            paths.clone(),
            first.clone(),
            keys,
            Duration::from_secs(3600),
            Arc::default(),
        )
        .expect("start");
        // Two changes to user 2: the later one wins on replay.
        backend.submit(&sanction(2, saved(SanctionState::Throttle, far, 5.0)));
        backend.submit(&sanction(2, saved(SanctionState::Mute, far, 9.0)));
        backend.sync().await;
        drop(backend); // like a crash: no final snapshot

        // Tear the journal's last entry in half.
        let journal = std::fs::read(&paths.journal).expect("journal");
        assert_eq!(journal.len(), JOURNAL_HEADER_BYTES + 2 * ENTRY_BYTES);
        let mut torn = journal.clone();
        torn.extend_from_slice(&journal[JOURNAL_HEADER_BYTES..JOURNAL_HEADER_BYTES + 10]);
        std::fs::write(&paths.journal, &torn).expect("write");

        let second = store();
        let restored = restore(&paths, &second).expect("restore");
        assert_eq!(restored.keys.map(|k| k.parts()), Some(keys.parts()));
        assert_eq!(
            (restored.snapshot_records, restored.journal_entries),
            (1, 2)
        );
        assert_eq!(second.get(1).map(|u| u.level), Some(SanctionState::Block));
        assert_eq!(
            second.get(2).map(|u| (u.level, u.score)),
            Some((SanctionState::Mute, 9.0))
        );

        // A restart compacts into the snapshot; a shutdown snapshot then covers everything.
        let backend = FileBackend::start(
            paths.clone(),
            second.clone(),
            keys,
            Duration::from_secs(3600),
            Arc::default(),
        )
        .expect("restart");
        assert!(!paths.journal_prev.exists());
        backend.shutdown().await;
        let third = store();
        let restored = restore(&paths, &third).expect("restore");
        assert_eq!(
            (restored.snapshot_records, restored.journal_entries),
            (2, 0)
        );
        assert_eq!(third.get(2).map(|u| u.level), Some(SanctionState::Mute));
    }

    #[test]
    fn a_damaged_snapshot_is_an_error_that_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.snap");
        let paths = Paths::new(&path);
        std::fs::write(
            &path,
            b"CGBSNAP1 but then garbage that is long enough to parse",
        )
        .expect("write");
        let err = restore(&paths, &store()).expect_err("damaged").to_string();
        assert!(
            err.contains("b.snap") && err.contains("snapshot_path"),
            "{err}"
        );
    }

    #[test]
    fn clean_records_with_no_score_are_not_saved() {
        let p = Policy::new(&BehaviourConfig::default());
        let now = Now::from_unix_ms(1_000_000).tick;
        assert!(!worth_saving(&SavedUser::default(), now, &p));
        assert!(worth_saving(
            &saved(SanctionState::Throttle, now + 10, 0.0),
            now,
            &p
        ));
        assert!(worth_saving(
            &SavedUser {
                score: 1.0,
                seen: now,
                ..SavedUser::default()
            },
            now,
            &p
        ));
    }
}
