//! # Batch scan
//!
//! Takes a folder and a [`Moderator`] and gives back a JSONL report — one line per file — and a
//! [`ScanSummary`]. Called by `chatguard scan DIR`.
//!
//! ```text
//! walker thread ──entries──▶ dispatcher (≤ jobs tasks) ──results──▶ writer thread
//!  (no symlinks followed)      image: one moderate request            report line, flushed
//!                              text: one request per non-empty line   progress bar, summary
//! ```
//! - Images are recognised by their magic bytes (JPEG, PNG, WebP, GIF) or, failing that, by
//!   their extension (so a corrupt `.jpg` is reported as a broken image, not skipped).
//! - Text files (by extension: `.txt`, `.md`, `.csv`, `.json`, `.log`, …) are moderated one
//!   message per non-empty line, at most [`ScanOptions::max_lines`] lines of at most
//!   [`ScanOptions::max_line_bytes`] bytes each (longer lines are cut at a char boundary).
//! - Anything else — other files, symlinks, sockets — is reported as `skipped` and counted.
//! - Files over the size limit, unreadable files and unreadable folders are reported with an
//!   `error`; only an unreadable root folder or an unwritable report fails the scan.
//!
//! Resuming: with [`ScanOptions::resume`] the existing report is read first and every file it
//! names with the same size and mtime is skipped; new lines are appended. Each line is written
//! and flushed as soon as its file is done, so a killed scan loses only the files in flight.

use crate::moderator::Moderator;
use crate::server::protocol::{Action, ImageRef, LabelScore, ModerateRequest, Verdict};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::{BufRead, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};
use tokio::sync::{Semaphore, mpsc};

/// Extensions read as text, one message per line.
const TEXT_EXTENSIONS: &[&str] = &[
    "txt", "text", "md", "markdown", "csv", "tsv", "json", "jsonl", "ndjson", "log", "xml", "html",
    "htm", "yaml", "yml", "srt", "vtt",
];
/// Extensions of the image formats the image stage decodes.
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif"];
/// Deepest folder nesting walked below the root.
const MAX_DEPTH: usize = 256;
/// Lines of one text file moderated at once.
const LINE_CONCURRENCY: usize = 16;
/// Most per-line hits kept in one report line; `hit_lines` still counts them all.
const MAX_HITS_PER_FILE: usize = 1_000;
/// Walked entries buffered ahead of the dispatcher.
const WALK_BUFFER: usize = 1_024;
/// Longest report line read back by `--resume`, in bytes; longer ones are ignored.
const MAX_REPORT_LINE_BYTES: usize = 16 << 20;
/// The request id and user of every scan request.
const SCAN_ID: &str = "scan";

/// Default most lines moderated per text file.
pub const DEFAULT_MAX_LINES: usize = 100_000;
/// Default longest line moderated, in bytes.
pub const DEFAULT_MAX_LINE_BYTES: usize = 4_096;
/// Default largest text file read, in bytes.
pub const DEFAULT_MAX_TEXT_FILE_BYTES: u64 = 16 << 20;

/// What to scan and how.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Folder to scan, walked recursively; symlinks are reported, never followed.
    pub root: PathBuf,
    /// The JSONL report written (or appended to with `resume`).
    pub report: PathBuf,
    /// Files moderated at once (1..).
    pub jobs: usize,
    /// Skip files the report already names (same path, size and mtime) and append to it.
    pub resume: bool,
    /// Policy applied to every file.
    pub policy: String,
    /// Draw a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
    /// Largest text file read, in bytes; larger ones get an error line.
    pub max_text_file_bytes: u64,
    /// Largest image file read, in bytes (normally `image.max_encoded_bytes`).
    pub max_image_file_bytes: u64,
    /// Most lines moderated per text file; the rest are counted, not moderated.
    pub max_lines: usize,
    /// Longest line moderated, in bytes; longer lines are cut at a char boundary.
    pub max_line_bytes: usize,
}

impl ScanOptions {
    /// Options with the default limits.
    pub fn new(root: impl Into<PathBuf>, report: impl Into<PathBuf>) -> ScanOptions {
        ScanOptions {
            root: root.into(),
            report: report.into(),
            jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
            resume: false,
            policy: crate::config::DEFAULT_POLICY.to_string(),
            progress: false,
            max_text_file_bytes: DEFAULT_MAX_TEXT_FILE_BYTES,
            max_image_file_bytes: crate::image::decode::DecodeLimits::default().max_encoded_bytes
                as u64,
            max_lines: DEFAULT_MAX_LINES,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
        }
    }
}

/// Why a scan failed as a whole (problems with single files go in the report instead).
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The root folder cannot be listed.
    #[error("cannot read folder {}: {error}", path.display())]
    Root {
        /// The folder.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The report cannot be opened, read back for `--resume`, or written.
    #[error("cannot write report {} (--out): {error}", path.display())]
    Report {
        /// The report file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// An option is out of range.
    #[error("{0}")]
    Options(String),
}

/// What a report line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// An image file (by magic bytes or extension).
    Image,
    /// A text file, moderated line by line.
    Text,
    /// A file of another type, or not a regular file: skipped.
    Other,
    /// A symbolic link: skipped, never followed.
    Symlink,
    /// A folder that could not be read.
    Dir,
}

/// One flagged line of a text file.
#[derive(Debug, Clone, Serialize)]
pub struct LineHit {
    /// 1-based line number.
    pub line: usize,
    /// The line's verdict.
    pub action: Action,
    /// Its top label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<&'static str>,
    /// The top label's score.
    pub score: f32,
    /// Every label that fired, as `label` or `label/sub`.
    pub labels: Vec<String>,
    /// The wordlist entries that matched (canonical forms, not the line's spelling).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub terms: Vec<String>,
}

/// One line of the JSONL report.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    /// Path relative to the scanned folder, `/`-separated.
    pub path: String,
    /// Size in bytes when scanned.
    pub size: u64,
    /// Modification time when scanned, unix milliseconds (0 when unknown).
    pub mtime_ms: u64,
    /// What the file is.
    pub kind: FileKind,
    /// The file's verdict: the image's, or the worst line's; absent for skipped files and
    /// files that could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// Images: the image's labels with their scores. Text: every label that fired on some
    /// line, with its highest score, strongest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<LabelScore>,
    /// Images: the 64-bit perceptual hash (16 hex digits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phash: Option<String>,
    /// Text: lines in the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lines: Option<usize>,
    /// Text: non-empty lines moderated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moderated_lines: Option<usize>,
    /// Text: lines past `max_lines` were not moderated, or some line was cut.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Text: lines whose verdict is not a clean allow (at most 1000 kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hits: Option<Vec<LineHit>>,
    /// Text: how many lines were hits (also those past the 1000 kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hit_lines: Option<usize>,
    /// Stages that could not run for this file (e.g. `image_model`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<&'static str>,
    /// Why the file was skipped (kind `other` or `symlink`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<&'static str>,
    /// Why the file could not be judged (unreadable, too large, corrupt image).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Time spent on the file, in milliseconds.
    pub took_ms: u64,
}

impl FileReport {
    fn new(entry: &Entry, kind: FileKind) -> FileReport {
        FileReport {
            path: entry.rel.clone(),
            size: entry.size,
            mtime_ms: entry.mtime_ms,
            kind,
            action: None,
            labels: Vec::new(),
            phash: None,
            lines: None,
            moderated_lines: None,
            truncated: false,
            hits: None,
            hit_lines: None,
            degraded: Vec::new(),
            skipped: None,
            error: None,
            took_ms: 0,
        }
    }

    fn error(entry: &Entry, kind: FileKind, error: String) -> FileReport {
        FileReport {
            error: Some(error),
            ..FileReport::new(entry, kind)
        }
    }
}

/// Files per outcome for one kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindCounts {
    /// Verdict `allow`.
    pub allow: u64,
    /// Verdict `review`.
    pub review: u64,
    /// Verdict `block`.
    pub block: u64,
    /// Not judged: the line has an `error`.
    pub error: u64,
}

impl KindCounts {
    fn total(&self) -> u64 {
        self.allow + self.review + self.block + self.error
    }
}

/// What a scan did.
#[derive(Debug, Clone, Default)]
pub struct ScanSummary {
    /// Image files by outcome.
    pub images: KindCounts,
    /// Text files by outcome.
    pub texts: KindCounts,
    /// Files skipped as neither image nor text (or not regular files).
    pub skipped_other: u64,
    /// Symlinks skipped.
    pub skipped_symlinks: u64,
    /// Folders that could not be read.
    pub dir_errors: u64,
    /// Files already in the report (`--resume`), not scanned again.
    pub resumed: u64,
    /// Wall-clock time of the scan.
    pub elapsed: Duration,
    /// The report file.
    pub report: PathBuf,
}

impl ScanSummary {
    /// Image and text files judged or failed in this run.
    pub fn scanned(&self) -> u64 {
        self.images.total() + self.texts.total()
    }

    /// Report lines with an `error`.
    pub fn errors(&self) -> u64 {
        self.images.error + self.texts.error + self.dir_errors
    }

    fn count(&mut self, line: &FileReport) {
        let counts = match line.kind {
            FileKind::Image => &mut self.images,
            FileKind::Text => &mut self.texts,
            FileKind::Other => return self.skipped_other += 1,
            FileKind::Symlink => return self.skipped_symlinks += 1,
            FileKind::Dir => return self.dir_errors += 1,
        };
        match (&line.error, line.action) {
            (Some(_), _) | (None, None) => counts.error += 1,
            (None, Some(Action::Allow)) => counts.allow += 1,
            (None, Some(Action::Review)) => counts.review += 1,
            (None, Some(Action::Block)) => counts.block += 1,
        }
    }
}

impl fmt::Display for ScanSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "kind", "allow", "review", "block", "error", "total"
        )?;
        let mut all = KindCounts::default();
        for (name, c) in [("image", &self.images), ("text", &self.texts)] {
            writeln!(
                f,
                "{name:<8} {:>8} {:>8} {:>8} {:>8} {:>8}",
                c.allow,
                c.review,
                c.block,
                c.error,
                c.total()
            )?;
            all.allow += c.allow;
            all.review += c.review;
            all.block += c.block;
            all.error += c.error;
        }
        writeln!(
            f,
            "{:<8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "all",
            all.allow,
            all.review,
            all.block,
            all.error,
            all.total()
        )?;
        writeln!(
            f,
            "skipped: {} (other types {}, symlinks {}); already in report: {}; errors: {} \
             (unreadable folders {})",
            self.skipped_other + self.skipped_symlinks,
            self.skipped_other,
            self.skipped_symlinks,
            self.resumed,
            self.errors(),
            self.dir_errors
        )?;
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.scanned() as f64 / secs
        } else {
            0.0
        };
        write!(
            f,
            "elapsed: {secs:.2} s, {rate:.1} files/s; report: {}",
            self.report.display()
        )
    }
}

/// A walked entry.
#[derive(Debug)]
struct Entry {
    /// Path relative to the root, `/`-separated; the report's `path`.
    rel: String,
    /// Where to read it.
    abs: PathBuf,
    /// Size in bytes (0 for non-files).
    size: u64,
    /// Modification time, unix ms.
    mtime_ms: u64,
    /// What the walk already knows.
    what: Walked,
}

#[derive(Debug)]
enum Walked {
    /// A regular file, to scan.
    File,
    /// Reported without reading: kind, and a skip reason or an error.
    Report(FileKind, Result<&'static str, String>),
}

/// Scans `opts.root` with `moderator`, writing the report; returns the counts. Fails only when
/// the root cannot be listed or the report cannot be written.
pub async fn run(moderator: Moderator, opts: ScanOptions) -> Result<ScanSummary, ScanError> {
    let started = Instant::now();
    if opts.jobs == 0 || opts.max_lines == 0 || opts.max_line_bytes == 0 {
        return Err(ScanError::Options(
            "--jobs, --max-lines and --max-line-bytes must be at least 1".into(),
        ));
    }
    let root_err = |error| ScanError::Root {
        path: opts.root.clone(),
        error,
    };
    let root = std::fs::canonicalize(&opts.root).map_err(root_err)?;
    std::fs::read_dir(&root).map_err(root_err)?;
    let report_err = |error| ScanError::Report {
        path: opts.report.clone(),
        error,
    };
    let (file, done) = open_report(&opts.report, opts.resume).map_err(report_err)?;
    // Never scan our own report when it lies inside the folder.
    let report_abs = std::fs::canonicalize(&opts.report).ok();

    let bar = progress_bar(opts.progress);
    let (walk_tx, mut walk_rx) = mpsc::channel::<Entry>(WALK_BUFFER);
    let walker = {
        let (root, bar) = (root.clone(), bar.clone());
        tokio::task::spawn_blocking(move || walk(&root, report_abs.as_deref(), &walk_tx, &bar))
    };
    let (result_tx, result_rx) = mpsc::channel::<FileReport>(opts.jobs * 2);
    let writer = {
        let (bar, report) = (bar.clone(), opts.report.clone());
        tokio::task::spawn_blocking(move || write_loop(file, result_rx, &bar, report))
    };

    let ctx = Arc::new(Ctx {
        moderator,
        opts: opts.clone(),
    });
    let jobs = Arc::new(Semaphore::new(opts.jobs));
    let mut resumed = 0;
    while let Some(entry) = walk_rx.recv().await {
        if done.contains(&(entry.rel.clone(), entry.size, entry.mtime_ms)) {
            resumed += 1;
            bar.inc(1);
            continue;
        }
        let Ok(permit) = jobs.clone().acquire_owned().await else {
            break;
        };
        if result_tx.is_closed() {
            // The writer failed; its error is returned below.
            break;
        }
        let (ctx, result_tx) = (ctx.clone(), result_tx.clone());
        tokio::spawn(async move {
            let line = scan_entry(&ctx, entry).await;
            // Fails only when the writer has stopped on an error, reported by `run`.
            let _ = result_tx.send(line).await;
            drop(permit);
        });
    }
    drop(walk_rx);
    drop(result_tx);
    let _ = walker.await;
    let mut summary = writer
        .await
        .map_err(|e| report_err(std::io::Error::other(e.to_string())))?
        .map_err(report_err)?;
    bar.finish_and_clear();
    summary.resumed = resumed;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// What every file task needs.
struct Ctx {
    /// Moderates each image and line.
    moderator: Moderator,
    /// The scan's limits.
    opts: ScanOptions,
}

fn progress_bar(show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    // Draws only when stderr is a terminal.
    let bar =
        indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} files ({rate}) {wide_msg}",
    ) {
        bar.set_style(style.with_key(
            "rate",
            |state: &indicatif::ProgressState, w: &mut dyn fmt::Write| {
                let _ = write!(w, "{:.0} files/s", state.per_sec());
            },
        ));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A file already in the report: (path, size, mtime_ms).
type DoneKey = (String, u64, u64);

/// Opens the report: truncated, or (resume) read back and opened for appending. Returns the
/// file and the (path, size, mtime) of every file already in it.
fn open_report(path: &Path, resume: bool) -> std::io::Result<(std::fs::File, HashSet<DoneKey>)> {
    let mut done = HashSet::new();
    if !resume {
        return Ok((std::fs::File::create(path)?, done));
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    /// The fields `--resume` reads back.
    #[derive(Deserialize)]
    struct Done {
        path: String,
        size: u64,
        mtime_ms: u64,
    }
    let mut reader = std::io::BufReader::new(&mut file);
    let mut buf = Vec::new();
    let mut complete_len = 0u64;
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_REPORT_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        if buf.last() != Some(&b'\n') {
            if n > MAX_REPORT_LINE_BYTES {
                // An overlong line: skip the rest of it.
                let mut rest = Vec::new();
                reader.read_until(b'\n', &mut rest)?;
                complete_len += (n + rest.len()) as u64;
                continue;
            }
            // A line cut short by a killed scan: dropped below, its file is scanned again.
            break;
        }
        complete_len += n as u64;
        if let Ok(d) = serde_json::from_slice::<Done>(&buf) {
            done.insert((d.path, d.size, d.mtime_ms));
        }
    }
    drop(reader);
    if file.seek(std::io::SeekFrom::End(0))? != complete_len {
        file.set_len(complete_len)?;
    }
    Ok((file, done))
}

/// Writes each result as one flushed line and keeps the counts; stops at the first write error.
fn write_loop(
    mut file: std::fs::File,
    mut result_rx: mpsc::Receiver<FileReport>,
    bar: &indicatif::ProgressBar,
    report: PathBuf,
) -> std::io::Result<ScanSummary> {
    let mut summary = ScanSummary {
        report,
        ..ScanSummary::default()
    };
    while let Some(line) = result_rx.blocking_recv() {
        let mut json = crate::server::protocol::to_json(&line);
        json.push('\n');
        file.write_all(json.as_bytes())?;
        file.flush()?;
        summary.count(&line);
        bar.inc(1);
        bar.set_message(line.path);
    }
    Ok(summary)
}

/// Walks `root` depth-first without following symlinks, sending every entry (sorted by name
/// within a folder). Stops early when the receiver is gone.
fn walk(
    root: &Path,
    skip: Option<&Path>,
    walk_tx: &mpsc::Sender<Entry>,
    bar: &indicatif::ProgressBar,
) {
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    let send = |entry: Entry| {
        bar.inc_length(1);
        walk_tx.blocking_send(entry).is_ok()
    };
    while let Some((dir, depth)) = stack.pop() {
        let rel = rel_path(root, &dir);
        let dir_error = |e: String| Entry {
            rel: rel.clone(),
            abs: dir.clone(),
            size: 0,
            mtime_ms: 0,
            what: Walked::Report(FileKind::Dir, Err(e)),
        };
        let entries = match std::fs::read_dir(&dir) {
            Ok(rd) => rd.collect::<Result<Vec<_>, _>>(),
            Err(e) => Err(e),
        };
        let mut entries = match entries {
            Ok(entries) => entries,
            Err(e) => {
                if !send(dir_error(format!("cannot read folder: {e}"))) {
                    return;
                }
                continue;
            }
        };
        entries.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for entry in entries {
            let abs = entry.path();
            if skip == Some(abs.as_path()) {
                continue;
            }
            // `DirEntry::metadata` does not follow symlinks.
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) => {
                    let item = Entry {
                        rel: rel_path(root, &abs),
                        abs,
                        size: 0,
                        mtime_ms: 0,
                        what: Walked::Report(FileKind::Other, Err(format!("cannot stat: {e}"))),
                    };
                    if !send(item) {
                        return;
                    }
                    continue;
                }
            };
            let ft = meta.file_type();
            if ft.is_dir() {
                if depth + 1 > MAX_DEPTH {
                    let e = format!("folder nested deeper than {MAX_DEPTH} levels: not walked");
                    let item = Entry {
                        rel: rel_path(root, &abs),
                        abs,
                        size: 0,
                        mtime_ms: 0,
                        what: Walked::Report(FileKind::Dir, Err(e)),
                    };
                    if !send(item) {
                        return;
                    }
                } else {
                    subdirs.push(abs);
                }
                continue;
            }
            let what = if ft.is_symlink() {
                Walked::Report(FileKind::Symlink, Ok("symlink (not followed)"))
            } else if ft.is_file() {
                Walked::File
            } else {
                Walked::Report(FileKind::Other, Ok("not a regular file"))
            };
            let mtime_ms = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64);
            let item = Entry {
                rel: rel_path(root, &abs),
                abs,
                size: if ft.is_file() { meta.len() } else { 0 },
                mtime_ms,
                what,
            };
            if !send(item) {
                return;
            }
        }
        // Reverse, so the stack pops subfolders in name order.
        stack.extend(subdirs.into_iter().rev().map(|d| (d, depth + 1)));
    }
}

/// `path` relative to `root`, `/`-separated (`.` for the root itself).
fn rel_path(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let parts: Vec<_> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect();
    if parts.is_empty() {
        ".".into()
    } else {
        parts.join("/")
    }
}

/// The kind of a file from its first bytes and its extension; `None`: neither image nor text.
fn detect(path: &Path, head: &[u8]) -> Option<FileKind> {
    if crate::image::decode::ImageFormat::sniff(head).is_some() {
        return Some(FileKind::Image);
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
        Some(FileKind::Image)
    } else if TEXT_EXTENSIONS.contains(&ext.as_str()) {
        Some(FileKind::Text)
    } else {
        None
    }
}

/// What reading a file found.
enum FileRead {
    /// Neither image nor text.
    Skip,
    /// An image's bytes.
    Image(Vec<u8>),
    /// A text file's lines.
    Text(TextLines),
    /// The file's kind (when known) and why it cannot be read.
    Error(FileKind, String),
}

/// Reads a file's head, decides its kind, and reads it whole if it is within its size limit;
/// a text file is split into its lines here, off the async runtime.
fn read_file(path: &Path, opts: &ScanOptions) -> FileRead {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return FileRead::Error(FileKind::Other, format!("cannot open: {e}")),
    };
    let mut head = [0u8; 12];
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return FileRead::Error(FileKind::Other, format!("cannot read: {e}")),
        }
    }
    let Some(kind) = detect(path, &head[..got]) else {
        return FileRead::Skip;
    };
    let limit = match kind {
        FileKind::Image => opts.max_image_file_bytes,
        _ => opts.max_text_file_bytes,
    };
    let mut bytes = head[..got].to_vec();
    if let Err(e) = file
        .take((limit + 1).saturating_sub(got as u64))
        .read_to_end(&mut bytes)
    {
        return FileRead::Error(kind, format!("cannot read: {e}"));
    }
    if bytes.len() as u64 > limit {
        let setting = match kind {
            FileKind::Image => "image.max_encoded_bytes",
            _ => "--max-file-bytes",
        };
        return FileRead::Error(
            kind,
            format!("file is over the {limit}-byte limit ({setting}); not scanned"),
        );
    }
    match kind {
        FileKind::Image => FileRead::Image(bytes),
        _ => FileRead::Text(split_lines(&bytes, opts)),
    }
}

/// Produces the report line of one walked entry.
async fn scan_entry(ctx: &Ctx, entry: Entry) -> FileReport {
    let started = Instant::now();
    let mut line = match &entry.what {
        Walked::Report(kind, Ok(reason)) => FileReport {
            skipped: Some(*reason),
            ..FileReport::new(&entry, *kind)
        },
        Walked::Report(kind, Err(e)) => FileReport::error(&entry, *kind, e.clone()),
        Walked::File
            if entry.size
                > ctx
                    .opts
                    .max_text_file_bytes
                    .max(ctx.opts.max_image_file_bytes) =>
        {
            // Too big for any kind: no need to open it.
            let kind = detect(&entry.abs, &[]).unwrap_or(FileKind::Other);
            if kind == FileKind::Other {
                FileReport {
                    skipped: Some("not an image or text file"),
                    ..FileReport::new(&entry, kind)
                }
            } else {
                FileReport::error(
                    &entry,
                    kind,
                    format!(
                        "file is {} bytes: over the size limit; not scanned",
                        entry.size
                    ),
                )
            }
        }
        Walked::File => {
            let (path, opts) = (entry.abs.clone(), ctx.opts.clone());
            match tokio::task::spawn_blocking(move || read_file(&path, &opts)).await {
                Ok(FileRead::Skip) => FileReport {
                    skipped: Some("not an image or text file"),
                    ..FileReport::new(&entry, FileKind::Other)
                },
                Ok(FileRead::Error(kind, e)) => FileReport::error(&entry, kind, e),
                Ok(FileRead::Image(bytes)) => scan_image(ctx, &entry, bytes).await,
                Ok(FileRead::Text(lines)) => scan_text(ctx, &entry, lines).await,
                Err(e) => FileReport::error(&entry, FileKind::Other, format!("reader failed: {e}")),
            }
        }
    };
    line.took_ms = started.elapsed().as_millis() as u64;
    line
}

fn request(ctx: &Ctx, text: Option<String>, images: Vec<ImageRef>) -> ModerateRequest {
    ModerateRequest {
        id: SCAN_ID.into(),
        user: SCAN_ID.into(),
        room: None,
        to: None,
        policy: Some(ctx.opts.policy.clone()),
        text,
        images,
    }
}

async fn scan_image(ctx: &Ctx, entry: &Entry, bytes: Vec<u8>) -> FileReport {
    let image = ImageRef {
        id: "image".into(),
        data: None,
        binary: Some(Ok(bytes.into())),
    };
    let mut line = FileReport::new(entry, FileKind::Image);
    match ctx
        .moderator
        .moderate(&tenant(), request(ctx, None, vec![image]))
        .await
    {
        Ok(mut verdict) => {
            line.degraded = verdict.degraded;
            match verdict.images.pop() {
                Some(image) if image.error.is_some() => line.error = image.error,
                Some(image) => {
                    line.action = Some(verdict.action);
                    line.labels = image.labels;
                    line.phash = image.phash;
                }
                None => line.error = Some("the image stage gave no result".into()),
            }
        }
        Err(e) => line.error = Some(e.to_string()),
    }
    line
}

fn tenant() -> Arc<str> {
    Arc::from(crate::config::DEFAULT_TENANT)
}

/// A text file split into the lines to moderate (done on the blocking pool).
struct TextLines {
    /// Lines in the file.
    total: usize,
    /// (1-based line number, line cut to `max_line_bytes`) of the non-empty lines, at most
    /// `max_lines`.
    todo: Vec<(usize, String)>,
    /// Some line was cut or left out.
    truncated: bool,
}

fn split_lines(bytes: &[u8], opts: &ScanOptions) -> TextLines {
    let text = String::from_utf8_lossy(bytes);
    let mut out = TextLines {
        total: 0,
        todo: Vec::new(),
        truncated: false,
    };
    for (n, l) in text.lines().enumerate() {
        out.total += 1;
        if l.trim().is_empty() {
            continue;
        }
        if out.todo.len() == opts.max_lines {
            out.truncated = true;
            continue;
        }
        if l.len() > opts.max_line_bytes {
            out.truncated = true;
        }
        out.todo.push((
            n + 1,
            crate::text::normalize::clip(l, opts.max_line_bytes).to_owned(),
        ));
    }
    out
}

async fn scan_text(ctx: &Ctx, entry: &Entry, text: TextLines) -> FileReport {
    let mut line = FileReport::new(entry, FileKind::Text);
    line.truncated = text.truncated;
    line.lines = Some(text.total);
    line.moderated_lines = Some(text.todo.len());
    let todo = text.todo;
    let tenant = tenant();
    let mut verdicts = futures_util::stream::iter(todo)
        .map(|(n, text)| {
            let req = request(ctx, Some(text), Vec::new());
            let tenant = &tenant;
            async move { (n, ctx.moderator.moderate(tenant, req).await) }
        })
        .buffered(LINE_CONCURRENCY);
    let mut worst = Action::Allow;
    let mut labels: BTreeMap<(&'static str, Option<String>), LabelScore> = BTreeMap::new();
    let mut hits = Vec::new();
    let mut hit_lines = 0;
    let mut degraded: Vec<&'static str> = Vec::new();
    while let Some((n, verdict)) = verdicts.next().await {
        let verdict: Verdict = match verdict {
            Ok(v) => v,
            Err(e) => {
                line.error.get_or_insert_with(|| format!("line {n}: {e}"));
                continue;
            }
        };
        worst = worst.max(verdict.action);
        for d in &verdict.degraded {
            if !degraded.contains(d) {
                degraded.push(d);
            }
        }
        for l in &verdict.labels {
            let key = (l.label, l.sub.clone());
            match labels.get_mut(&key) {
                Some(kept) if kept.score >= l.score => {}
                _ => {
                    labels.insert(key, l.clone());
                }
            }
        }
        if verdict.action == Action::Allow
            && verdict.labels.is_empty()
            && verdict.matches.is_empty()
        {
            continue;
        }
        hit_lines += 1;
        if hits.len() < MAX_HITS_PER_FILE {
            let mut terms: Vec<String> = Vec::new();
            for m in &verdict.matches {
                if !terms.iter().any(|t| **t == *m.term) {
                    terms.push(m.term.to_string());
                }
            }
            hits.push(LineHit {
                line: n,
                action: verdict.action,
                label: verdict.label,
                score: verdict.score,
                labels: verdict
                    .labels
                    .iter()
                    .map(|l| match &l.sub {
                        Some(sub) => format!("{}/{sub}", l.label),
                        None => l.label.to_string(),
                    })
                    .collect(),
                terms,
            });
        }
    }
    let mut labels: Vec<LabelScore> = labels.into_values().collect();
    labels.sort_by(|a, b| b.score.total_cmp(&a.score));
    line.action = Some(worst);
    line.labels = labels;
    line.hits = Some(hits);
    line.hit_lines = Some(hit_lines);
    line.degraded = degraded;
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_by_magic_then_extension() {
        let t = |name: &str, head: &[u8]| detect(Path::new(name), head);
        assert_eq!(t("a.bin", b"\x89PNG\r\n\x1a\n"), Some(FileKind::Image));
        assert_eq!(t("a.txt", &[0xFF, 0xD8, 0xFF, 0xE0]), Some(FileKind::Image));
        assert_eq!(t("a", b"RIFF\0\0\0\0WEBPVP8 "), Some(FileKind::Image));
        assert_eq!(t("a", b"GIF89a"), Some(FileKind::Image));
        assert_eq!(t("broken.JPG", b"not a jpeg"), Some(FileKind::Image));
        assert_eq!(t("chat.log", b"hello"), Some(FileKind::Text));
        assert_eq!(t("notes.MD", b""), Some(FileKind::Text));
        assert_eq!(t("blob.bin", &[0, 1, 2, 3]), None);
        assert_eq!(t("noext", b"hello"), None);
    }

    #[test]
    fn rel_paths_are_slash_separated() {
        let root = Path::new("/a/b");
        assert_eq!(rel_path(root, Path::new("/a/b/c/d.txt")), "c/d.txt");
        assert_eq!(rel_path(root, root), ".");
    }

    #[test]
    fn resume_drops_a_cut_last_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.jsonl");
        std::fs::write(
            &path,
            "{\"path\":\"a\",\"size\":1,\"mtime_ms\":2}\nnot json\n{\"path\":\"b\",\"si",
        )
        .expect("write");
        let (_file, done) = open_report(&path, true).expect("open");
        assert_eq!(done.len(), 1);
        assert!(done.contains(&("a".to_string(), 1, 2)));
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.ends_with("not json\n"), "cut line removed: {text:?}");
    }
}
