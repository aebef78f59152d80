//! # Keyword lexicon
//!
//! Takes the text of a message and gives back the wordlist [`Match`]es in it, located in the
//! ORIGINAL text (byte and char offsets). Called by the moderator for every message; built once
//! at startup from the wordlists compiled into the binary ([`Lexicon::embedded`]) or from a
//! directory with the same layout ([`Lexicon::from_dir`]).
//!
//! How it matches: the text is folded by [`super::normalize`]; aho-corasick DFAs over the
//! folded entries (one for plain letters, and ones for `*`-censored variants, digits and
//! non-ASCII entries that only run when the text holds such chars) report every
//! (overlapping) occurrence; each occurrence is then checked
//! against its entry's word-boundary rule (whole word unless the entry says `*`; unspaced
//! scripts such as Chinese match anywhere) and run lengths (`fuuuck` matches `fuck`, `as`
//! does not match `ass`). Occurrences inside an allowlist match (`cumulative`, `shiitake`) are
//! dropped. The file format is documented in `wordlists/README.md`.

use super::normalize::{
    HAS_DIGIT, HAS_NON_ASCII, HAS_STAR, MAX_TEXT_BYTES, Normalized, is_unspaced,
};
use super::{Match, Severity};
use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::dfa::DFA;
use aho_corasick::{Anchored, MatchKind, StartKind};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use wide::u8x16;

/// The wordlists compiled into the binary: path under `wordlists/` and contents.
const EMBEDDED: &[(&str, &str)] = &[
    (
        "en/profanity.txt",
        include_str!("../../wordlists/en/profanity.txt"),
    ),
    (
        "en/insult.txt",
        include_str!("../../wordlists/en/insult.txt"),
    ),
    (
        "en/sexual.txt",
        include_str!("../../wordlists/en/sexual.txt"),
    ),
    ("en/hate.txt", include_str!("../../wordlists/en/hate.txt")),
    (
        "en/threat.txt",
        include_str!("../../wordlists/en/threat.txt"),
    ),
    (
        "en/self_harm.txt",
        include_str!("../../wordlists/en/self_harm.txt"),
    ),
    ("en/scam.txt", include_str!("../../wordlists/en/scam.txt")),
    ("en/allow.txt", include_str!("../../wordlists/en/allow.txt")),
    (
        "zh/profanity.txt",
        include_str!("../../wordlists/zh/profanity.txt"),
    ),
    (
        "zh/insult.txt",
        include_str!("../../wordlists/zh/insult.txt"),
    ),
    (
        "zh/sexual.txt",
        include_str!("../../wordlists/zh/sexual.txt"),
    ),
    ("zh/scam.txt", include_str!("../../wordlists/zh/scam.txt")),
];

/// The file stem (category) of allowlist files.
const ALLOW: &str = "allow";

/// Categories whose self-censored variants (`f*ck`) win when two entries give the same
/// variant; the rest follow in name order.
const PRIORITY: &[&str] = &[
    "profanity",
    "insult",
    "sexual",
    "hate",
    "threat",
    "self_harm",
    "scam",
];

/// Why a lexicon could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LexiconError {
    /// A bad line in a wordlist file.
    #[error("{file}:{line}: {reason}")]
    Entry {
        /// The file (path under the wordlist directory, or `<extra>`).
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A wordlist file or directory could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The directory holds no `*.txt` wordlist.
    #[error("no wordlist files (*.txt) in {0}")]
    Empty(PathBuf),
    /// A category name that is not `[a-z0-9_]+`.
    #[error("bad category name {0:?} (use lowercase letters, digits and `_`)")]
    Category(String),
    /// The automaton could not be built (too large).
    #[error("building the keyword automaton: {0}")]
    Build(#[from] aho_corasick::BuildError),
}

/// The compiled wordlists. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Lexicon {
    /// Shared, immutable state.
    inner: Arc<Inner>,
}

struct Inner {
    /// DFA over the ASCII patterns (entries, joined phrases, censored variants), searched
    /// overlapping so that no occurrence hides another. Kept apart from the non-ASCII
    /// patterns so its alphabet (byte classes) and table stay small.
    latin: Option<Searcher>,
    /// Anchored DFA over the ASCII patterns whose every entry must start at a word start:
    /// walked only from word starts and from inside chains (the only places where such an
    /// occurrence can pass [`bounds_ok`]), so most of the text is never stepped through.
    words: Option<Searcher>,
    /// DFA over the self-censored variants (`f*ck`); run only on text holding a `*`.
    censored: Option<Searcher>,
    /// DFA over the ASCII patterns holding digits (`1488`); run only on text holding a digit.
    /// With `*` and digits elsewhere, `latin` has at most 32 byte classes (letters, space,
    /// the rest), so its rows are half as wide.
    digits: Option<Searcher>,
    /// DFA over the patterns with non-ASCII chars (CJK...); run only on non-ASCII text.
    other: Option<Searcher>,
    /// Per pattern id: the range of `cands` to check.
    pattern_cands: Vec<(u32, u32)>,
    /// Candidate entries per pattern, grouped by pattern, with what [`Inner::check`] needs
    /// inline.
    cands: Vec<Check>,
    /// The run lengths of every candidate, one after another ([`Check::runs`]).
    runs: Vec<u8>,
    /// Every entry, allowlist ones included.
    entries: Vec<Entry>,
    /// The lines it was built from, to rebuild with extras.
    sources: Vec<Source>,
    /// Number of blocking (non-allowlist) entries.
    blocking: usize,
}

/// One wordlist entry.
struct Entry {
    /// The folded entry without `*` markers, runs spelled out (`ass`, not `as`).
    term: Arc<str>,
    /// Its category (file stem).
    category: Arc<str>,
    /// Optional finer label.
    sub: Option<Arc<str>>,
    /// Its severity (meaningless for allowlist entries).
    severity: Severity,
    /// Whether it is an allowlist entry.
    allow: bool,
    /// Whether the match must start at a word start.
    bound_start: bool,
    /// Whether the match must end at a word end.
    bound_end: bool,
    /// Whether a match is widened to the start of its word (for masking).
    extend_start: bool,
    /// Whether a match is widened to the end of its word.
    extend_end: bool,
}

/// One entry a pattern may stand for.
struct Cand {
    /// Index into `entries`.
    entry: u32,
    /// Run length per char of the pattern (see [`runs_ok`]).
    runs: Box<[u8]>,
}

/// One entry a pattern may stand for, as [`Inner::check`] reads it: the entry's bounds
/// inline and its runs in one shared array, so that a check touches no `Entry` and no
/// separate allocation (every pointer followed there was a cache miss).
struct Check {
    /// Index into `entries`.
    entry: u32,
    /// Range of `Inner::runs`: run length per char of the pattern (see [`runs_ok`]).
    runs: (u32, u32),
    /// The entry's [`Entry::bound_start`], [`Entry::bound_end`] and [`Entry::allow`].
    bound_start: bool,
    bound_end: bool,
    allow: bool,
}

/// What each match state of an anchored DFA finds, in flat arrays: per state, the patterns
/// that end there as (length, range of `Inner::cands`). The DFA's own answer takes a
/// pointer per state (its match lists are separate allocations) and a lookup per pattern,
/// each a likely cache miss for a walk that just reached the state.
struct MatchTable {
    /// `sid >> shift` minus 2 is the state's index (the DFA's match states come first, after
    /// the dead and fail states; its state IDs are premultiplied by a power of two).
    shift: u32,
    /// Per index: its range of `list`.
    states: Box<[(u32, u32)]>,
    /// (pattern length, candidates from, to).
    list: Box<[(u32, u32, u32)]>,
}

impl MatchTable {
    /// The table of the anchored `dfa` whose pattern ids map to `cands`, or `None` when its
    /// state IDs do not look as expected (then the DFA's own answer is used). `bytes`: one
    /// byte of each kind the DFA tells apart (the patterns' bytes and one other).
    fn new(dfa: &DFA, cands: &[(u32, u32)], bytes: &[u8]) -> Option<MatchTable> {
        // Every state a walk may reach.
        let start = dfa.start_state(Anchored::Yes).ok()?;
        let mut seen = std::collections::HashSet::from([start.as_u32()]);
        let mut queue = vec![start];
        while let Some(sid) = queue.pop() {
            for &b in bytes {
                let next = dfa.next_state(Anchored::Yes, sid, b);
                if !dfa.is_dead(next) && seen.insert(next.as_u32()) {
                    queue.push(next);
                }
            }
        }
        let stride = seen.iter().fold(0u32, |g, &id| gcd(g, id));
        if !stride.is_power_of_two() {
            return None;
        }
        let shift = stride.trailing_zeros();
        let mut found: Vec<(usize, StateID)> = Vec::new();
        for &id in &seen {
            let sid = StateID::new(id as usize).ok()?;
            if dfa.is_match(sid) {
                found.push(((id >> shift).checked_sub(2)? as usize, sid));
            }
        }
        found.sort_unstable_by_key(|&(index, _)| index);
        if found.windows(2).any(|w| w[0].0 == w[1].0) {
            // Two states, one index: not the layout expected.
            return None;
        }
        let len = found.last().map_or(0, |&(index, _)| index + 1);
        let mut states = vec![(0u32, 0u32); len];
        let mut list = Vec::new();
        for (index, sid) in found {
            let from = list.len() as u32;
            for k in 0..dfa.match_len(sid) {
                let pid = dfa.match_pattern(sid, k);
                let (a, b) = cands[pid.as_usize()];
                list.push((dfa.pattern_len(pid) as u32, a, b));
            }
            states[index] = (from, list.len() as u32);
        }
        Some(MatchTable {
            shift,
            states: states.into_boxed_slice(),
            list: list.into_boxed_slice(),
        })
    }

    /// What the match state `sid` finds.
    #[inline]
    fn at(&self, sid: StateID) -> &[(u32, u32, u32)] {
        let (from, to) = self.states[(sid.as_usize() >> self.shift) - 2];
        &self.list[from as usize..to as usize]
    }
}

/// Greatest common divisor.
fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Lexicons built and possibly still in use, by the hash of their sources (see
/// [`Lexicon::build`]). Weak: an automaton nobody uses any more is freed, and its slot dropped
/// at the next build.
static BUILT: Mutex<Vec<(u64, Weak<Inner>)>> = Mutex::new(Vec::new());

/// One line of a wordlist file.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Source {
    /// File name for error messages.
    file: Arc<str>,
    /// 1-based line number.
    line: usize,
    /// The line.
    text: Box<str>,
    /// The category it belongs to.
    category: Arc<str>,
}

/// Reusable buffers for [`Lexicon::scan_into`]; keep one per thread.
#[derive(Default)]
pub struct Scratch {
    /// The folded message.
    norm: Normalized,
    /// Occurrences that passed the boundary and run checks: folded range and entry.
    raw: Vec<(usize, usize, u32)>,
    /// Folded ranges of allowlist matches.
    allow: Vec<(usize, usize)>,
    /// Per category: furthest match end so far (dedup in `finish`).
    reach: Vec<(usize, usize)>,
}

impl std::fmt::Debug for Lexicon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lexicon")
            .field("entries", &self.inner.blocking)
            .field(
                "dfa_bytes",
                &[
                    self.inner.latin.as_ref(),
                    self.inner.words.as_ref(),
                    self.inner.censored.as_ref(),
                    self.inner.digits.as_ref(),
                    self.inner.other.as_ref(),
                ]
                .map(|s| s.map_or(0, |s| s.dfa.memory_usage())),
            )
            .field("allow", &(self.inner.entries.len() - self.inner.blocking))
            .field("patterns", &self.inner.pattern_cands.len())
            .finish()
    }
}

impl Lexicon {
    /// The wordlists compiled into the binary (`wordlists/`). Built once per process and
    /// shared.
    pub fn embedded() -> Result<Lexicon, LexiconError> {
        static EMBEDDED_LEXICON: OnceLock<Lexicon> = OnceLock::new();
        if let Some(lex) = EMBEDDED_LEXICON.get() {
            return Ok(lex.clone());
        }
        let mut sources = Vec::new();
        for (path, contents) in EMBEDDED {
            add_file(&mut sources, path, contents)?;
        }
        let lex = Lexicon::build(sources)?;
        Ok(EMBEDDED_LEXICON.get_or_init(|| lex).clone())
    }

    /// Wordlists from a directory laid out like `wordlists/`: `LANG/CATEGORY.txt` (or
    /// `CATEGORY.txt` at the top), `allow.txt` for allowlists. Other files are ignored.
    pub fn from_dir(dir: &Path) -> Result<Lexicon, LexiconError> {
        let mut sources = Vec::new();
        add_dir(&mut sources, dir, None)?;
        Lexicon::build(sources)
    }

    /// The wordlist files [`Lexicon::from_dir`] reads from `dir`, in the order it reads them
    /// (for watching them for changes).
    pub fn dir_files(dir: &Path) -> Result<Vec<PathBuf>, LexiconError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LexiconError::Io { path, source }
        };
        let mut files = Vec::new();
        for entry in read_dir_sorted(dir).map_err(io(dir))? {
            if entry.is_dir() {
                for sub in read_dir_sorted(&entry).map_err(io(&entry))? {
                    if is_wordlist(&sub) {
                        files.push(sub);
                    }
                }
            } else if is_wordlist(&entry) {
                files.push(entry);
            }
        }
        if files.is_empty() {
            return Err(LexiconError::Empty(dir.to_path_buf()));
        }
        Ok(files)
    }

    /// This lexicon plus more wordlists and allowlist terms (a policy's `wordlists` and
    /// `allow`): each path is a wordlist file (`CATEGORY.txt`, same format as `wordlists/`)
    /// or a directory laid out like `wordlists/`; errors name the file and line.
    pub fn with_wordlists(
        &self,
        paths: &[PathBuf],
        allow: &[String],
    ) -> Result<Lexicon, LexiconError> {
        let mut sources = self.inner.sources.clone();
        for path in paths {
            if path.is_dir() {
                add_dir(&mut sources, path, Some(path))?;
            } else {
                let contents =
                    std::fs::read_to_string(path).map_err(|source| LexiconError::Io {
                        path: path.clone(),
                        source,
                    })?;
                add_file(&mut sources, &path.to_string_lossy(), &contents)?;
            }
        }
        let file: Arc<str> = Arc::from("<allow>");
        let category: Arc<str> = Arc::from(ALLOW);
        for (i, term) in allow.iter().enumerate() {
            sources.push(Source {
                file: file.clone(),
                line: i + 1,
                text: term.as_str().into(),
                category: category.clone(),
            });
        }
        Lexicon::build(sources)
    }

    /// This lexicon plus extra entries: `(line in file syntax, category)`; category `allow`
    /// adds to the allowlist.
    pub fn with_extra(&self, terms: &[(String, String)]) -> Result<Lexicon, LexiconError> {
        let mut sources = self.inner.sources.clone();
        let file: Arc<str> = Arc::from("<extra>");
        for (i, (text, category)) in terms.iter().enumerate() {
            check_category(category)?;
            sources.push(Source {
                file: file.clone(),
                line: i + 1,
                text: text.as_str().into(),
                category: Arc::from(category.as_str()),
            });
        }
        Lexicon::build(sources)
    }

    /// Number of blocking entries (allowlist entries and generated variants not counted).
    pub fn len(&self) -> usize {
        self.inner.blocking
    }

    /// Whether there are no blocking entries.
    pub fn is_empty(&self) -> bool {
        self.inner.blocking == 0
    }

    /// Number of allowlist entries.
    pub fn allow_len(&self) -> usize {
        self.inner.entries.len() - self.inner.blocking
    }

    /// Blocking entries per category, in name order.
    pub fn categories(&self) -> Vec<(Arc<str>, usize)> {
        let mut counts: Vec<(Arc<str>, usize)> = Vec::new();
        for e in self.inner.entries.iter().filter(|e| !e.allow) {
            match counts.iter_mut().find(|(c, _)| *c == e.category) {
                Some((_, n)) => *n += 1,
                None => counts.push((e.category.clone(), 1)),
            }
        }
        counts.sort();
        counts
    }

    /// The matches in `text` (see [`Lexicon::scan_into`]).
    pub fn scan(&self, text: &str) -> Vec<Match> {
        let mut out = Vec::new();
        self.scan_into(text, &mut Scratch::default(), &mut out);
        out
    }

    /// Clears `out` and fills it with the matches in `text`, sorted by `start`; a match
    /// covered by a longer (or equal, earlier-listed) match of the same category is left out.
    /// Reuses `scratch`, so a warm call allocates nothing but the pushed matches.
    pub fn scan_into(&self, text: &str, scratch: &mut Scratch, out: &mut Vec<Match>) {
        out.clear();
        let mut offset = 0;
        while offset < text.len() {
            let rest = &text[offset..];
            let mut len = rest.len().min(MAX_TEXT_BYTES);
            while !rest.is_char_boundary(len) {
                len -= 1;
            }
            self.scan_chunk(&rest[..len], offset, scratch, out);
            offset += len;
        }
        finish(text, out, &mut scratch.reach);
    }

    fn scan_chunk(&self, text: &str, offset: usize, scratch: &mut Scratch, out: &mut Vec<Match>) {
        let inner = &*self.inner;
        // Most texts match nothing: fold without the offset map, and map only when needed.
        scratch.norm.set_lazy(text);
        scratch.raw.clear();
        scratch.allow.clear();
        let norm = &scratch.norm;
        let bytes = norm.as_bytes();
        let runs = norm.runs();
        let chains = norm.chains();
        let (raw, allow) = (&mut scratch.raw, &mut scratch.allow);
        if let Some(words) = &inner.words {
            inner.search_words(words, norm.spaces(), bytes, runs, chains, raw, allow);
        }
        if let Some(latin) = &inner.latin
            && latin.may_occur(norm.padded_bytes(), bytes.len())
        {
            inner.search(latin, bytes, runs, chains, raw, allow);
        }
        let gated = [
            (&inner.censored, HAS_STAR),
            (&inner.digits, HAS_DIGIT),
            (&inner.other, HAS_NON_ASCII),
        ];
        for (searcher, bit) in gated {
            if let Some(searcher) = searcher
                && norm.has() & bit != 0
            {
                inner.search(searcher, bytes, runs, chains, raw, allow);
            }
        }
        // A blocking occurrence inside an allowlisted one does not count.
        let allowed = |s: usize, e: usize| scratch.allow.iter().any(|&(a, b)| a <= s && e <= b);
        if scratch.raw.iter().all(|&(s, e, _)| allowed(s, e)) {
            return;
        }
        if !scratch.norm.is_mapped() {
            // The same folded text again, this time with the offset map, as far as the end
            // of the word of the last match (matches widen to whole words).
            let bytes = scratch.norm.as_bytes();
            let last = scratch.raw.iter().filter(|&&(s, e, _)| !allowed(s, e));
            let mut upto = last.map(|&(_, e, _)| e).max().unwrap_or(0);
            while upto < bytes.len() && bytes[upto] != b' ' {
                upto += 1;
            }
            scratch.norm.set_mapped_to(text, upto);
        }
        let norm = &scratch.norm;
        let bytes = norm.as_bytes();
        for &(s, e, idx) in &scratch.raw {
            if allowed(s, e) {
                continue;
            }
            let entry = &inner.entries[idx as usize];
            let (mut s, mut e) = (s, e);
            // Widen to the whole word, but not leftwards into a chain (`a f u c k i n g`).
            let in_chain = norm
                .chains()
                .iter()
                .any(|&(cs, ce)| (cs as usize) < s && s < ce as usize);
            if entry.extend_start && !in_chain {
                while s > 0 && bytes[s - 1] != b' ' {
                    s -= 1;
                }
            }
            if entry.extend_end {
                while e < bytes.len() && bytes[e] != b' ' {
                    e += 1;
                }
            }
            let Some(range) = norm.original_range(s..e) else {
                continue;
            };
            out.push(Match {
                term: entry.term.clone(),
                category: entry.category.clone(),
                sub: entry.sub.clone(),
                severity: entry.severity,
                start: offset + range.start,
                end: offset + range.end,
                start_char: 0,
                end_char: 0,
            });
        }
    }

    /// Builds the automaton for `sources`, or returns the one already built for the very same
    /// lines if it is still in use somewhere ([`BUILT`]): a config reload whose wordlists did
    /// not change, and policies adding the same lists, share one automaton instead of paying
    /// for a rebuild (about 2 s per 100,000 entries).
    fn build(sources: Vec<Source>) -> Result<Lexicon, LexiconError> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let key = BuildHasherDefault::<DefaultHasher>::default().hash_one(&sources);
        {
            let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
            built.retain(|(_, weak)| weak.strong_count() > 0);
            let found = built
                .iter()
                .filter(|(k, _)| *k == key)
                .filter_map(|(_, weak)| weak.upgrade())
                .find(|inner| inner.sources == sources);
            if let Some(inner) = found {
                return Ok(Lexicon { inner });
            }
        }
        let lexicon = Lexicon::build_new(sources)?;
        BUILT
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((key, Arc::downgrade(&lexicon.inner)));
        Ok(lexicon)
    }

    fn build_new(sources: Vec<Source>) -> Result<Lexicon, LexiconError> {
        let mut b = Build::default();
        let mut variants = Vec::new();
        let mut seen: HashMap<(Arc<str>, String), usize> = HashMap::new();
        let mut categories: HashMap<String, Arc<str>> = HashMap::new();
        let mut norm = Normalized::new();
        for src in &sources {
            let err = |reason: String| LexiconError::Entry {
                file: src.file.to_string(),
                line: src.line,
                reason,
            };
            let allow = &*src.category == ALLOW;
            let Some(spec) = parse_line(&src.text, allow).map_err(err)? else {
                continue;
            };
            norm.set(spec.term);
            let folded = norm.as_str();
            if folded.is_empty() {
                return Err(err(format!("{:?} has no letters or digits", spec.term)));
            }
            let chars: Vec<(char, u8)> = char_runs(&norm);
            let first_unspaced = chars.first().is_some_and(|&(c, _)| is_unspaced(c));
            let last_unspaced = chars.last().is_some_and(|&(c, _)| is_unspaced(c));
            let entry =
                u32::try_from(b.entries.len()).map_err(|_| err("too many entries".into()))?;
            let term: String = chars
                .iter()
                .flat_map(|&(c, r)| std::iter::repeat_n(c, usize::from(r.max(1))))
                .collect();
            let key = format!(
                "{}{term}{}",
                if spec.star_start { "*" } else { "" },
                if spec.star_end { "*" } else { "" }
            );
            if let Some(first) = seen.insert((src.category.clone(), key), src.line) {
                return Err(err(format!(
                    "{:?} duplicates line {first} of this category (after folding)",
                    spec.term
                )));
            }
            // One shared `Arc` per category name, so matches compare categories by pointer.
            let category = categories
                .entry(src.category.to_string())
                .or_insert_with(|| src.category.clone())
                .clone();
            b.entries.push(Entry {
                term: Arc::from(term),
                category,
                sub: spec.sub.map(Arc::from),
                severity: spec.severity,
                allow,
                bound_start: !spec.star_start && !first_unspaced,
                bound_end: !spec.star_end && !last_unspaced,
                extend_start: spec.star_start && !first_unspaced,
                extend_end: spec.star_end && !last_unspaced,
            });
            b.add(&chars, entry, true);
            let unspaced = chars.iter().any(|&(c, _)| is_unspaced(c));
            if chars.iter().any(|&(c, _)| c == ' ') && !unspaced {
                // "kill yourself" also as "killyourself".
                let mut joined: Vec<(char, u8)> = Vec::with_capacity(chars.len());
                for &(c, r) in chars.iter().filter(|&&(c, _)| c != ' ') {
                    match joined.last_mut() {
                        Some((l, lr)) if *l == c && !c.is_ascii_digit() => {
                            *lr = lr.saturating_add(r);
                        }
                        _ => joined.push((c, r)),
                    }
                }
                b.add(&joined, entry, true);
            }
            if !allow
                && chars
                    .iter()
                    .all(|&(c, _)| c.is_ascii_lowercase() || c == ' ')
            {
                let rank = PRIORITY
                    .iter()
                    .position(|p| **p == *src.category)
                    .unwrap_or(PRIORITY.len());
                variants.push((rank, src.category.clone(), entry, chars));
            }
        }
        // Self-censored variants. A single word of 4+ letters: one or two inner letters (or,
        // for words of up to 6 letters, all inner letters) replaced by `*`. A phrase: one inner
        // vowel of one of its 4+-letter words. A variant never takes a pattern some entry
        // already has.
        variants.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        for (_, _, entry, chars) in &variants {
            let n = chars.len();
            let phrase = chars.iter().any(|&(c, _)| c == ' ');
            // Each word as a range of `chars`.
            let mut words = Vec::new();
            let mut start = 0;
            for (i, &(c, _)) in chars.iter().enumerate() {
                if c == ' ' {
                    words.push((start, i));
                    start = i + 1;
                }
            }
            words.push((start, n));
            for &(ws, we) in &words {
                let len = we - ws;
                let letters: usize = chars[ws..we].iter().map(|&(_, r)| usize::from(r)).sum();
                if letters < 4 || len < 3 {
                    continue;
                }
                for from in ws + 1..we - 1 {
                    for to in from + 1..we {
                        let width = to - from;
                        let allowed = if phrase {
                            width == 1 && matches!(chars[from].0, 'a' | 'e' | 'i' | 'o' | 'u')
                        } else {
                            width <= 2 || (from == ws + 1 && to == we - 1 && len <= 6)
                        };
                        if !allowed {
                            continue;
                        }
                        let stars = chars[from..to]
                            .iter()
                            .fold(0u8, |acc, &(_, r)| acc.saturating_add(r));
                        let mut v = Vec::with_capacity(n);
                        v.extend_from_slice(&chars[..from]);
                        v.push(('*', stars));
                        v.extend_from_slice(&chars[to..]);
                        b.add(&v, *entry, false);
                    }
                }
            }
        }
        let blocking = b.entries.iter().filter(|e| !e.allow).count();
        let [mut latin, mut words, mut censored, mut digits, mut other] =
            [(); 5].map(|()| Vec::new());
        for (i, p) in b.patterns.iter().enumerate() {
            if !p.is_ascii() {
                other.push(i);
            } else if p.contains('*') {
                censored.push(i);
            } else if p.bytes().any(|b| b.is_ascii_digit()) {
                digits.push(i);
            } else if b.pattern_cands[i]
                .iter()
                .all(|c| b.entries[c.entry as usize].bound_start)
            {
                words.push(i);
            } else {
                latin.push(i);
            }
        }
        // Per pattern: whether every entry it stands for must end at a word end.
        let end_bound: Vec<bool> = b
            .pattern_cands
            .iter()
            .map(|list| list.iter().all(|c| b.entries[c.entry as usize].bound_end))
            .collect();
        let build = |ids, kind| Searcher::build(&b.patterns, &end_bound, ids, kind);
        let mut latin = build(latin, StartKind::Unanchored)?;
        let mut words = build(words, StartKind::Anchored)?;
        let mut censored = build(censored, StartKind::Unanchored)?;
        let mut digits = build(digits, StartKind::Unanchored)?;
        let mut other = build(other, StartKind::Unanchored)?;
        let mut pattern_cands = Vec::with_capacity(b.pattern_cands.len());
        let (mut cands, mut runs) = (Vec::new(), Vec::new());
        for list in b.pattern_cands {
            let from = cands.len() as u32;
            for cand in list {
                let entry = &b.entries[cand.entry as usize];
                let at = runs.len() as u32;
                runs.extend_from_slice(&cand.runs);
                cands.push(Check {
                    entry: cand.entry,
                    runs: (at, runs.len() as u32),
                    bound_start: entry.bound_start,
                    bound_end: entry.bound_end,
                    allow: entry.allow,
                });
            }
            pattern_cands.push((from, cands.len() as u32));
        }
        // Each searcher's pattern ids → their candidates.
        let searchers = [
            &mut latin,
            &mut words,
            &mut censored,
            &mut digits,
            &mut other,
        ];
        for searcher in searchers.into_iter().flatten() {
            searcher.cands = searcher
                .ids
                .iter()
                .map(|&i| pattern_cands[i as usize])
                .collect();
        }
        if let Some(words) = &mut words {
            let mut bytes = [false; 256];
            for &i in &words.ids {
                for b in b.patterns[i as usize].bytes() {
                    bytes[usize::from(b)] = true;
                }
            }
            // The bytes of the patterns and one other: every other byte acts like it.
            let other = bytes.iter().position(|&used| !used);
            let bytes: Vec<u8> = (0..=255u8)
                .filter(|&b| bytes[usize::from(b)] || Some(usize::from(b)) == other)
                .collect();
            words.matches = MatchTable::new(&words.dfa, &words.cands, &bytes);
        }
        Ok(Lexicon {
            inner: Arc::new(Inner {
                latin,
                words,
                censored,
                digits,
                other,
                pattern_cands,
                cands,
                runs,
                entries: b.entries,
                sources,
                blocking,
            }),
        })
    }
}

/// One DFA over a subset of the patterns.
struct Searcher {
    /// The automaton (unanchored, standard semantics, no prefilter).
    dfa: DFA,
    /// Its pattern ids → indices into `Inner::pattern_cands`.
    ids: Vec<u32>,
    /// Its pattern ids → their range of `Inner::cands` (`Inner::pattern_cands[ids[pid]]`,
    /// one lookup fewer in [`Inner::check`]).
    cands: Box<[(u32, u32)]>,
    /// The anchored searcher (`words`): what each match state finds, flat ([`MatchTable`]).
    matches: Option<MatchTable>,
    /// Anchored searchers over `[a-z ]` patterns only: which walks from the start state
    /// may find something, by the first bytes, so [`Inner::search_words`] can skip the rest.
    prefix: Option<Prefixes>,
    /// Searchers of a few patterns, each at least two bytes long, without `quads`: a gate
    /// that skips a text lacking some pair of adjacent bytes of every pattern.
    pairs: Option<PairGate>,
    /// Searchers whose patterns are all at least four bytes long and start in few ways: a
    /// gate that skips a text holding none of those starts (cheaper and sharper than
    /// `pairs`).
    quads: Option<QuadGate>,
}

/// Most distinct four-byte prefixes a searcher may have for [`Searcher::quads`].
const MAX_QUADS: usize = 8;

/// [`Searcher::quads`]: whether the text holds one of the patterns' first four bytes, 16
/// positions at a time with vector compares (`wide`: SSE2, NEON, or plain code elsewhere). No
/// table and no loop per byte: [`PairGate`]'s table lookup per byte pair took a tenth of the
/// whole scan of a chat corpus, this takes under half of that.
struct QuadGate {
    /// The distinct first four bytes of the patterns, each byte in every lane.
    quads: Box<[[u8x16; 4]]>,
}

impl QuadGate {
    /// The gate for `patterns`, or `None` when one is shorter than four bytes or they start
    /// in more than [`MAX_QUADS`] ways.
    fn new<'a>(patterns: impl Iterator<Item = &'a [u8]>) -> Option<QuadGate> {
        let mut quads: Vec<[u8; 4]> = Vec::new();
        for p in patterns {
            let quad = *p.first_chunk::<4>()?;
            if !quads.contains(&quad) {
                quads.push(quad);
            }
        }
        (quads.len() <= MAX_QUADS).then(|| QuadGate {
            quads: quads.iter().map(|q| q.map(u8x16::splat)).collect(),
        })
    }

    /// Whether one of the quads occurs in the first `len` bytes of `padded`, which must be
    /// readable to `max(len + 15, 35)` (what lies past `len` does not count). Exact.
    #[inline]
    fn may_occur(&self, padded: &[u8], len: usize) -> bool {
        // Positions where a quad fits before `len`.
        let fits = len.saturating_sub(3);
        // Most texts: the first 32 positions, both blocks checked whatever the length (a
        // loop whose count varies from text to text costs a mispredicted branch a text).
        let mut hits = u64::from(self.block(padded, 0)) | u64::from(self.block(padded, 16)) << 16;
        if fits < 32 {
            hits &= (1 << fits) - 1;
        }
        let mut at = 32;
        while hits == 0 && at < fits {
            hits = u64::from(self.block(padded, at));
            if fits - at < 16 {
                hits &= (1 << (fits - at)) - 1;
            }
            at += 16;
        }
        hits != 0
    }

    /// One bit per position `at..at + 16` of `padded`: whether a quad starts there.
    #[inline]
    fn block(&self, padded: &[u8], at: usize) -> u32 {
        let lane = |k: usize| -> u8x16 {
            let b: [u8; 16] = padded[at + k..at + k + 16].try_into().expect("16 bytes");
            u8x16::new(b)
        };
        let (b0, b1, b2, b3) = (lane(0), lane(1), lane(2), lane(3));
        let mut hit = u8x16::ZERO;
        for [q0, q1, q2, q3] in &self.quads {
            hit |= b0.simd_eq(*q0) & b1.simd_eq(*q1) & b2.simd_eq(*q2) & b3.simd_eq(*q3);
        }
        hit.to_bitmask()
    }
}

/// Most patterns a searcher may have for [`Searcher::pairs`]: past that, some pattern's
/// pairs are nearly always all there, and the check costs more than it saves.
const MAX_PAIR_PATTERNS: usize = 16;

/// Which pairs of adjacent bytes a text holds, of those the patterns hold: one bit per such
/// pair (shared by several pairs when there are more than 16).
type PairSet = u16;

/// [`Searcher::pairs`].
struct PairGate {
    /// Per pair of adjacent bytes (the first in the low byte): its bit, or 0 when no
    /// pattern holds it. One table lookup a byte, no hashing (128 KiB, of which a text of
    /// lowercase letters touches a few cache lines per second byte).
    bits: Box<[PairSet; 1 << 16]>,
    /// Per pattern, the bits of its pairs.
    patterns: Box<[PairSet]>,
}

impl PairGate {
    fn new<'a>(patterns: impl Iterator<Item = &'a [u8]> + Clone) -> PairGate {
        let mut bits: Box<[PairSet; 1 << 16]> = vec![0; 1 << 16]
            .into_boxed_slice()
            .try_into()
            .expect("65536 pairs");
        let mut next = 0;
        for p in patterns.clone() {
            for pair in p.windows(2) {
                let k = pair_index(pair);
                if bits[k] == 0 {
                    bits[k] = 1 << (next % PairSet::BITS);
                    next += 1;
                }
            }
        }
        let patterns = patterns.map(|p| pair_set(&bits, p)).collect();
        PairGate { bits, patterns }
    }

    /// Whether some pattern may occur in `bytes`: `false` only when every pattern holds a pair
    /// of adjacent bytes that `bytes` does not (exact: then no pattern occurs).
    #[inline]
    fn may_occur(&self, bytes: &[u8]) -> bool {
        let text = pair_set(&self.bits, bytes);
        self.patterns.iter().any(|&p| p & !text == 0)
    }
}

/// The [`PairSet`] of `bytes` by the table [`PairGate::bits`].
#[inline]
fn pair_set(bits: &[PairSet; 1 << 16], bytes: &[u8]) -> PairSet {
    bytes
        .windows(2)
        .fold(0, |set, pair| set | bits[pair_index(pair)])
}

/// Index into [`PairGate::bits`] of the two bytes `pair`.
#[inline]
fn pair_index(pair: &[u8]) -> usize {
    usize::from(pair[0]) | usize::from(pair[1]) << 8
}

impl Searcher {
    /// Whether some pattern may occur in the first `len` bytes of `padded` (a folded text's
    /// [`Normalized::padded_bytes`]; [`QuadGate::may_occur`], else [`PairGate::may_occur`]).
    #[inline]
    fn may_occur(&self, padded: &[u8], len: usize) -> bool {
        if let Some(gate) = &self.quads {
            return gate.may_occur(padded, len);
        }
        self.pairs
            .as_ref()
            .is_none_or(|gate| gate.may_occur(&padded[..len]))
    }
}

/// Per first bytes of a walk: whether it may find something.
struct Prefixes {
    /// Like `any`, for a text without chains (the only kind whose word starts
    /// [`Inner::search_words`] lists), where a pattern that must end at a word end is found
    /// only before a space or the end of the text: `con` does not keep `conf…` alive, and
    /// a walk from `anal…` needs a fifth and sixth byte that a pattern goes on with, or a
    /// space ([`SIX`]). Most of the walks it saves would find such a word and fail
    /// [`bounds_ok`] (`analysis`, `cocktail`, `title`). [`ALIVE`] here only when a walk
    /// over the four bytes passes a match.
    four: Box<[u64]>,
    /// One bit per hash of six bytes ([`prefix6_index`], 32 KiB), for the [`SIX`] entries of
    /// `four`: set when a walk over such six bytes passes a match or goes on. Most of the
    /// walks that four bytes let through die at the fifth or sixth (`pric|es` for `prick`,
    /// `grea|t`, `anal|ysis`).
    six: Box<[u64]>,
    /// Two bits per four byte classes ([`prefix4_index`], 256 KiB): [`ALIVE`] unless a walk
    /// over such four bytes dies without passing a match; [`LONG_ONLY`] too when, besides,
    /// every pattern such a walk may find is at least [`LONG`] bytes long, so that
    /// [`Prefixes::long`] decides. Exact, not hashed: a 16-bit hash let a third of the
    /// dead four-byte starts through (collisions), each a walk for nothing.
    any: Box<[u64]>,
    /// One bit per hash of first bytes ([`prefix_index`], 8 KiB each), for the
    /// [`LONG_ONLY`] entries of `four` and `any`. First `long[0]`: the first [`LONG`] bytes of
    /// every pattern at least that long. Phrases such as `the world would …` keep the
    /// four-byte test passing for every `the w…`; this stops most of those walks. Then, for
    /// the texts it lets through, by tier ([`LONG_TIERS`]): `long[1 + i]` holds the first
    /// `LONG_TIERS[i]` bytes of each pattern at least that long and shorter than the next
    /// tier's. `send me …`, `are you …` and `want to …` start dozens of phrases that chat
    /// lines go on from differently; a walk for a 16-byte phrase now needs the text to
    /// start with 16 of its bytes.
    long: [Box<[u64]>; LONG_TIERS.len() + 1],
    /// One bit per one to three bytes at the end of a text ([`end_index`]): set when a walk
    /// over just them passes a match. A short last word (`lol`, `ok`) is walked only when it
    /// is a pattern itself.
    end: Box<[u64]>,
}

/// [`Prefixes::four`]: a walk over such four bytes may find something (in `four`: it passes
/// a match).
const ALIVE: u8 = 1;
/// [`Prefixes::four`], with [`ALIVE`]: every pattern a walk over such four bytes may find is
/// long ([`Prefixes::long`] decides).
const LONG_ONLY: u8 = 2;
/// [`Prefixes::four`], alone: a walk over such four bytes goes on, and may find a short
/// pattern; [`Prefixes::six`] decides by six bytes.
const SIX: u8 = 2;

/// Patterns shorter than this are found by walking; the others are first looked up by their
/// first bytes in [`Prefixes::long`].
const LONG: usize = 8;

/// The lengths of the tiers of [`Prefixes::long`]: patterns of `LONG_TIERS[i]` bytes or
/// more, but fewer than `LONG_TIERS[i + 1]`, are looked up (after the first [`LONG`]) by
/// that many first bytes.
const LONG_TIERS: [usize; 3] = [LONG, 12, 16];

/// Bits of [`prefix6_index`]: ~5,300 of the `2^18` are set for the shipped lists (with
/// `2^16`, as fast, collisions let a twelfth of the dead six-byte starts through).
const SIX_BITS: u32 = 18;

impl Prefixes {
    /// What a walk from the start of `bytes` may come to, by its first four bytes only
    /// ([`ALIVE`], [`LONG_ONLY`]; cheap enough to run on every word start). Fewer bytes (a
    /// short last word): by [`Prefixes::end`], `0` or `ALIVE`, so that most such starts are
    /// not listed at all.
    /// In a text without chains; by [`Prefixes::four`] (`0` or [`ALIVE`],
    /// `ALIVE | LONG_ONLY`, [`SIX`]).
    #[inline]
    fn may_start(&self, bytes: &[u8]) -> u8 {
        match *bytes {
            [_, _, _, _, ..] => Self::lookup(&self.four, bytes),
            _ => ALIVE * u8::from(bit(&self.end, end_index(bytes))),
        }
    }

    /// The two bits of `four` (`four` or `any`) for the first four bytes of `bytes`;
    /// [`ALIVE`] when there are fewer.
    #[inline]
    fn lookup(four: &[u64], bytes: &[u8]) -> u8 {
        match *bytes {
            [x, y, z, w, ..] => {
                let k = prefix4_index([x, y, z, w]);
                (four[k / 32] >> (k % 32 * 2)) as u8 & 3
            }
            _ => ALIVE,
        }
    }

    /// For a start that [`Prefixes::may_start`] lets through, with what it said (`start`):
    /// whether a walk may find something, by the first six bytes, the first 8, 12 or 16, or,
    /// at the end of the text, the last few.
    #[inline]
    fn may_find(&self, bytes: &[u8], start: u8) -> bool {
        match start {
            ALIVE => bytes.len() >= 4 || bit(&self.end, end_index(bytes)),
            // Four or five bytes left: the end of the text counts as a space (both end a
            // word, and no pattern goes on past either).
            SIX => {
                let six = match *bytes {
                    [a, b, c, d, e, f, ..] => [a, b, c, d, e, f],
                    [a, b, c, d, e] => [a, b, c, d, e, b' '],
                    [a, b, c, d] => [a, b, c, d, b' ', b' '],
                    _ => return true,
                };
                bit(&self.six, prefix6_index(&six))
            }
            // Too few bytes left for a tier: none of its patterns fits. The first test alone
            // turns most texts away; the tiers run on the rest.
            _ => {
                self.long_hit::<{ LONG_TIERS[0] }>(0, bytes)
                    && (self.long_hit::<{ LONG_TIERS[0] }>(1, bytes)
                        | self.long_hit::<{ LONG_TIERS[1] }>(2, bytes)
                        | self.long_hit::<{ LONG_TIERS[2] }>(3, bytes))
            }
        }
    }

    /// Whether `bytes` starts with the first `N` bytes of a pattern of tier `i` of
    /// [`Prefixes::long`] (by their hash).
    #[inline(always)]
    fn long_hit<const N: usize>(&self, i: usize, bytes: &[u8]) -> bool {
        bytes
            .first_chunk::<N>()
            .is_some_and(|first| bit(&self.long[i], prefix_index(first)))
    }

    /// Both tests at once, by [`Prefixes::any`] (texts with chains): whether a walk from the
    /// start of `bytes` may find something.
    fn may_walk(&self, bytes: &[u8]) -> bool {
        let start = Self::lookup(&self.any, bytes);
        start != 0 && self.may_find(bytes, start)
    }
}

/// Bit `k` of the bit set `table`.
#[inline]
fn bit(table: &[u64], k: usize) -> bool {
    table[k / 64] >> (k % 64) & 1 != 0
}

/// Byte classes of [`Prefixes`].
const PREFIX_CLASSES: usize = 28;

/// Per byte: `a..=z` → 0..=25, space → 26, any other byte → 27 (a byte no pattern of a
/// prefix-filtered searcher holds, so all of them act alike in its DFA).
static PREFIX_CLASS: [u8; 256] = {
    let mut t = [27u8; 256];
    let mut b = b'a';
    while b <= b'z' {
        t[b as usize] = b - b'a';
        b += 1;
    }
    t[b' ' as usize] = 26;
    t
};

/// The class of each of the bytes `b`.
#[inline]
fn classes<const N: usize>(b: [u8; N]) -> [usize; N] {
    b.map(|b| usize::from(PREFIX_CLASS[usize::from(b)]))
}

/// Number of [`prefix4_index`]es: one per four classes, five bits each (a quarter of them
/// unused: 28 classes, but shifts and ors are cheaper than multiplies on every word start).
const FOUR: usize = 1 << 20;

/// Index into [`Prefixes::four`] of the four bytes `b`: their classes, five bits each.
#[inline]
fn prefix4_index(b: [u8; 4]) -> usize {
    let [x, y, z, w] = classes(b);
    x << 15 | y << 10 | z << 5 | w
}

/// Index into a tier of [`Prefixes::long`] of its first bytes `b`: a 16-bit hash of them,
/// eight bytes at a time.
#[inline]
fn prefix_index<const N: usize>(b: &[u8; N]) -> usize {
    let h = b.chunks(8).fold(0u64, |h, chunk| {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        (h ^ u64::from_le_bytes(w)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    });
    (h >> 48) as usize
}

/// Index into [`Prefixes::six`] of the six bytes `b`: a hash of their low five bits (the
/// slots of [`PREFIX_CLASS`]'s classes, `a..=z` and space each its own; the table is built
/// so that a byte of class 27, whatever its slot, never hides a walk).
#[inline]
fn prefix6_index(b: &[u8; 6]) -> usize {
    let mut w = [0u8; 8];
    w[..6].copy_from_slice(b);
    let v = u64::from_le_bytes(w) & 0x1f1f_1f1f_1f1f;
    (v.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SIX_BITS)) as usize
}

/// Index into [`Prefixes::end`] of the last one to three bytes of a text, `b`.
#[inline]
fn end_index(b: &[u8]) -> usize {
    // Class `PREFIX_CLASSES` stands for "no byte".
    let class = |i: usize| b.get(i).map_or(PREFIX_CLASSES, |&b| classes([b])[0]);
    let n = PREFIX_CLASSES + 1;
    (class(0) * n + class(1)) * n + class(2)
}

/// The [`Prefixes`] of the anchored `dfa` over `patterns` (with, per pattern, whether every
/// entry it stands for must end at a word end), or `None` when some pattern holds a byte
/// other than `a..=z` and space.
fn prefix_table(dfa: &DFA, patterns: &[&str], end_bound: &[bool]) -> Option<Prefixes> {
    if !patterns
        .iter()
        .all(|p| p.bytes().all(|b| b.is_ascii_lowercase() || b == b' '))
    {
        return None;
    }
    let start = dfa.start_state(Anchored::Yes).ok()?;
    let rep = |c: usize| match c {
        0..=25 => b'a' + c as u8,
        26 => b' ',
        _ => b'*',
    };
    // What a walk over some bytes comes to.
    #[derive(Clone, Copy, PartialEq)]
    enum Walk {
        Dead,
        Matched,
        Alive(StateID),
        /// At a state where patterns that start where the walk did end, all of them bound
        /// to a word end: they count only if a space comes next.
        Bound(StateID),
    }
    // `bounded`: whether to tell `Bound` from `Matched` (texts without chains).
    let step = |walk: Walk, b: u8, depth: usize, bounded: bool| match walk {
        Walk::Bound(_) if b == b' ' => Walk::Matched,
        Walk::Alive(sid) | Walk::Bound(sid) => {
            let sid = dfa.next_state(Anchored::Yes, sid, b);
            if dfa.is_dead(sid) {
                return Walk::Dead;
            }
            if !dfa.is_match(sid) {
                return Walk::Alive(sid);
            }
            if !bounded {
                return Walk::Matched;
            }
            // The patterns found here that start where the walk did: `depth` bytes long.
            let (mut found, mut free) = (false, false);
            for k in 0..dfa.match_len(sid) {
                let pid = dfa.match_pattern(sid, k);
                if dfa.pattern_len(pid) == depth {
                    found = true;
                    free |= !end_bound[pid.as_usize()];
                }
            }
            match (found, free) {
                (_, true) => Walk::Matched,
                (true, false) => Walk::Bound(sid),
                (false, false) => Walk::Alive(sid),
            }
        }
        done => done,
    };
    let set = |bits: &mut [u64], k: usize| bits[k / 64] |= 1 << (k % 64);
    let bits = |n: usize| vec![0u64; n.div_ceil(64)];
    // `four` and `any` as bit sets: whether a walk passes a match (`matched`, `four` only)
    // or goes on (`alive`), whether some short pattern may start there.
    let (mut any, mut alive, mut matched) = (bits(FOUR), bits(FOUR), bits(FOUR));
    let (mut short_any, mut short) = (bits(FOUR), bits(FOUR));
    let mut six = bits(1 << SIX_BITS);
    let mut long = [(); LONG_TIERS.len() + 1].map(|()| bits(1 << 16));
    // `six` for a walk that went on over the four bytes `first` (to `walk`): every fifth and
    // sixth byte it goes on with or passes a match over. A byte of class 27 is one that no
    // pattern holds, so a walk over it dies; after a match, the sixth byte may be any, in
    // any of the 32 slots of `prefix6_index`.
    let six_of = |six: &mut [u64], walk: Walk, first: [u8; 4]| {
        let [a, b, c, d] = first;
        for x in 0..PREFIX_CLASSES {
            match step(walk, rep(x), 5, true) {
                Walk::Dead => {}
                Walk::Matched => {
                    for slot in 0..32 {
                        set(six, prefix6_index(&[a, b, c, d, rep(x), slot]));
                    }
                }
                five => {
                    for y in 0..PREFIX_CLASSES {
                        if step(five, rep(y), 6, true) != Walk::Dead {
                            set(six, prefix6_index(&[a, b, c, d, rep(x), rep(y)]));
                        }
                    }
                }
            }
        }
    };
    let n = PREFIX_CLASSES + 1;
    let mut end = bits(n * n * n);
    for x in 0..PREFIX_CLASSES {
        let wx = step(Walk::Alive(start), rep(x), 1, false);
        let bx = step(Walk::Alive(start), rep(x), 1, true);
        if wx == Walk::Matched {
            set(&mut end, end_index(&[rep(x)]));
        }
        for y in 0..PREFIX_CLASSES {
            let wy = step(wx, rep(y), 2, false);
            let by = step(bx, rep(y), 2, true);
            if wy == Walk::Matched {
                set(&mut end, end_index(&[rep(x), rep(y)]));
            }
            for z in 0..PREFIX_CLASSES {
                let bytes = [rep(x), rep(y), rep(z)];
                let wz = step(wy, rep(z), 3, false);
                let bz = step(by, rep(z), 3, true);
                if wz == Walk::Dead {
                    continue;
                }
                if wz == Walk::Matched {
                    set(&mut end, end_index(&bytes));
                }
                for w in 0..PREFIX_CLASSES {
                    let [a, b, c] = bytes;
                    let k = prefix4_index([a, b, c, rep(w)]);
                    if step(wz, rep(w), 4, false) != Walk::Dead {
                        set(&mut any, k);
                    }
                    match step(bz, rep(w), 4, true) {
                        Walk::Dead => {}
                        Walk::Matched => set(&mut matched, k),
                        walk => {
                            set(&mut alive, k);
                            six_of(&mut six, walk, [a, b, c, rep(w)]);
                        }
                    }
                }
            }
        }
    }
    for (p, &bound) in patterns.iter().map(|p| p.as_bytes()).zip(end_bound) {
        if p.len() >= LONG {
            let [_, b, c] = LONG_TIERS;
            set(&mut long[0], prefix_index::<8>(p.first_chunk()?));
            match p.len() {
                n if n >= c => set(&mut long[3], prefix_index::<16>(p.first_chunk()?)),
                n if n >= b => set(&mut long[2], prefix_index::<12>(p.first_chunk()?)),
                _ => set(&mut long[1], prefix_index::<8>(p.first_chunk()?)),
            }
            continue;
        }
        // Every four bytes such a pattern may start: its own first four, or, when it is
        // shorter, it followed by anything (in a text without chains, by a space first when
        // it must end at a word end).
        let known = p.len().min(4);
        for k in 0..PREFIX_CLASSES.pow(4 - known as u32) {
            let mut four = [0u8; 4];
            four[..known].copy_from_slice(&p[..known]);
            let mut k = k;
            for b in &mut four[known..] {
                *b = rep(k % PREFIX_CLASSES);
                k /= PREFIX_CLASSES;
            }
            set(&mut short_any, prefix4_index(four));
            if !bound || known == 4 || four[known] == b' ' {
                set(&mut short, prefix4_index(four));
            }
        }
    }
    // `matched`: `None` for `any` (alive is all it tells).
    let table = |alive: &[u64], short: &[u64], matched: Option<&[u64]>| {
        let mut four = vec![0u64; FOUR.div_ceil(32)];
        for k in 0..FOUR {
            let value = if matched.is_some_and(|m| bit(m, k)) {
                ALIVE
            } else if !bit(alive, k) {
                continue;
            } else if !bit(short, k) {
                ALIVE | LONG_ONLY
            } else if matched.is_some() {
                SIX
            } else {
                ALIVE
            };
            four[k / 32] |= u64::from(value) << (k % 32 * 2);
        }
        four.into_boxed_slice()
    };
    Some(Prefixes {
        four: table(&alive, &short, Some(&matched)),
        six: six.into_boxed_slice(),
        any: table(&any, &short_any, None),
        long: long.map(Vec::into_boxed_slice),
        end: end.into_boxed_slice(),
    })
}

impl Searcher {
    /// The searcher over `patterns[ids]` with the given start kind (anchored ones also get the
    /// word-start prefix table); `None` when `ids` is empty.
    fn build(
        patterns: &[String],
        end_bound: &[bool],
        ids: Vec<usize>,
        kind: StartKind,
    ) -> Result<Option<Searcher>, LexiconError> {
        if ids.is_empty() {
            return Ok(None);
        }
        let dfa = DFA::builder()
            .match_kind(MatchKind::Standard)
            .start_kind(kind)
            .prefilter(false)
            .build(ids.iter().map(|&i| &patterns[i]))?;
        let quads = QuadGate::new(ids.iter().map(|&i| patterns[i].as_bytes()));
        let pairs = (quads.is_none()
            && ids.len() <= MAX_PAIR_PATTERNS
            && ids.iter().all(|&i| patterns[i].len() >= 2))
        .then(|| PairGate::new(ids.iter().map(|&i| patterns[i].as_bytes())));
        let prefix = match kind {
            StartKind::Anchored => {
                let patterns: Vec<&str> = ids.iter().map(|&i| patterns[i].as_str()).collect();
                let end_bound: Vec<bool> = ids.iter().map(|&i| end_bound[i]).collect();
                prefix_table(&dfa, &patterns, &end_bound)
            }
            _ => None,
        };
        Ok(Some(Searcher {
            dfa,
            ids: ids.into_iter().map(|i| i as u32).collect(),
            cands: Box::default(),
            matches: None,
            prefix,
            pairs,
            quads,
        }))
    }
}

impl Inner {
    /// Every occurrence of `searcher`'s patterns in the folded `bytes` that passes its
    /// entry's boundary and run checks, into `raw` (blocking) or `allow`.
    fn search(
        &self,
        searcher: &Searcher,
        bytes: &[u8],
        runs: &[u8],
        chains: &[(u32, u32)],
        raw: &mut Vec<(usize, usize, u32)>,
        allow: &mut Vec<(usize, usize)>,
    ) {
        // Overlapping search by hand: stepping the DFA directly keeps the loop monomorphic
        // and free of per-match iterator state.
        let dfa = &searcher.dfa;
        let Ok(mut sid) = dfa.start_state(Anchored::No) else {
            return;
        };
        let mut at = 0;
        while at < bytes.len() {
            // Tight loop until a special (match or dead) state.
            while at < bytes.len() {
                sid = dfa.next_state(Anchored::No, sid, bytes[at]);
                at += 1;
                if dfa.is_special(sid) {
                    break;
                }
            }
            if dfa.is_dead(sid) {
                break;
            }
            if !dfa.is_match(sid) {
                continue;
            }
            for k in 0..dfa.match_len(sid) {
                let pid = dfa.match_pattern(sid, k);
                let s = at - dfa.pattern_len(pid);
                let (from, to) = searcher.cands[pid.as_usize()];
                self.check(from, to, s, at, bytes, runs, chains, raw, allow);
            }
        }
    }

    /// Like [`Inner::search`] for an anchored `searcher` whose patterns all must start at a
    /// word start: walks from each word start (and each position inside a chain) only, and
    /// keeps the occurrences starting there. Finds the same occurrences that an unanchored
    /// walk would find and [`bounds_ok`] would pass.
    #[allow(clippy::too_many_arguments)]
    fn search_words(
        &self,
        searcher: &Searcher,
        spaces: &[u64],
        bytes: &[u8],
        runs: &[u8],
        chains: &[(u32, u32)],
        raw: &mut Vec<(usize, usize, u32)>,
        allow: &mut Vec<(usize, usize)>,
    ) {
        let dfa = &searcher.dfa;
        let Ok(start) = dfa.start_state(Anchored::Yes) else {
            return;
        };
        let prefix = searcher.prefix.as_ref();
        if !chains.is_empty() {
            for s in 0..bytes.len() {
                let word_start = s == 0 || bytes[s - 1] == b' ';
                let in_chain = || {
                    chains
                        .iter()
                        .any(|&(cs, ce)| cs as usize <= s && s < ce as usize)
                };
                if (word_start || in_chain()) && prefix.is_none_or(|p| p.may_walk(&bytes[s..])) {
                    self.walk(searcher, (start, s), s, bytes, runs, chains, raw, allow);
                }
            }
            return;
        }
        // No chain: the word starts only, 64 bytes at a time from the bits of the spaces that
        // the normalizer recorded, and the ones the first prefix test lets through listed
        // without branching on it; the second test, dearer and needed by few, runs on the
        // listed ones.
        let mut carry = 1u64;
        for (&spaces, base) in spaces.iter().zip((0..).step_by(64)) {
            let mut starts = spaces << 1 | carry;
            carry = spaces >> 63;
            let left = bytes.len() - base;
            if left < 64 {
                // Past the end (a start after a trailing space cannot be: there is none).
                starts &= (1u64 << left) - 1;
            }
            // Offsets in the block, with what `may_start` said in the top two bits.
            let mut list = [0u8; 64];
            let mut n = 0;
            while starts != 0 {
                let i = starts.trailing_zeros() as u8;
                starts &= starts - 1;
                let start = prefix.map_or(ALIVE, |p| p.may_start(&bytes[base + usize::from(i)..]));
                list[n] = i | start << 6;
                n += usize::from(start != 0);
            }
            // The walks two at a time.
            let mut pending = None;
            for &i in &list[..n] {
                let s = base + usize::from(i & 63);
                if prefix.is_some_and(|p| !p.may_find(&bytes[s..], i >> 6)) {
                    continue;
                }
                match pending.take() {
                    None => pending = Some(s),
                    Some(a) => {
                        self.walk2(searcher, start, (a, s), bytes, runs, chains, raw, allow);
                    }
                }
            }
            if let Some(a) = pending {
                self.walk(searcher, (start, a), a, bytes, runs, chains, raw, allow);
            }
        }
    }

    /// Walks `searcher`'s anchored DFA from `start` at `bytes[s..]` and checks the occurrences
    /// that start at `s`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn walk(
        &self,
        searcher: &Searcher,
        (mut sid, mut at): (StateID, usize),
        s: usize,
        bytes: &[u8],
        runs: &[u8],
        chains: &[(u32, u32)],
        raw: &mut Vec<(usize, usize, u32)>,
        allow: &mut Vec<(usize, usize)>,
    ) {
        let dfa = &searcher.dfa;
        while at < bytes.len() {
            sid = dfa.next_state(Anchored::Yes, sid, bytes[at]);
            at += 1;
            if dfa.is_special(sid)
                && !self.special(searcher, sid, s, at, bytes, runs, chains, raw, allow)
            {
                break;
            }
        }
    }

    /// Two walks at once, from `a` and from `b` (as [`Inner::walk`] each): their steps do not
    /// depend on each other, so the cache misses of the one overlap with those of the other.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn walk2(
        &self,
        searcher: &Searcher,
        start: StateID,
        (a, b): (usize, usize),
        bytes: &[u8],
        runs: &[u8],
        chains: &[(u32, u32)],
        raw: &mut Vec<(usize, usize, u32)>,
        allow: &mut Vec<(usize, usize)>,
    ) {
        let dfa = &searcher.dfa;
        let (mut sa, mut ia, mut sb, mut ib) = (start, a, start, b);
        while ia < bytes.len() && ib < bytes.len() {
            sa = dfa.next_state(Anchored::Yes, sa, bytes[ia]);
            sb = dfa.next_state(Anchored::Yes, sb, bytes[ib]);
            ia += 1;
            ib += 1;
            if !dfa.is_special(sa) && !dfa.is_special(sb) {
                continue;
            }
            let alive_a = !dfa.is_special(sa)
                || self.special(searcher, sa, a, ia, bytes, runs, chains, raw, allow);
            let alive_b = !dfa.is_special(sb)
                || self.special(searcher, sb, b, ib, bytes, runs, chains, raw, allow);
            if !alive_a {
                if alive_b {
                    self.walk(searcher, (sb, ib), b, bytes, runs, chains, raw, allow);
                }
                return;
            }
            if !alive_b {
                self.walk(searcher, (sa, ia), a, bytes, runs, chains, raw, allow);
                return;
            }
        }
        self.walk(searcher, (sa, ia), a, bytes, runs, chains, raw, allow);
        self.walk(searcher, (sb, ib), b, bytes, runs, chains, raw, allow);
    }

    /// For a walk from `s` that came to the special state `sid` at `at`: checks what it found
    /// there; `false` when it is dead.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn special(
        &self,
        searcher: &Searcher,
        sid: StateID,
        s: usize,
        at: usize,
        bytes: &[u8],
        runs: &[u8],
        chains: &[(u32, u32)],
        raw: &mut Vec<(usize, usize, u32)>,
        allow: &mut Vec<(usize, usize)>,
    ) -> bool {
        let dfa = &searcher.dfa;
        if dfa.is_dead(sid) {
            return false;
        }
        if !dfa.is_match(sid) {
            return true;
        }
        if let Some(table) = &searcher.matches {
            for &(len, from, to) in table.at(sid) {
                if at - len as usize == s {
                    self.check(from, to, s, at, bytes, runs, chains, raw, allow);
                }
            }
            return true;
        }
        for k in 0..dfa.match_len(sid) {
            let pid = dfa.match_pattern(sid, k);
            if at - dfa.pattern_len(pid) == s {
                let (from, to) = searcher.cands[pid.as_usize()];
                self.check(from, to, s, at, bytes, runs, chains, raw, allow);
            }
        }
        true
    }

    /// Checks the candidates `from..to` of `Inner::cands` (a pattern's, [`Searcher::cands`])
    /// occurring at folded `s..e` and records those that pass.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn check(
        &self,
        from: u32,
        to: u32,
        s: usize,
        e: usize,
        bytes: &[u8],
        runs: &[u8],
        chains: &[(u32, u32)],
        raw: &mut Vec<(usize, usize, u32)>,
        allow: &mut Vec<(usize, usize)>,
    ) {
        for cand in &self.cands[from as usize..to as usize] {
            let want = &self.runs[cand.runs.0 as usize..cand.runs.1 as usize];
            if !bounds_ok(bytes, chains, s, e, cand) || !runs_ok(bytes, runs, s, want, cand) {
                continue;
            }
            if cand.allow {
                allow.push((s, e));
            } else {
                raw.push((s, e, cand.entry));
            }
        }
    }
}

/// The lexicon under construction.
#[derive(Default)]
struct Build {
    /// Entries so far.
    entries: Vec<Entry>,
    /// Pattern bytes by pattern id.
    patterns: Vec<String>,
    /// Pattern id by pattern bytes.
    ids: HashMap<String, usize>,
    /// Candidates per pattern id.
    pattern_cands: Vec<Vec<Cand>>,
}

impl Build {
    /// Adds the pattern spelled by `chars` (char, run) for `entry`. A variant
    /// (`exact == false`) is skipped when some entry has the same spelling and runs.
    fn add(&mut self, chars: &[(char, u8)], entry: u32, exact: bool) {
        let text: String = chars.iter().map(|&(c, _)| c).collect();
        let runs: Box<[u8]> = chars.iter().map(|&(_, r)| r.max(1)).collect();
        let cand = Cand { entry, runs };
        match self.ids.get(&text) {
            Some(&id) => {
                let cands = &mut self.pattern_cands[id];
                // A variant is dropped when another entry already owns that exact spelling.
                let taken = cands
                    .iter()
                    .any(|c| c.entry == entry || (!exact && c.runs == cand.runs));
                if !taken {
                    cands.push(cand);
                }
            }
            None => {
                self.ids.insert(text.clone(), self.patterns.len());
                self.patterns.push(text);
                self.pattern_cands.push(vec![cand]);
            }
        }
    }
}

/// Folded chars with their run lengths.
fn char_runs(norm: &Normalized) -> Vec<(char, u8)> {
    let runs = norm.runs();
    norm.as_str()
        .char_indices()
        .map(|(i, c)| (c, runs[i]))
        .collect()
}

/// Whether an occurrence at folded `s..e` satisfies the entry's word-boundary rule. Inside a
/// joined chain (`u r a b i t c h` → `urabitch`) a word may end anywhere, and may start after
/// one-letter chat words (`a`, `i`, `u`, `r`, `y`) only, so a spaced-out `c l a s s` does not
/// hit `ass`.
fn bounds_ok(bytes: &[u8], chains: &[(u32, u32)], s: usize, e: usize, entry: &Check) -> bool {
    let start_ok = !entry.bound_start || s == 0 || bytes[s - 1] == b' ';
    let end_ok = !entry.bound_end || e == bytes.len() || bytes[e] == b' ';
    if start_ok && end_ok {
        return true;
    }
    chains.iter().any(|&(cs, ce)| {
        let (cs, ce) = (cs as usize, ce as usize);
        cs <= s
            && e <= ce
            && (start_ok || bytes[cs..s].iter().all(|b| b"aiury".contains(b)))
            && (end_ok || e < ce)
    })
}

/// Whether the run lengths of the occurrence at folded offset `s` fit the entry's: equal, or
/// at least 3 in the text (emphasis: `fuuuck`, `asssss`). A doubled letter alone is a
/// different word (`assess` is not `asses`, `as` is not `ass`), except at an open end of a
/// `*` entry, where the word goes on (`shit*` hits `shitty`).
fn runs_ok(bytes: &[u8], runs: &[u8], s: usize, want: &[u8], entry: &Check) -> bool {
    let mut i = s;
    let last = want.len().saturating_sub(1);
    for (k, &w) in want.iter().enumerate() {
        let Some(&r) = runs.get(i) else {
            return false;
        };
        let open = (k == 0 && !entry.bound_start) || (k == last && !entry.bound_end);
        if r != w && (r < w || (r < 3 && !open)) {
            return false;
        }
        i += match bytes[i] {
            0x00..=0x7f => 1,
            0x80..=0xdf => 2,
            0xe0..=0xef => 3,
            _ => 4,
        };
    }
    true
}

/// Sorts, removes covered same-category duplicates and fills in char offsets.
fn finish(text: &str, out: &mut Vec<Match>, reach: &mut Vec<(usize, usize)>) {
    if out.is_empty() {
        return;
    }
    out.sort_by(|a, b| {
        a.start
            .cmp(&b.start)
            .then(b.end.cmp(&a.end))
            .then_with(|| a.category.cmp(&b.category))
            .then(b.term.len().cmp(&a.term.len()))
            .then_with(|| a.term.cmp(&b.term))
    });
    // Per category (by `Arc` pointer: one `Arc` per category name): the furthest end so far.
    reach.clear();
    out.retain(|m| {
        let category = Arc::as_ptr(&m.category).cast::<u8>() as usize;
        match reach.iter_mut().find(|(c, _)| *c == category) {
            Some((_, end)) if *end >= m.end => false,
            Some((_, end)) => {
                *end = m.end;
                true
            }
            None => {
                reach.push((category, m.end));
                true
            }
        }
    });
    if text.is_ascii() {
        // One char a byte.
        for m in out.iter_mut() {
            (m.start_char, m.end_char) = (m.start, m.end);
        }
        return;
    }
    let (mut byte, mut chars) = (0, 0);
    for m in out.iter_mut() {
        chars += text[byte..m.start].chars().count();
        byte = m.start;
        m.start_char = chars;
        m.end_char = chars + text[m.start..m.end].chars().count();
    }
}

/// A parsed entry line.
struct Spec<'a> {
    /// The term without `*` markers.
    term: &'a str,
    /// Leading `*`: may start inside a word.
    star_start: bool,
    /// Trailing `*`: may end inside a word.
    star_end: bool,
    /// Severity (`medium` for allowlist lines, which have none).
    severity: Severity,
    /// Optional finer label.
    sub: Option<&'a str>,
}

/// Parses one line: `TERM | SEVERITY [| SUB]` (allowlist: `TERM`). `Ok(None)` for blank and
/// comment lines.
fn parse_line(line: &str, allow: bool) -> Result<Option<Spec<'_>>, String> {
    let line = match line.find(" #").or_else(|| line.find("\t#")) {
        Some(i) => &line[..i],
        None => line,
    };
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut fields = line.split('|').map(str::trim);
    let raw = fields.next().unwrap_or_default();
    let star_start = raw.starts_with('*');
    let star_end = raw.len() > 1 && raw.ends_with('*');
    let term = raw
        .strip_prefix('*')
        .unwrap_or(raw)
        .strip_suffix('*')
        .unwrap_or(raw.strip_prefix('*').unwrap_or(raw))
        .trim();
    if term.is_empty() {
        return Err("empty term".into());
    }
    if term.contains('*') {
        return Err(format!(
            "{raw:?}: `*` is only allowed at the start or end of a term"
        ));
    }
    let severity = fields.next();
    let sub = fields.next();
    if let Some(extra) = fields.next() {
        return Err(format!(
            "unexpected field {extra:?} (TERM | SEVERITY | SUB)"
        ));
    }
    if allow {
        if severity.is_some() {
            return Err("allowlist lines hold only a term".into());
        }
        return Ok(Some(Spec {
            term,
            star_start,
            star_end,
            severity: Severity::Medium,
            sub: None,
        }));
    }
    let severity = match severity {
        Some("low") => Severity::Low,
        Some("medium") => Severity::Medium,
        Some("high") => Severity::High,
        Some(other) => {
            return Err(format!(
                "severity {other:?} is not one of low, medium, high"
            ));
        }
        None => return Err(format!("{term:?} has no severity (TERM | low|medium|high)")),
    };
    let sub = match sub {
        None | Some("") => None,
        Some(s) if is_name(s) => Some(s),
        Some(s) => return Err(format!("sub {s:?} must be lowercase letters, digits, `_`")),
    };
    Ok(Some(Spec {
        term,
        star_start,
        star_end,
        severity,
        sub,
    }))
}

pub(crate) fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn check_category(category: &str) -> Result<(), LexiconError> {
    if is_name(category) {
        Ok(())
    } else {
        Err(LexiconError::Category(category.to_string()))
    }
}

/// Adds the lines of wordlist file `path` (relative, `/`-separated) to `sources`.
fn add_file(sources: &mut Vec<Source>, path: &str, contents: &str) -> Result<(), LexiconError> {
    let stem = path
        .rsplit('/')
        .next()
        .unwrap_or(path)
        .trim_end_matches(".txt");
    check_category(stem)?;
    let file: Arc<str> = Arc::from(path);
    let category: Arc<str> = Arc::from(stem);
    for (i, line) in contents.lines().enumerate() {
        sources.push(Source {
            file: file.clone(),
            line: i + 1,
            text: line.into(),
            category: category.clone(),
        });
    }
    Ok(())
}

/// Adds every wordlist file of `dir` (see [`Lexicon::dir_files`]) to `sources`, named by
/// their path under `dir`, or under `prefix`'s parent when given (so extra lists show where
/// they came from in errors).
fn add_dir(
    sources: &mut Vec<Source>,
    dir: &Path,
    prefix: Option<&Path>,
) -> Result<(), LexiconError> {
    for path in Lexicon::dir_files(dir)? {
        let contents = std::fs::read_to_string(&path).map_err(|source| LexiconError::Io {
            path: path.clone(),
            source,
        })?;
        let base = prefix.and_then(Path::parent).unwrap_or(dir);
        let name = path.strip_prefix(base).unwrap_or(&path).to_string_lossy();
        add_file(sources, &name.replace('\\', "/"), &contents)?;
    }
    Ok(())
}

fn read_dir_sorted(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?;
    paths.sort();
    Ok(paths)
}

fn is_wordlist(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e == "txt")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::normalize::normalize;

    fn lex(lines: &[(&str, &str)]) -> Lexicon {
        let mut sources = Vec::new();
        for (cat, text) in lines {
            add_file(&mut sources, &format!("{cat}.txt"), text).unwrap();
        }
        Lexicon::build(sources).unwrap()
    }

    #[test]
    fn word_prefix_tables_never_skip_a_match() {
        let lex = Lexicon::embedded().unwrap();
        let inner = &*lex.inner;
        let words = inner.words.as_ref().unwrap();
        let prefix = words.prefix.as_ref().expect("word patterns are all [a-z ]");
        let dfa = &words.dfa;
        let start = dfa.start_state(Anchored::Yes).unwrap();
        // Per pattern: whether every entry it stands for must end at a word end.
        let end_bound = |pid: aho_corasick::PatternID| {
            let (from, to) = words.cands[pid.as_usize()];
            inner.cands[from as usize..to as usize]
                .iter()
                .all(|c| c.bound_end)
        };
        // Whether a walk over `text` finds a pattern that starts where it does (as
        // `Inner::walk` checks: a match state also lists patterns that end there but start
        // later); with `bounded`, as in a text without chains: only patterns that pass the
        // end boundary.
        let finds_in = |text: &[u8], bounded: bool| {
            let mut sid = start;
            for (at, &b) in (1..).zip(text) {
                sid = dfa.next_state(Anchored::Yes, sid, b);
                if dfa.is_dead(sid) {
                    return false;
                }
                let ends_word = text.get(at).is_none_or(|&b| b == b' ');
                if dfa.is_match(sid)
                    && (0..dfa.match_len(sid)).any(|k| {
                        let pid = dfa.match_pattern(sid, k);
                        dfa.pattern_len(pid) == at && (!bounded || ends_word || !end_bound(pid))
                    })
                {
                    return true;
                }
            }
            false
        };
        let finds = |text: &[u8]| finds_in(text, false);
        let finds_bounded = |text: &[u8]| finds_in(text, true);
        let mut texts: Vec<String> = Vec::new();
        for e in &inner.entries {
            for t in [&e.term[..], "", "x", "ab", "a*", "s", "s and more words"] {
                texts.push(format!("{}{t}", e.term));
                texts.push(format!("{} {t}", e.term));
            }
            // Every prefix, so the end-of-text table and texts shorter than `LONG` are
            // tried with every pattern, long phrases among them.
            texts.extend((1..e.term.len()).map(|k| e.term.chars().take(k).collect()));
        }
        let alphabet = b"abcfiknstu *";
        for len in 1..=4 {
            for k in 0..alphabet.len().pow(len) {
                let mut t = String::new();
                let mut k = k;
                for _ in 0..len {
                    t.push(char::from(alphabet[k % alphabet.len()]));
                    k /= alphabet.len();
                }
                texts.push(t);
            }
        }
        let may_walk_words = |text: &[u8]| {
            let start = prefix.may_start(text);
            start != 0 && prefix.may_find(text, start)
        };
        let (mut found, mut found_bounded, mut skipped_bound) = (0, 0, 0);
        for text in &texts {
            let text = text.as_bytes();
            if finds(text) {
                found += 1;
                assert!(prefix.may_walk(text), "{:?}", String::from_utf8_lossy(text));
            }
            if finds_bounded(text) {
                found_bounded += 1;
                assert!(may_walk_words(text), "{:?}", String::from_utf8_lossy(text));
            } else if finds(text) && !may_walk_words(text) {
                skipped_bound += 1;
            }
        }
        assert!(found > 1000, "{found}");
        assert!(found_bounded > 1000, "{found_bounded}");
        // Words that only start a pattern bound to a word end are skipped.
        assert!(skipped_bound > 100, "{skipped_bound}");
        // Scunthorpe words among them, by four bytes (`title`, `congrats`) or five
        // (`analysis`, `cocktail`); a chain may still hold such a pattern (`a n a l y`).
        for w in [
            "analysis",
            "cocktail",
            "title",
            "japan",
            "homophones",
            "congrats",
            "spicy",
            "dickens",
            "arsenic",
            "niger",
            "about",
            "cumbria",
        ] {
            assert!(prefix.may_walk(w.as_bytes()), "{w:?}");
            assert!(!may_walk_words(w.as_bytes()), "{w:?} is walked");
        }
        // And it does skip most clean words: by their first four bytes, by their first eight
        // (`the w…` starts long phrases), or as the last word of a text.
        let clean = [
            "hello",
            "world",
            "thanks",
            "meeting",
            "tomorrow",
            "what",
            "the weather is nice",
            "the weekend",
            "lol",
            "ok",
            "fr",
        ];
        let skipped: Vec<&str> = clean
            .into_iter()
            .filter(|w| !prefix.may_walk(w.as_bytes()))
            .collect();
        assert!(skipped.len() >= 8, "{skipped:?}");
        for w in ["the weather is nice", "lol", "ok"] {
            assert!(skipped.contains(&w), "{w:?} is walked: {skipped:?}");
        }
        // Words whose first four bytes some pattern starts with, but not their first six
        // (`SIX`), and phrases that start like a long pattern, but not as far as its tier
        // (`send me …` has `send me the otp` in tier 12, `send me a picture of your id` in
        // 16): not walked in a text without chains.
        for w in [
            "prices",
            "greatly",
            "next time",
            "send me a pic of my cat",
            "whats the time",
        ] {
            assert!(!may_walk_words(w.as_bytes()), "{w:?} is walked");
        }
    }

    #[test]
    fn the_match_table_agrees_with_the_dfa() {
        let lex = Lexicon::embedded().unwrap();
        let words = lex.inner.words.as_ref().unwrap();
        let table = words
            .matches
            .as_ref()
            .expect("the words DFA has the expected layout");
        let dfa = &words.dfa;
        // Every match state a walk can reach, over every byte (the table was built over the
        // patterns' bytes and one other): what the table says it finds is what the DFA says.
        let start = dfa.start_state(Anchored::Yes).unwrap();
        let mut seen = std::collections::HashSet::from([start]);
        let (mut queue, mut matches) = (vec![start], 0);
        while let Some(sid) = queue.pop() {
            if dfa.is_match(sid) {
                matches += 1;
                let want: Vec<(u32, u32, u32)> = (0..dfa.match_len(sid))
                    .map(|k| {
                        let pid = dfa.match_pattern(sid, k);
                        let (a, b) = words.cands[pid.as_usize()];
                        (dfa.pattern_len(pid) as u32, a, b)
                    })
                    .collect();
                assert_eq!(table.at(sid), &want[..]);
            }
            for b in 0..=255u8 {
                let next = dfa.next_state(Anchored::Yes, sid, b);
                if !dfa.is_dead(next) && seen.insert(next) {
                    queue.push(next);
                }
            }
        }
        assert!(matches > 100, "{matches}");
    }

    #[test]
    fn word_walks_find_what_walking_from_everywhere_finds() {
        // `search_words` walks only from listed word starts, two walks at a time: it must
        // find what a walk from every position finds (`check` drops what does not start a
        // word), on real chat lines and on the fixtures.
        let lex = Lexicon::embedded().unwrap();
        let inner = &*lex.inner;
        let words = inner.words.as_ref().unwrap();
        let start = words.dfa.start_state(Anchored::Yes).unwrap();
        let data = [
            include_str!("../../tests/data/text/chat_corpus.txt"),
            include_str!("../../tests/data/text/positive.txt"),
            include_str!("../../tests/data/text/negative.txt"),
            include_str!("../../tests/data/text/safe.txt"),
        ];
        let mut norm = Normalized::new();
        let (mut found, mut multi) = (0, 0);
        for line in data.iter().flat_map(|d| d.lines()) {
            let text = line.rsplit('\t').next().unwrap_or(line);
            norm.set_lazy(text);
            let (bytes, runs, chains) = (norm.as_bytes(), norm.runs(), norm.chains());
            let (mut raw, mut allow) = (Vec::new(), Vec::new());
            inner.search_words(
                words,
                norm.spaces(),
                bytes,
                runs,
                chains,
                &mut raw,
                &mut allow,
            );
            let (mut want_raw, mut want_allow) = (Vec::new(), Vec::new());
            for s in 0..bytes.len() {
                let (r, a) = (&mut want_raw, &mut want_allow);
                inner.walk(words, (start, s), s, bytes, runs, chains, r, a);
            }
            for v in [&mut raw, &mut want_raw] {
                v.sort_unstable();
            }
            for v in [&mut allow, &mut want_allow] {
                v.sort_unstable();
            }
            assert_eq!(raw, want_raw, "{text:?}");
            assert_eq!(allow, want_allow, "{text:?}");
            found += raw.len();
            let starts: std::collections::HashSet<usize> = raw.iter().map(|r| r.0).collect();
            multi += usize::from(starts.len() >= 2);
        }
        // Plenty found, and from two word starts of one text often (the paired walks).
        assert!(found > 1000 && multi > 50, "{found} {multi}");
    }

    #[test]
    fn a_reused_scratch_scans_like_a_fresh_one() {
        // Word starts are read from whole 64-byte blocks of the folded text, past its end
        // too (what an earlier, longer text left there, spaces included): every length and
        // every place of a match around the block edges, after a long text of one-letter
        // words and after one with no space at all.
        let lex = Lexicon::embedded().unwrap();
        let mut scratch = Scratch::default();
        let mut out = Vec::new();
        let mut texts = Vec::new();
        for len in 0..140 {
            texts.push("a ".repeat(100));
            texts.push("x".repeat(len));
            texts.push("ab ".repeat(70));
            texts.push(format!("{} fuck you", "y".repeat(len)));
            texts.push(format!(
                "{}fuck {}",
                "o ".repeat(len / 2),
                "z".repeat(len % 7)
            ));
            texts.push("ok ".repeat(len / 3) + "kill yourself");
        }
        let mut found = 0;
        for text in &texts {
            lex.scan_into(text, &mut scratch, &mut out);
            assert_eq!(out, lex.scan(text), "{text:?}");
            found += out.len();
        }
        assert!(found >= 3 * 140, "{found}");
    }

    #[test]
    fn latin_gates_never_skip_an_occurrence() {
        let lex = Lexicon::embedded().unwrap();
        let inner = &*lex.inner;
        let latin = inner.latin.as_ref().unwrap();
        let Some(quads) = &latin.quads else {
            panic!("the default lists keep `latin` small");
        };
        assert!(latin.pairs.is_none(), "one gate is enough");
        let patterns: Vec<String> = inner
            .entries
            .iter()
            .filter(|e| !e.bound_start && e.term.bytes().all(|b| b.is_ascii_lowercase()))
            .map(|e| e.term.to_string())
            .collect();
        assert!(!patterns.is_empty());
        // The gate for lists that start in too many ways, over the folded patterns (runs
        // collapse: `nigger` is searched as `niger`).
        let folded: Vec<String> = patterns.iter().map(|p| normalize(p)).collect();
        let pairs = PairGate::new(folded.iter().map(|p| p.as_bytes()));
        for p in &patterns {
            for text in [
                p.clone(),
                format!("mother{p}er"),
                format!("you {p} off"),
                format!("a{p}"),
                format!("{p}!"),
                format!("{}{p}", "x".repeat(40)),
            ] {
                let folded = Normalized::of(&text);
                let (padded, len) = (folded.padded_bytes(), folded.len());
                assert!(quads.may_occur(padded, len), "{text:?}");
                assert!(pairs.may_occur(folded.as_bytes()), "{text:?}");
                assert!(latin.may_occur(padded, len), "{text:?}");
            }
        }
        // Texts with none of them are mostly skipped.
        let clean = [
            "see you at the meeting tomorrow",
            "what a lovely day",
            "thanks for the help",
            "ok",
            "",
        ];
        for t in clean {
            let folded = Normalized::of(t);
            assert!(
                !quads.may_occur(folded.padded_bytes(), folded.len()),
                "{t:?}"
            );
        }
        let skipped = clean
            .iter()
            .filter(|t| !pairs.may_occur(t.as_bytes()))
            .count();
        assert!(skipped >= 3, "{skipped}");
    }

    #[test]
    fn the_quad_gate_is_exact() {
        let quads: [&[u8]; 4] = [b"fuck", b"shit", b"nigga", b"niger"];
        let gate = QuadGate::new(quads.iter().copied()).unwrap();
        // Random texts of pieces of the quads (so that they often hold one, and often almost),
        // every length around the block sizes, and bytes past the end that would hit if
        // they counted.
        let pieces: [&[u8]; 10] = [
            b"fu", b"ck", b"sh", b"it", b"ni", b"gg", b"ge", b"r", b" ", b"x",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let (mut hits, mut misses) = (0, 0);
        for _ in 0..20_000 {
            let mut padded = Vec::new();
            let len = next(80);
            while padded.len() < len {
                padded.extend_from_slice(pieces[next(pieces.len())]);
            }
            padded.truncate(len);
            let tail = (len + 16).max(48) - len;
            padded.extend(b"fuckshitnigafuckshitnigafuckshitnigafuckshitniga"[..tail].iter());
            let want = padded[..len]
                .windows(4)
                .any(|w| quads.iter().any(|q| &q[..4] == w));
            assert_eq!(gate.may_occur(&padded, len), want, "{:?}", &padded[..len]);
            if want { hits += 1 } else { misses += 1 }
        }
        assert!(hits > 1000 && misses > 1000, "{hits} {misses}");
        // Too short a pattern, or too many prefixes: no quad gate.
        assert!(QuadGate::new([b"fuck".as_slice(), b"ass"].into_iter()).is_none());
        let many: Vec<Vec<u8>> = (0..=MAX_QUADS as u8).map(|i| vec![b'a' + i; 4]).collect();
        assert!(QuadGate::new(many.iter().map(Vec::as_slice)).is_none());
    }

    #[test]
    fn parse_errors_name_file_and_line() {
        let mut sources = Vec::new();
        add_file(
            &mut sources,
            "en/profanity.txt",
            "# c\nfuck | high\nshit | bad\n",
        )
        .unwrap();
        let err = Lexicon::build(sources).unwrap_err().to_string();
        assert!(err.starts_with("en/profanity.txt:3:"), "{err}");
        let mut sources = Vec::new();
        add_file(&mut sources, "x.txt", "f*ck | high\n").unwrap();
        assert!(Lexicon::build(sources).is_err());
        let mut sources = Vec::new();
        add_file(&mut sources, "x.txt", "fuck | high\nFUCK | low\n").unwrap();
        assert!(
            Lexicon::build(sources)
                .unwrap_err()
                .to_string()
                .contains("duplicates line 1")
        );
    }

    #[test]
    fn boundaries_runs_allow() {
        let l = lex(&[
            ("profanity", "ass | medium\nfuck* | high\ncum* | medium\n"),
            ("allow", "cumulative\n"),
            ("threat", "kill yourself | high\n"),
        ]);
        let terms = |t: &str| {
            l.scan(t)
                .iter()
                .map(|m| m.term.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(terms("assassin class as"), Vec::<String>::new());
        assert_eq!(terms("asssss"), ["ass"]);
        assert_eq!(terms("fuuuucking"), ["fuck"]);
        assert_eq!(terms("cumulative cumming"), ["cum"]);
        assert_eq!(terms("go kill   your-self"), Vec::<String>::new());
        assert_eq!(terms("go kill   yourself"), ["kill yourself"]);
        assert_eq!(terms("#killyourself"), ["kill yourself"]);
        assert_eq!(terms("f**k"), ["fuck"]);
        let m = &l.scan("so f.u.c.k.i.n.g bad")[0];
        assert_eq!((m.start, m.end), (3, 16));
    }
}
