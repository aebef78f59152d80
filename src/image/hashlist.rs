//! # Perceptual-hash lists
//!
//! Takes the 32×32 grayscale picture [`super::decode`] makes of an image's first frame and gives
//! back its 64-bit DCT perceptual hash ([`PHash`], the `imagehash.phash` algorithm, so hashes
//! made by Python's `imagehash` can be listed too), and matches it by Hamming distance against
//! a blocklist of known-bad images and an allowlist of known-good ones ([`HashLists`]). Called
//! by [`super::ImageStage`] for every image, before the model, and by `chatguard hashlist add`.
//!
//! A pHash survives resizing, re-encoding and mild colour changes (a few bits change);
//! unrelated photos differ in about half of the 64 bits. A crop moves the picture under the
//! hash, so a listed image is stored as its hash plus the hashes of [`CROP_VARIANTS`] (centred,
//! one-sided and corner crops of 4–8 %): a copy cropped by up to ~10 % is then within the
//! match distance of one of them (measured on the sample photos: ≤ 8 bits, while unrelated
//! photos' variants stay ≥ 18 bits apart). Flat, featureless images (solid colours) have no
//! meaningful hash and never match.
//!
//! List files are plain text, one entry a line, `#` starts a comment:
//! ```text
//! # HASH (16 hex digits)  LABEL[/SUB]  [# note]
//! c2924c5532bddfc8 porn            # added by `chatguard hashlist add`
//! 8f3a00c1e2d4b697 gore/known_video_still
//! ```
//! The label must be a taxonomy label ([`crate::policy::LABELS`]); allowlist entries need none.
//! A list file is re-read when it changes (checked at most every [`RELOAD_CHECK_INTERVAL`]),
//! so `chatguard hashlist add` takes effect on a running server; a file that fails to parse
//! keeps the previous list (and logs why). A config reload ([`crate::reload`]) replaces both
//! lists whole (new paths or distance included). Matching is a linear scan (about 1 ns per entry).

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::decode::{Crop, DecodeLimits, HASH_INPUT_PX, decode_with_crops};

/// How often a list file's modification time is checked.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Standard deviation (in grey levels) of the 32×32 picture below which an image is too flat
/// to hash meaningfully.
const MIN_DETAIL_STDDEV: f64 = 2.0;
/// Side of the low-frequency DCT block the hash is made of.
const HASH_SIDE: usize = 8;

const fn crop(left: f32, top: f32, right: f32, bottom: f32) -> Crop {
    Crop {
        left,
        top,
        right,
        bottom,
    }
}

/// The crops of a listed image hashed besides the whole picture, with their names for the list
/// file's notes: centred 4 % and 8 %, 8 % off one side, 6 % off two sides at a corner.
pub const CROP_VARIANTS: [(&str, Crop); 10] = [
    ("crop 4%", crop(0.04, 0.04, 0.04, 0.04)),
    ("crop 8%", crop(0.08, 0.08, 0.08, 0.08)),
    ("crop 8% left", crop(0.08, 0.0, 0.0, 0.0)),
    ("crop 8% top", crop(0.0, 0.08, 0.0, 0.0)),
    ("crop 8% right", crop(0.0, 0.0, 0.08, 0.0)),
    ("crop 8% bottom", crop(0.0, 0.0, 0.0, 0.08)),
    ("crop 6% top-left", crop(0.06, 0.06, 0.0, 0.0)),
    ("crop 6% top-right", crop(0.0, 0.06, 0.06, 0.0)),
    ("crop 6% bottom-left", crop(0.06, 0.0, 0.0, 0.06)),
    ("crop 6% bottom-right", crop(0.0, 0.0, 0.06, 0.06)),
];

/// The hashes a list stores for one image: `(variant name, hash)`, the whole picture first
/// (named `""`), then the [`CROP_VARIANTS`] that are not too flat to hash. Errors say why the
/// image cannot be listed (undecodable, or too flat).
pub fn list_hashes(
    bytes: &[u8],
    limits: &DecodeLimits,
) -> Result<Vec<(&'static str, PHash)>, String> {
    let crops: Vec<Crop> = CROP_VARIANTS.iter().map(|(_, c)| *c).collect();
    let decoded = decode_with_crops(bytes, limits, &crops).map_err(|e| e.to_string())?;
    let whole = phash(&decoded.hash_gray)
        .ok_or_else(|| "image is too flat (almost one colour) for a perceptual hash".to_string())?;
    let mut out = vec![("", whole)];
    for ((name, _), gray) in CROP_VARIANTS.iter().zip(&decoded.hash_gray_crops) {
        if let Some(h) = phash(gray)
            && !out.iter().any(|(_, o)| *o == h)
        {
            out.push((name, h));
        }
    }
    Ok(out)
}

/// A 64-bit perceptual hash. Bit 63 is the top-left DCT coefficient's, row-major, as in
/// `imagehash`'s hex strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PHash(pub u64);

impl PHash {
    /// Number of differing bits.
    pub fn distance(self, other: PHash) -> u32 {
        (self.0 ^ other.0).count_ones()
    }
}

impl fmt::Display for PHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for PHash {
    type Err = String;
    fn from_str(s: &str) -> Result<PHash, String> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("`{s}` is not a 16-digit hex hash"));
        }
        u64::from_str_radix(s, 16)
            .map(PHash)
            .map_err(|e| format!("`{s}`: {e}"))
    }
}

/// The pHash of a [`HASH_INPUT_PX`]² grayscale picture (see [`super::decode::DecodedImage`]):
/// 2-D DCT-II, the 8×8 lowest frequencies, each bit set when its coefficient is above their
/// median. `None` when the picture is too flat to hash, or has the wrong size.
pub fn phash(gray: &[u8]) -> Option<PHash> {
    let n = HASH_INPUT_PX;
    if gray.len() != n * n {
        return None;
    }
    let mean = gray.iter().map(|&v| f64::from(v)).sum::<f64>() / (n * n) as f64;
    let var = gray
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / (n * n) as f64;
    if var.sqrt() < MIN_DETAIL_STDDEV {
        return None;
    }
    // cos[k][i] = cos(π k (2i + 1) / 2n), the (unscaled) DCT-II basis; scaling does not change
    // which coefficients are above the median.
    let mut cos = [[0f64; HASH_INPUT_PX]; HASH_SIDE];
    for (k, row) in cos.iter_mut().enumerate() {
        for (i, c) in row.iter_mut().enumerate() {
            *c = (std::f64::consts::PI * k as f64 * (2 * i + 1) as f64 / (2 * n) as f64).cos();
        }
    }
    // Along columns (axis 0) first, keeping the 8 lowest rows, then along rows.
    let mut cols = [[0f64; HASH_INPUT_PX]; HASH_SIDE];
    for (k, out) in cols.iter_mut().enumerate() {
        for (x, o) in out.iter_mut().enumerate() {
            *o = (0..n).map(|y| f64::from(gray[y * n + x]) * cos[k][y]).sum();
        }
    }
    let mut low = [0f64; HASH_SIDE * HASH_SIDE];
    for (k, row) in cols.iter().enumerate() {
        for l in 0..HASH_SIDE {
            low[k * HASH_SIDE + l] = row.iter().zip(&cos[l]).map(|(v, c)| v * c).sum();
        }
    }
    let mut sorted = low;
    sorted.sort_by(f64::total_cmp);
    let median = (sorted[31] + sorted[32]) / 2.0;
    let bits = low
        .iter()
        .fold(0u64, |acc, &v| (acc << 1) | u64::from(v > median));
    Some(PHash(bits))
}

/// Why a list could not be loaded or written.
#[derive(Debug, thiserror::Error)]
pub enum HashListError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The list file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("{path}:{line}: {reason}")]
    Parse {
        /// The list file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// One listed hash.
#[derive(Debug, Clone, PartialEq)]
pub struct HashEntry {
    /// The hash.
    pub hash: PHash,
    /// Taxonomy label reported on a match (blocklist; `other` when an allowlist line has none).
    pub label: &'static str,
    /// Finer label, if the line gave one (`porn/known_set` → `known_set`).
    pub sub: Option<String>,
}

/// A parsed list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HashList {
    /// Entries in file order.
    entries: Vec<HashEntry>,
}

impl HashList {
    /// Parses list text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<HashList, HashListError> {
        let mut entries = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |reason: String| HashListError::Parse {
                path: path.to_path_buf(),
                line: n + 1,
                reason,
            };
            let mut fields = line.split_whitespace();
            let hash: PHash = fields.next().unwrap_or("").parse().map_err(bad)?;
            let (label, sub) = match fields.next() {
                None => ("other", None),
                Some(spec) => parse_label(spec).map_err(bad)?,
            };
            if let Some(extra) = fields.next() {
                return Err(bad(format!(
                    "unexpected `{extra}` (expected `HASH LABEL[/SUB] [# note]`)"
                )));
            }
            entries.push(HashEntry { hash, label, sub });
        }
        Ok(HashList { entries })
    }

    /// Reads and parses a list file.
    pub fn load(path: &Path) -> Result<HashList, HashListError> {
        let text = std::fs::read_to_string(path).map_err(|source| HashListError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        HashList::parse(&text, path)
    }

    /// The closest entry within `max_distance` bits, with its distance.
    pub fn nearest(&self, hash: PHash, max_distance: u32) -> Option<(&HashEntry, u32)> {
        self.entries
            .iter()
            .map(|e| (e, e.hash.distance(hash)))
            .filter(|&(_, d)| d <= max_distance)
            .min_by_key(|&(_, d)| d)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the list has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Parses `LABEL[/SUB]`; the label must be in the taxonomy.
pub fn parse_label(spec: &str) -> Result<(&'static str, Option<String>), String> {
    let (label, sub) = match spec.split_once('/') {
        Some((l, s)) if !s.is_empty() => (l, Some(s.to_string())),
        Some((l, _)) => (l, None),
        None => (spec, None),
    };
    Ok((crate::policy::find_label(label)?, sub))
}

/// Appends an entry to a list file, creating it (with a header comment) if needed.
pub fn append_entry(
    path: &Path,
    hash: PHash,
    label: &str,
    note: &str,
) -> Result<(), HashListError> {
    let io = |source| HashListError::Io {
        path: path.to_path_buf(),
        source,
    };
    let exists = path.exists();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    if !exists {
        writeln!(
            file,
            "# chatguard image hash list: HASH (16 hex digits)  LABEL[/SUB]  [# note]"
        )
        .map_err(io)?;
    }
    let note = note.replace(['\n', '\r'], " ");
    let line = if note.is_empty() {
        format!("{hash} {label}")
    } else {
        format!("{hash} {label}  # {note}")
    };
    writeln!(file, "{line}").map_err(io)
}

/// A list backed by an optional file, re-read when the file changes.
#[derive(Debug)]
struct ListFile {
    /// The file; `None` means an always-empty list.
    path: Option<PathBuf>,
    /// The list and what is known about the file it came from.
    state: Mutex<ListState>,
}

#[derive(Debug)]
struct ListState {
    /// The current list.
    list: std::sync::Arc<HashList>,
    /// Modification time and size of the file when it was read.
    stamp: Option<(SystemTime, u64)>,
    /// When the file was last looked at.
    checked: Instant,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl ListFile {
    fn open(path: Option<&Path>) -> Result<ListFile, HashListError> {
        let (list, stamp) = match path {
            Some(p) => (HashList::load(p)?, stamp(p)),
            None => (HashList::default(), None),
        };
        Ok(ListFile {
            path: path.map(Path::to_path_buf),
            state: Mutex::new(ListState {
                list: std::sync::Arc::new(list),
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    /// The current list, re-read first if the file changed.
    fn current(&self) -> std::sync::Arc<HashList> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(path) = &self.path
            && state.checked.elapsed() >= RELOAD_CHECK_INTERVAL
        {
            state.checked = Instant::now();
            let now = stamp(path);
            if now != state.stamp {
                match HashList::load(path) {
                    Ok(list) => {
                        tracing::info!(path = %path.display(), entries = list.len(), "image hash list reloaded");
                        state.list = std::sync::Arc::new(list);
                        state.stamp = now;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "image hash list not reloaded; keeping the previous one");
                        state.stamp = now;
                    }
                }
            }
        }
        state.list.clone()
    }
}

/// What the lists say about one hash.
#[derive(Debug, Clone, PartialEq)]
pub enum ListMatch {
    /// Close to a blocklisted image.
    Blocked {
        /// The matching entry.
        entry: HashEntry,
        /// Differing bits.
        distance: u32,
    },
    /// Close to an allowlisted image (and to no blocklisted one).
    Allowed {
        /// Differing bits.
        distance: u32,
    },
}

/// The blocklist and the allowlist, with the match distance.
#[derive(Debug)]
pub struct HashLists {
    /// Known-bad images.
    block: ListFile,
    /// Known-good images (skip the model, allow).
    allow: ListFile,
    /// Largest Hamming distance that counts as the same image.
    max_distance: u32,
}

impl HashLists {
    /// Loads both lists (either may be absent).
    pub fn open(
        blocklist: Option<&Path>,
        allowlist: Option<&Path>,
        max_distance: u32,
    ) -> Result<HashLists, HashListError> {
        Ok(HashLists {
            block: ListFile::open(blocklist)?,
            allow: ListFile::open(allowlist)?,
            max_distance,
        })
    }

    /// Empty lists.
    pub fn empty() -> HashLists {
        let empty = || ListFile {
            path: None,
            state: Mutex::new(ListState {
                list: std::sync::Arc::new(HashList::default()),
                stamp: None,
                checked: Instant::now(),
            }),
        };
        HashLists {
            block: empty(),
            allow: empty(),
            max_distance: 0,
        }
    }

    /// Checks a hash: the blocklist wins over the allowlist.
    pub fn check(&self, hash: PHash) -> Option<ListMatch> {
        if let Some((entry, distance)) = self.block.current().nearest(hash, self.max_distance) {
            return Some(ListMatch::Blocked {
                entry: entry.clone(),
                distance,
            });
        }
        self.allow
            .current()
            .nearest(hash, self.max_distance)
            .map(|(_, distance)| ListMatch::Allowed { distance })
    }

    /// Entries in (blocklist, allowlist).
    pub fn len(&self) -> (usize, usize) {
        (self.block.current().len(), self.allow.current().len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_and_rejects_bad_ones() {
        let text = "# header\n\nc2924c5532bddfc8 porn # note\n8f3a00c1e2d4b697 gore/still\nffffffffffffffff\n";
        let list = HashList::parse(text, Path::new("x")).expect("valid");
        assert_eq!(list.len(), 3);
        assert_eq!(list.entries[1].sub.as_deref(), Some("still"));
        assert_eq!(list.entries[2].label, "other");
        for bad in [
            "c2924c55 porn",
            "c2924c5532bddfc8 nonsense",
            "c2924c5532bddfc8 porn extra",
        ] {
            let err = HashList::parse(bad, Path::new("x"))
                .expect_err(bad)
                .to_string();
            assert!(err.starts_with("x:1:"), "{err}");
        }
    }

    #[test]
    fn nearest_within_distance() {
        let list = HashList::parse("00000000000000ff porn\n", Path::new("x")).expect("valid");
        assert!(list.nearest(PHash(0x00000000000000fe), 1).is_some());
        assert!(list.nearest(PHash(0x0000000000000000), 7).is_none());
        assert_eq!(PHash(0x0f).to_string(), "000000000000000f");
    }

    #[test]
    fn flat_pictures_have_no_hash() {
        assert_eq!(phash(&[128u8; 1024]), None);
        let ramp: Vec<u8> = (0..1024).map(|i| (i % 32 * 8) as u8).collect();
        assert!(phash(&ramp).is_some());
    }
}
