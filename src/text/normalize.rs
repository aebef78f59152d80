//! # Text normalization
//!
//! Takes the raw `text` of a message and gives back a [`Normalized`] form: one lowercase,
//! folded spelling with an offset map back to the ORIGINAL bytes. Called by
//! [`super::lexicon::Lexicon`] (which matches wordlists against the folded form) and, through
//! [`normalize`], by whoever needs a spelling-insensitive duplicate-message key.
//!
//! What is folded, char by char:
//! - NFKC compatibility forms (fullwidth `ｆ`, math `𝐟`, circled `ⓕ`, ligatures, superscripts),
//!   decomposed per char with the combining marks dropped (diacritics and zalgo).
//! - Case (`to_lowercase`, plus `ß → ss`).
//! - Zero-width chars, bidi controls, variation selectors, tag chars: dropped.
//! - Letters that have no compatibility mapping but look Latin: regional indicators, negative
//!   squared/circled letters, parenthesized letters, small capitals (always folded), and
//!   Cyrillic/Greek/Armenian look-alikes (folded only in a token that also holds a Latin
//!   letter or consists only of look-alikes, so real Russian or Greek words stay as they are).
//!
//! Then token by token (a token is a run of letters, digits and in-word symbols between
//! whitespace/punctuation):
//! - Leetspeak (`0→o 1→i 3→e 4→a 5→s 7→t 8→b 9→g @→a $→s`) only in tokens that hold a
//!   letter, so `2024` and `call me at 10` keep their digits; `! | +` (→ `i i t`) and the
//!   self-censoring marks `* # % ? ^` (→ `*`) only between two alphanumerics (`sh!t`, `f*ck`);
//!   apostrophes vanish (`don't → dont`).
//! - Runs of the same letter collapse to one char; the run length is kept per char so the
//!   lexicon can tell emphasis (`fuuuck` is `fuck`) from another word (`as` is not `ass`,
//!   `assess` is not `asses`).
//! - Single-letter tokens separated by at most three separator chars on one line are joined
//!   into a *chain* (`f.u.c.k`, `f u c k`, `f_u_c_k` → `fuck`); chains are recorded so the
//!   lexicon can allow word boundaries inside them.
//! - Scripts written without spaces (Han, kana, Hangul, Thai...) are joined across short
//!   separators (`傻 逼 → 傻逼`) and split from Latin text by a space.
//!
//! Tokens are joined by exactly one ASCII space; the folded text has no leading or trailing
//! space.
//!
//! Speed: most chat messages (ASCII letters, numbers, punctuation, emoji, and tokens of Han,
//! kana or Hangul) take a fast path that gives exactly what the general per-char path gives
//! (tested against it, [`Normalized::set_general`]); the rest take the general path.

use std::ops::Range;
use unicode_normalization::char::{decompose_compatible, is_combining_mark};
use wide::u8x16;

/// Longest text normalized in one go: offsets are kept as `u32`. Longer input is cut at a char
/// boundary; [`super::lexicon::Lexicon`] scans longer input in chunks.
pub const MAX_TEXT_BYTES: usize = (u32::MAX - 1) as usize;

/// [`Normalized::has`] bit: the folded text holds an ASCII digit.
pub const HAS_DIGIT: u8 = 1;
/// [`Normalized::has`] bit: the folded text holds a self-censoring `*`.
pub const HAS_STAR: u8 = 2;
/// [`Normalized::has`] bit: the folded text holds a non-ASCII char.
pub const HAS_NON_ASCII: u8 = 4;

/// Longest separator gap (in chars) across which single letters join into a chain and
/// unspaced scripts join up.
const MAX_JOIN_GAP: u32 = 3;

/// The folded form of a text and the map back to the original.
///
/// Reuse one value across messages ([`Normalized::set`]) to avoid allocation.
#[derive(Debug, Default, Clone)]
pub struct Normalized {
    /// The folded text (see the module docs); UTF-8 by construction (only whole chars are
    /// pushed).
    text: Vec<u8>,
    /// For each byte of `text`: byte offset in the original where the char it belongs to
    /// starts (always a char boundary of the original).
    starts: Vec<u32>,
    /// For each byte of `text`: byte offset in the original one past the end of the char (or
    /// run of chars) it belongs to, including dropped marks that followed it.
    ends: Vec<u32>,
    /// For each byte of `text`: how many original letters the char stands for (saturating).
    runs: Vec<u8>,
    /// Byte ranges of `text` that are joined single-letter chains (`f.u.c.k`).
    chains: Vec<(u32, u32)>,
    /// One bit per byte of `text` (bit `i % 64` of word `i / 64`): whether it is a space;
    /// exact for the first `len` bytes, zero after them in the last word. The fast path sets
    /// the bits as it writes the spaces, the general path computes them afterwards, and the
    /// lexicon lists word starts from them without reading the text again.
    spaces: Vec<u64>,
    /// How many bytes of `text` and `runs` (and of `starts`/`ends` when mapped) hold the
    /// folded text: the fast path leaves its buffers at their size and records the length
    /// here, so that the next message needs neither a resize nor a branch on one.
    len: usize,
    /// Whether `starts`/`ends` were filled (see [`Normalized::set_unmapped`]).
    mapped: bool,
    /// Which kinds of chars `text` holds (`HAS_*` bits), so the lexicon can skip automata.
    has: u8,
    /// Cache: what recent non-ASCII chars do, by [`recipe_slot`] (empty until the first).
    recipes: Vec<Recipe>,
    /// Scratch: the units of the token being read.
    units: Vec<Unit>,
    /// Scratch: lone letters waiting to be joined into a chain or emitted as words.
    letters: Vec<Letter>,
}

/// A token that folded to one letter, waiting for its neighbours.
#[derive(Debug, Clone, Copy)]
struct Letter {
    /// The folded letter.
    ch: char,
    /// Byte offset in the original where it starts.
    start: u32,
    /// Byte offset in the original one past its end.
    end: u32,
    /// The gap before it: first separator char and length.
    gap: (char, u8),
    /// Whether it joins the letter before it.
    join: bool,
}

/// What a char does in a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Whitespace: ends a token.
    Space,
    /// A line break: ends a token and prevents chain joining across it.
    Newline,
    /// Punctuation, emoji, other symbols: ends a token.
    Punct,
    /// Invisible: dropped, its bytes are attached to the previous char of the token.
    Drop,
    /// A letter (`ch` is lowercase; `alt` is the Latin look-alike or `\0`).
    Letter,
    /// An ASCII digit (`alt` is the leetspeak letter or the digit itself).
    Digit,
    /// `@`, `$`...: the leet letter `alt` anywhere in a token with letters.
    LeetAny,
    /// `!`, `|`, `+`: the leet letter `alt` only between two alphanumerics.
    LeetInner,
    /// `*`, `#`...: a self-censoring mark (`*`) only between two alphanumerics.
    Censor,
    /// An apostrophe: part of the token, emits nothing.
    Joiner,
}

/// One char (or one char of a decomposition) of the token being read.
#[derive(Debug, Clone, Copy)]
struct Unit {
    /// Byte offset in the original where it starts.
    start: u32,
    /// Byte offset in the original one past its end (grows over dropped marks).
    end: u32,
    /// The folded char; after token analysis, the char to emit or `\0` for nothing.
    ch: char,
    /// Leet letter, look-alike letter, or `\0` (see [`Kind`]).
    alt: char,
    /// What it does in the token.
    kind: Kind,
}

/// What [`Normalized::fill_simple`] did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fast {
    /// The message is folded.
    Done,
    /// The message needs the general path.
    General,
    /// The message holds Han, kana or Hangul, or a token mixing letters and digits (`5th`):
    /// run the `RICH` variant.
    Rich,
}

/// Per ASCII byte: what it does and its folded char and leet/alternative char.
#[derive(Clone, Copy)]
struct AsciiClass {
    kind: Kind,
    ch: u8,
    alt: u8,
}

const fn ascii_class(b: u8) -> AsciiClass {
    let (kind, ch, alt) = match b {
        b'\n' | 0x0b | 0x0c | b'\r' => (Kind::Newline, b' ', 0),
        b' ' | b'\t' => (Kind::Space, b' ', 0),
        0..=0x1f | 0x7f => (Kind::Drop, 0, 0),
        b'a'..=b'z' => (Kind::Letter, b, 0),
        b'A'..=b'Z' => (Kind::Letter, b + 32, 0),
        b'0' => (Kind::Digit, b, b'o'),
        b'1' => (Kind::Digit, b, b'i'),
        b'3' => (Kind::Digit, b, b'e'),
        b'4' => (Kind::Digit, b, b'a'),
        b'5' => (Kind::Digit, b, b's'),
        b'7' => (Kind::Digit, b, b't'),
        b'8' => (Kind::Digit, b, b'b'),
        b'9' => (Kind::Digit, b, b'g'),
        b'2' | b'6' => (Kind::Digit, b, b),
        b'@' => (Kind::LeetAny, 0, b'a'),
        b'$' => (Kind::LeetAny, 0, b's'),
        b'!' | b'|' => (Kind::LeetInner, 0, b'i'),
        b'+' => (Kind::LeetInner, 0, b't'),
        b'*' | b'#' | b'%' | b'?' | b'^' => (Kind::Censor, 0, b'*'),
        b'\'' | b'`' => (Kind::Joiner, 0, 0),
        _ => (Kind::Punct, 0, 0),
    };
    AsciiClass { kind, ch, alt }
}

/// What a byte is to [`Normalized::fill_simple`], which checks for `Letter` (most bytes)
/// before anything else.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Simple {
    Letter,
    Separator,
    Digit,
    Apostrophe,
    /// A mark that only counts between letters (`! | + * # % ? ^`).
    Mark,
    /// `@ $`, control chars (general path) and non-ASCII bytes (emoji and Han/kana/Hangul:
    /// fast; else general).
    Other,
}

static SIMPLE: [Simple; 256] = {
    let mut t = [Simple::Other; 256];
    let mut i = 0;
    while i < 128 {
        t[i] = match ascii_class(i as u8).kind {
            Kind::Letter => Simple::Letter,
            Kind::Digit => Simple::Digit,
            Kind::Space | Kind::Newline | Kind::Punct => Simple::Separator,
            Kind::Joiner if i as u8 == b'\'' => Simple::Apostrophe,
            Kind::LeetInner | Kind::Censor => Simple::Mark,
            _ => Simple::Other,
        };
        i += 1;
    }
    t
};

const LOW_BITS: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// Per byte of the little-endian word `v`: the high bit set where the byte is zero, all else
/// clear. Exact (no carries across bytes).
#[inline]
fn zero_bytes(v: u64) -> u64 {
    !(((v & LOW_BITS) + LOW_BITS) | v | LOW_BITS)
}

/// One bit per byte of `block` (bit `i` for byte `i`): whether it is a space. Four vector
/// compares.
#[inline]
fn space_bits(block: &[u8; PAD]) -> u64 {
    let space = u8x16::splat(b' ');
    block
        .chunks_exact(16)
        .enumerate()
        .fold(0, |bits, (k, lane)| {
            let lane = u8x16::new(lane.try_into().expect("16 bytes"));
            bits | u64::from(lane.simd_eq(space).to_bitmask()) << (16 * k)
        })
}

/// Per byte of the little-endian word `v`: the high bit set where the byte is an ASCII letter
/// ([`Simple::Letter`]), all else clear. Exact: no sum below carries out of its byte.
#[inline]
fn letter_bytes(v: u64) -> u64 {
    let folded = (v | 0x2020_2020_2020_2020) & LOW_BITS;
    let from_a = folded + 0x1f1f_1f1f_1f1f_1f1f; // high bit: folded >= b'a'
    let past_z = folded + 0x0505_0505_0505_0505; // high bit: folded > b'z'
    from_a & !past_z & !v & HIGH_BITS
}

/// For the fast path, at a mark or apostrophe whose cluster of punctuation starts at `from`
/// (the byte after it): `None` when the cluster runs into more text (`a|'aa`, `a''b`) or into
/// a non-ASCII char (`a'\u{200D}b`), a case the fast path leaves to the general one; else
/// `Some(end)`, where `end` is the first byte after the cluster (whitespace, a letter or
/// digit right after the mark, or the end), so that the marks before `end` need no check of
/// their own. A plain `!!!` or `...` before a space or the end is fine.
fn mark_cluster(bytes: &[u8], from: usize) -> Option<usize> {
    let Some(&b) = bytes.get(from) else {
        return Some(from);
    };
    if b >= 0x80 {
        return None;
    }
    if b.is_ascii_alphanumeric() || b.is_ascii_whitespace() {
        return Some(from);
    }
    let end = bytes[from..]
        .iter()
        .position(|b| !b.is_ascii_punctuation())
        .map_or(bytes.len(), |n| from + n);
    match bytes.get(end) {
        Some(b) if !b.is_ascii_whitespace() => None,
        _ => Some(end),
    }
}

static ASCII: [AsciiClass; 128] = {
    let mut t = [AsciiClass {
        kind: Kind::Punct,
        ch: 0,
        alt: 0,
    }; 128];
    let mut i = 0;
    while i < 128 {
        t[i] = ascii_class(i as u8);
        i += 1;
    }
    t
};

/// One thing a non-ASCII char does to the token being read ([`recipe`]).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    /// A letter (folded char, look-alike letter or `\0`).
    Letter(char, char),
    /// Invisible: belongs to the char before it.
    Attach,
    /// An apostrophe.
    Joiner,
    /// Ends the token (the separator char, whether a line break).
    Separator(char, bool),
    /// A leetspeak symbol for the letter.
    Leet(char),
    /// An ASCII char of its decomposition, read as that char would be.
    Ascii(u8),
}

/// Most ops a char's recipe may have ([`recipe`]); the decomposition of U+FDFA has 18 chars.
const MAX_OPS: usize = 54;

/// Most ops of a [`Recipe`] kept in the cache.
const RECIPE_OPS: usize = 4;

/// Slots of the recipe cache ([`Normalized::recipes`]).
const RECIPES: usize = 512;

/// A cached [`recipe`].
#[derive(Debug, Clone, Copy)]
struct Recipe {
    /// The char (`\0`: empty slot, never a non-ASCII char).
    c: char,
    len: u8,
    ops: [Op; RECIPE_OPS],
}

impl Recipe {
    const EMPTY: Recipe = Recipe {
        c: '\0',
        len: 0,
        ops: [Op::Attach; RECIPE_OPS],
    };
}

/// The slot of the recipe cache for `c`.
#[inline]
fn recipe_slot(c: char) -> usize {
    (u32::from(c).wrapping_mul(0x9E37_79B1) >> (32 - RECIPES.trailing_zeros())) as usize
}

/// What the non-ASCII char `c` does, op by op, into `emit`: NFKC compatibility decomposition,
/// case folding, look-alikes, leetspeak symbols, invisible chars, separators.
fn recipe(c: char, emit: &mut impl FnMut(Op)) {
    if is_plain_unspaced(c) {
        emit(Op::Letter(c, '\0'));
    } else if is_invisible(c) {
        emit(Op::Attach);
    } else if let Some(a) = fold_special(c) {
        emit(Op::Letter(char::from(a), '\0'));
    } else if is_apostrophe(c) {
        emit(Op::Joiner);
    } else if is_newline(c) {
        emit(Op::Separator('\n', true));
    } else if c.is_whitespace() {
        emit(Op::Separator(' ', false));
    } else {
        decompose_compatible(c, |d| decomposed(d, emit));
    }
}

/// [`recipe`] for one char of a compatibility decomposition.
fn decomposed(d: char, emit: &mut impl FnMut(Op)) {
    if d.is_ascii() {
        emit(Op::Ascii(d as u8));
    } else if is_invisible(d) {
        emit(Op::Attach);
    } else if let Some(a) = fold_special(d) {
        emit(Op::Letter(char::from(a), '\0'));
    } else if d.is_alphanumeric() {
        let upper = confusable(d);
        for l in d.to_lowercase() {
            if l.is_ascii() {
                emit(Op::Letter(l, '\0'));
            } else if l == 'ß' {
                emit(Op::Letter('s', '\0'));
                emit(Op::Letter('s', '\0'));
            } else if is_invisible(l) {
                emit(Op::Attach);
            } else {
                let alt = upper.or_else(|| confusable(l)).map_or('\0', char::from);
                emit(Op::Letter(l, alt));
            }
        }
    } else if let Some(a) = leet_symbol(d) {
        emit(Op::Leet(char::from(a)));
    } else if is_apostrophe(d) {
        emit(Op::Joiner);
    } else if is_newline(d) {
        emit(Op::Separator('\n', true));
    } else {
        // Whitespace, punctuation, emoji, other symbols.
        emit(Op::Separator(d, false));
    }
}

/// The eight bytes of `bytes` from `i` on, as a little-endian word; past the end, zero bytes
/// (not letters).
#[inline(always)]
fn load8(bytes: &[u8], i: usize) -> u64 {
    if let Some(b) = bytes.get(i..i + 8) {
        return u64::from_le_bytes(b.try_into().expect("eight bytes"));
    }
    let len = bytes.len();
    if len >= 8 {
        // The last eight bytes, shifted down to start at `i`.
        let last = u64::from_le_bytes(bytes[len - 8..].try_into().expect("eight bytes"));
        return last >> (8 * (i + 8 - len));
    }
    bytes[i..]
        .iter()
        .enumerate()
        .fold(0, |v, (k, &b)| v | u64::from(b) << (8 * k))
}

/// For the fast path: writes the folded char `c`, which input byte `i` stands for, at `*w`
/// (with its offsets when `MAP`) and moves `*w` on.
#[inline(always)]
fn put<const MAP: bool>(
    out: &mut [u8],
    runs: &mut [u8],
    starts: &mut [u32],
    ends: &mut [u32],
    w: &mut usize,
    i: usize,
    c: u8,
) {
    out[*w] = c;
    runs[*w] = 1;
    if MAP {
        starts[*w] = i as u32;
        ends[*w] = i as u32 + 1;
    }
    *w += 1;
}

/// For the fast path: input byte `i` repeats the char last written (before `w`): its run
/// grows and (when `MAP`) it now ends after `i`.
#[inline(always)]
fn repeat<const MAP: bool>(runs: &mut [u8], ends: &mut [u32], w: usize, i: usize) {
    runs[w - 1] = runs[w - 1].saturating_add(1);
    if MAP {
        ends[w - 1] = i as u32 + 1;
    }
}

/// For the fast path's `RICH` variant, at the start `i` of a token: when the token (a run of
/// ASCII letters and digits) mixes both, writes it as the general path does (digits as their
/// leetspeak letters, `2` and `6` as they are; runs of a letter collapse) and returns where it
/// ends; else `None`, nothing written. Leaves `last` at the last char written.
#[allow(clippy::too_many_arguments)]
#[inline]
fn mixed_token<const MAP: bool>(
    bytes: &[u8],
    i: usize,
    out: &mut [u8],
    runs: &mut [u8],
    starts: &mut [u32],
    ends: &mut [u32],
    w: &mut usize,
    last: &mut u8,
    has: &mut u8,
) -> Option<usize> {
    let mut end = i;
    let (mut letters, mut digits) = (false, false);
    while let Some(&b) = bytes.get(end) {
        letters |= b.is_ascii_alphabetic();
        digits |= b.is_ascii_digit();
        if !b.is_ascii_alphanumeric() {
            break;
        }
        end += 1;
    }
    if !(letters && digits) {
        return None;
    }
    for (j, &b) in bytes.iter().enumerate().take(end).skip(i) {
        let class = ASCII[usize::from(b)];
        let c = if class.kind == Kind::Digit {
            class.alt
        } else {
            class.ch
        };
        if c == *last && !c.is_ascii_digit() {
            repeat::<MAP>(runs, ends, *w, j);
        } else {
            put::<MAP>(out, runs, starts, ends, w, j, c);
            *last = c;
            if c.is_ascii_digit() {
                *has |= HAS_DIGIT;
            }
        }
    }
    Some(end)
}

/// [`Normalized::padded_bytes`]: bytes readable past the folded text (the fast path also
/// writes up to eight bytes past what it keeps).
pub(crate) const TAIL: usize = 16;

/// [`Normalized::padded_bytes`]: at least this many bytes, however short the text.
pub(crate) const MIN_PADDED: usize = 48;

/// [`Normalized::spaces`]: bits per word. The general path's folded text is padded with zero
/// bytes to a multiple of this, so its bits are computed 64 bytes at a time.
const PAD: usize = 64;

/// Makes `v` at least `len` long (new elements zero); never shrinks it.
fn grow<T: Copy + Default>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}

/// Emoji and pictographs that the general path treats as plain separators (no letters, no
/// compatibility decomposition, not invisible); the fast path relies on this (unit-tested).
fn is_simple_emoji(c: char) -> bool {
    matches!(c, '\u{1F300}'..='\u{1FAFF}' | '\u{2600}'..='\u{2775}' | '\u{2794}'..='\u{27BF}')
}

/// Chars that render as nothing (or only decorate their neighbour): zero-width chars, bidi
/// controls, variation selectors, tag chars, fillers, and every combining mark.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{FFF9}'..='\u{FFFB}' | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E0FFF}')
        || is_combining_mark(c)
}

/// Scripts written without spaces between words: Han, kana, Hangul, Bopomofo, Thai, Lao,
/// Khmer, Myanmar. Wordlist entries in them match as substrings.
pub fn is_unspaced(c: char) -> bool {
    // Most chars (Latin, Greek, Cyrillic...) come before the first range.
    c >= '\u{0E00}'
        && matches!(c,
        '\u{0E00}'..='\u{0EFF}' | '\u{1000}'..='\u{109F}' | '\u{1100}'..='\u{11FF}'
        | '\u{1780}'..='\u{17FF}' | '\u{2E80}'..='\u{2FDF}' | '\u{3005}'..='\u{3007}'
        | '\u{3040}'..='\u{31FF}' | '\u{3400}'..='\u{4DBF}' | '\u{4E00}'..='\u{9FFF}'
        | '\u{A960}'..='\u{A97F}' | '\u{AC00}'..='\u{D7FF}' | '\u{F900}'..='\u{FAFF}'
        | '\u{FF66}'..='\u{FFDC}' | '\u{20000}'..='\u{3FFFF}')
}

/// Unspaced-script chars that need no compatibility decomposition (most Han, Hangul
/// syllables, kana): kept as they are, which also keeps Hangul out of jamo.
fn is_plain_unspaced(c: char) -> bool {
    matches!(c,
        '\u{3040}'..='\u{30FF}' | '\u{3400}'..='\u{4DBF}' | '\u{4E00}'..='\u{9FFF}'
        | '\u{AC00}'..='\u{D7A3}' | '\u{20000}'..='\u{2F7FF}' | '\u{30000}'..='\u{3FFFF}')
}

fn is_apostrophe(c: char) -> bool {
    matches!(
        c,
        '\u{2018}' | '\u{2019}' | '\u{201B}' | '\u{2032}' | '\u{02BC}' | '\u{FF07}'
    )
}

fn is_newline(c: char) -> bool {
    matches!(c, '\u{0085}' | '\u{2028}' | '\u{2029}')
}

/// Letters folded to ASCII unconditionally: they are Latin letters in disguise with no
/// compatibility decomposition.
fn fold_special(c: char) -> Option<u8> {
    let cp = c as u32;
    let offset = |base: u32| Some(b'a' + (cp - base) as u8);
    match cp {
        // Regional indicator symbols 🇦..🇿.
        0x1F1E6..=0x1F1FF => offset(0x1F1E6),
        // Negative circled 🅐..🅩 and negative squared 🅰..🆉.
        0x1F150..=0x1F169 => offset(0x1F150),
        0x1F170..=0x1F189 => offset(0x1F170),
        // Parenthesized ⒜..⒵ (NFKC would give "(a)").
        0x249C..=0x24B5 => offset(0x249C),
        _ => match c {
            'ᴀ' | 'ɑ' | 'ᴬ' => Some(b'a'),
            'ʙ' => Some(b'b'),
            'ᴄ' => Some(b'c'),
            'ᴅ' => Some(b'd'),
            'ᴇ' => Some(b'e'),
            'ꜰ' | 'ƒ' => Some(b'f'),
            'ɢ' | 'ɡ' => Some(b'g'),
            'ʜ' => Some(b'h'),
            'ɪ' | 'ı' | 'ɩ' => Some(b'i'),
            'ᴊ' | 'ȷ' => Some(b'j'),
            'ᴋ' => Some(b'k'),
            'ʟ' => Some(b'l'),
            'ᴍ' => Some(b'm'),
            'ɴ' => Some(b'n'),
            'ᴏ' => Some(b'o'),
            'ᴘ' => Some(b'p'),
            'ʀ' => Some(b'r'),
            'ꜱ' => Some(b's'),
            'ᴛ' => Some(b't'),
            'ᴜ' => Some(b'u'),
            'ᴠ' => Some(b'v'),
            'ᴡ' => Some(b'w'),
            'ʏ' => Some(b'y'),
            'ᴢ' => Some(b'z'),
            _ => None,
        },
    }
}

/// Cyrillic, Greek and Armenian letters that look like a Latin letter (uppercase forms are
/// listed where they look different from the lowercase one).
fn confusable(c: char) -> Option<u8> {
    let a = match c {
        'А' | 'а' | 'Α' | 'α' => b'a',
        'В' | 'в' | 'Β' | 'β' | 'ь' | 'Ь' => b'b',
        'С' | 'с' | 'ς' | 'Ϲ' | 'ϲ' => b'c',
        'ԁ' => b'd',
        'Е' | 'е' | 'Ё' | 'ё' | 'Ε' | 'ε' => b'e',
        'ɡ' | 'ց' => b'g',
        'Н' | 'н' | 'Η' | 'һ' | 'հ' => b'h',
        'І' | 'і' | 'Ї' | 'ї' | 'Ι' | 'ι' | 'ӏ' | 'Ӏ' => b'i',
        'Ј' | 'ј' => b'j',
        'К' | 'к' | 'Κ' | 'κ' => b'k',
        'М' | 'м' | 'Μ' => b'm',
        'Ν' | 'η' | 'п' | 'ո' => b'n',
        'О' | 'о' | 'Ο' | 'ο' | 'օ' => b'o',
        'Р' | 'р' | 'Ρ' | 'ρ' => b'p',
        'ԛ' => b'q',
        'Ѕ' | 'ѕ' => b's',
        'Т' | 'т' | 'Τ' | 'τ' => b't',
        'υ' | 'μ' | 'ս' => b'u',
        'ν' => b'v',
        'ԝ' | 'ω' => b'w',
        'Х' | 'х' | 'Χ' | 'χ' => b'x',
        'У' | 'у' | 'Υ' | 'γ' | 'Ү' | 'ү' => b'y',
        'Ζ' => b'z',
        _ => return None,
    };
    Some(a)
}

/// Non-ASCII symbols used as letters (after compatibility decomposition).
fn leet_symbol(c: char) -> Option<u8> {
    match c {
        '€' => Some(b'e'),
        '¢' | '©' => Some(b'c'),
        '£' => Some(b'l'),
        '§' => Some(b's'),
        '®' => Some(b'r'),
        '¥' => Some(b'y'),
        _ => None,
    }
}

impl Normalized {
    /// An empty value to [`set`](Self::set) later.
    pub fn new() -> Normalized {
        Normalized::default()
    }

    /// Normalizes `text` into a new value.
    pub fn of(text: &str) -> Normalized {
        let mut n = Normalized::new();
        n.set(text);
        n
    }

    /// Normalizes `text` into `self`, reusing its buffers. Text longer than
    /// [`MAX_TEXT_BYTES`] is cut at a char boundary.
    pub fn set(&mut self, text: &str) {
        self.fill(text, true, true, usize::MAX);
    }

    /// Like [`set`](Self::set) but without the offset map ([`original_range`](
    /// Self::original_range) gives `None`): a little cheaper when only the folded text is
    /// needed (duplicate keys).
    pub fn set_unmapped(&mut self, text: &str) {
        self.fill(text, false, false, usize::MAX);
    }

    /// Like [`set`](Self::set), but the offset map is filled only where that is cheap to do
    /// at once: texts that take the general path. [`is_mapped`](Self::is_mapped) tells; when
    /// it is `false` and a match needs mapping, [`set`](Self::set) the same text again.
    pub fn set_lazy(&mut self, text: &str) {
        self.fill(text, false, true, usize::MAX);
    }

    /// Like [`set`](Self::set), for a text that [`set_lazy`](Self::set_lazy) folded
    /// without the map (the fast path), when only the folded bytes up to and including `upto`
    /// are needed: the fold may stop at the first space it writes past `upto`, which saves
    /// the rest of a long text when a match is near its start.
    pub(crate) fn set_mapped_to(&mut self, text: &str, upto: usize) {
        self.fill(text, true, true, upto);
    }

    /// Whether [`original_range`](Self::original_range) works on this value.
    pub fn is_mapped(&self) -> bool {
        self.mapped
    }

    /// Like [`set`](Self::set) but always through the general per-char path, never the
    /// fast path for common messages. The result is the same; this exists so tests and
    /// benchmarks can compare the two.
    pub fn set_general(&mut self, text: &str) {
        self.fill_general(clip(text, MAX_TEXT_BYTES), true);
    }

    /// Folds `text`; `map`: with the offset map on the fast path, `map_general`: on the
    /// general path; `upto`: see [`Normalized::fill_simple`].
    fn fill(&mut self, text: &str, map: bool, map_general: bool, upto: usize) {
        let text = clip(text, MAX_TEXT_BYTES);
        self.mapped = map;
        self.has = 0;
        self.chains.clear();
        let mut fast = if map {
            self.fill_simple::<true, false>(text, upto)
        } else {
            self.fill_simple::<false, false>(text, upto)
        };
        if fast == Fast::Rich {
            self.has = 0;
            fast = if map {
                self.fill_simple::<true, true>(text, upto)
            } else {
                self.fill_simple::<false, true>(text, upto)
            };
        }
        if fast != Fast::Done {
            self.fill_general(text, map_general);
        }
    }

    fn fill_general(&mut self, text: &str, map: bool) {
        self.mapped = map;
        self.has = 0;
        self.text.clear();
        self.starts.clear();
        self.ends.clear();
        self.runs.clear();
        self.chains.clear();
        self.units.clear();
        self.letters.clear();
        self.text.reserve(text.len());
        self.runs.reserve(text.len());
        if map {
            self.starts.reserve(text.len());
            self.ends.reserve(text.len());
        }
        let mut b = Builder {
            n: self,
            gap: 0,
            gap_first: '\0',
            gap_newline: false,
            last_unspaced: false,
            last_char: None,
            map,
        };
        b.run(text);
        self.len = self.text.len();
        grow(&mut self.text, (self.len + TAIL).next_multiple_of(PAD));
        // The padding is zero bytes (the text was cleared, then grown), never spaces.
        self.spaces.clear();
        let (blocks, _) = self.text[..self.len.next_multiple_of(PAD)].as_chunks::<PAD>();
        self.spaces.extend(blocks.iter().map(space_bits));
    }

    /// Fast path for the common message: ASCII letters and numbers, whitespace, punctuation,
    /// emoji (separators), inner apostrophes, trailing `!?*...`, no two one-letter words in a
    /// row, and (with `RICH`) tokens of Han, kana or Hangul and tokens mixing letters and
    /// digits (`5th`, `mp3`: leetspeak). Gives exactly what the general path gives, in one
    /// tight loop; for any other message it returns [`Fast::General`] (leaving garbage
    /// behind), and without `RICH`, [`Fast::Rich`] at the first Han/kana/Hangul char or
    /// mixed token: the caller runs the other variant, so the state and checks those need stay
    /// out of the loop that most messages take.
    ///
    /// Every folded char here comes from at least one byte of its own, so the folded text is
    /// never longer than the input: the buffers are grown to the input's length if need be
    /// and written by index; [`Normalized::len`] says how much was written.
    ///
    /// With `MAP`, it may stop at the first space it writes past folded byte `upto`
    /// ([`Normalized::set_mapped_to`]; `usize::MAX`: never).
    #[inline(never)]
    fn fill_simple<const MAP: bool, const RICH: bool>(&mut self, text: &str, upto: usize) -> Fast {
        let bytes = text.as_bytes();
        let len = bytes.len();
        let n = &mut *self;
        grow(&mut n.text, (len + TAIL).max(MIN_PADDED));
        grow(&mut n.runs, len + 8);
        // The folded text is never longer than the input.
        let words = len.div_ceil(PAD);
        grow(&mut n.spaces, words);
        let spaces = &mut n.spaces[..words];
        spaces.fill(0);
        if MAP {
            grow(&mut n.starts, len + 8);
            grow(&mut n.ends, len + 8);
        }
        let (out, runs) = (&mut n.text[..len + 8], &mut n.runs[..len + 8]);
        let (starts, ends): (&mut [u32], &mut [u32]) = if MAP {
            (&mut n.starts[..len + 8], &mut n.ends[..len + 8])
        } else {
            (&mut [], &mut [])
        };
        // Bytes written to each buffer.
        let mut w = 0;
        // In a token of digits.
        let mut in_number = false;
        // The last letter written in this word (`0` outside words).
        let mut last = 0u8;
        // Letters read in the current word; in a word of letters while non-zero.
        let mut word_letters = 0u32;
        let mut prev_single = false;
        // In a token of unspaced-script chars (Han, kana, Hangul; `is_plain_unspaced`).
        let mut in_unspaced = false;
        // The last char of the last token if that token was unspaced-script, else 0: the next
        // such token joins it across a short gap (`好的 没问题` → `好的没问题`).
        let mut unspaced_last = 0u32;
        // Separator chars since that token, and whether one is a line break; marks right after
        // it (`哈哈!!`) belong to the token in the general path, so they do not count.
        let mut gap = 0u32;
        let mut gap_newline = false;
        let mut in_tail = false;
        // Marks before this byte belong to a cluster already found fine (`mark_cluster`);
        // checking each mark of a long `!!!!` run again would be quadratic.
        let mut marks_checked = 0;
        let mut i = 0;
        while i < len {
            let b = bytes[i];
            let class = SIMPLE[usize::from(b)];
            if RICH
                && matches!(class, Simple::Letter | Simple::Digit)
                && word_letters == 0
                && !in_number
                && !in_unspaced
                && let Some(next) = mixed_token::<MAP>(
                    bytes, i, out, runs, starts, ends, &mut w, &mut last, &mut n.has,
                )
            {
                // A token mixing letters and digits, written whole: from here on it is a word
                // (never a one-letter one, so it takes no part in chains).
                i = next;
                word_letters = 2;
                continue;
            }
            if class == Simple::Letter {
                if in_number || in_unspaced {
                    // `10am`: the RICH variant reads such tokens whole, from their start.
                    return if RICH { Fast::General } else { Fast::Rich };
                }
                // The letters up to the next non-letter, in a loop of their own.
                let from = i;
                loop {
                    // Eight bytes at a time: the letters among them up to the first
                    // repeat are written at once, with their offsets when `MAP` (the rest
                    // of the eight bytes written is garbage that later writes overwrite or
                    // that ends up past `len`: `w <= i`).
                    let v = load8(bytes, i);
                    let lower = v | 0x2020_2020_2020_2020;
                    let letters = (!letter_bytes(v) & HIGH_BITS).trailing_zeros() / 8;
                    debug_assert!(letters > 0, "the loop is entered at a letter");
                    let repeats = zero_bytes(lower ^ (lower << 8 | u64::from(last)));
                    let fresh = letters.min(repeats.trailing_zeros() / 8) as usize;
                    out[w..w + 8].copy_from_slice(&lower.to_le_bytes());
                    runs[w..w + 8].copy_from_slice(&[1; 8]);
                    if MAP {
                        let at = i as u32;
                        let s8: [u32; 8] = std::array::from_fn(|k| at + k as u32);
                        starts[w..w + 8].copy_from_slice(&s8);
                        ends[w..w + 8].copy_from_slice(&s8.map(|x| x + 1));
                    }
                    w += fresh;
                    i += fresh;
                    if fresh < letters as usize {
                        // A repeat: the run grows (`fresh` may be 0: `a'aa`).
                        runs[w - 1] = runs[w - 1].saturating_add(1);
                        if MAP {
                            ends[w - 1] = i as u32 + 1;
                        }
                        i += 1;
                    } else if letters < 8 {
                        // The word ends inside the eight bytes (most words).
                        last = bytes[i - 1] | 0x20;
                        break;
                    }
                    last = bytes[i - 1] | 0x20;
                    match bytes.get(i) {
                        Some(&next) if SIMPLE[usize::from(next)] == Simple::Letter => {}
                        _ => break,
                    }
                }
                word_letters += (i - from) as u32;
                continue;
            }
            let next_alnum = || bytes.get(i + 1).is_some_and(u8::is_ascii_alphanumeric);
            if matches!(class, Simple::Apostrophe | Simple::Mark) && i >= marks_checked {
                match mark_cluster(bytes, i + 1) {
                    Some(end) => marks_checked = end,
                    None => return Fast::General,
                }
            }
            match class {
                Simple::Letter | Simple::Separator => {}
                Simple::Digit => {
                    if word_letters > 0 || in_unspaced {
                        return if RICH || in_unspaced {
                            Fast::General
                        } else {
                            Fast::Rich
                        };
                    }
                    n.has |= HAS_DIGIT;
                    put::<MAP>(out, runs, starts, ends, &mut w, i, b);
                    in_number = true;
                    i += 1;
                    continue;
                }
                Simple::Apostrophe if word_letters > 0 || in_number || in_unspaced => {
                    // Between letters it vanishes (`don't`); next to digits it needs leetspeak,
                    // and so do digits after an unspaced-script char (`감'3` → `감 e`).
                    if next_alnum() {
                        if in_number || in_unspaced || !bytes[i + 1].is_ascii_alphabetic() {
                            return Fast::General;
                        }
                        i += 1;
                        continue;
                    }
                }
                Simple::Mark if next_alnum() => return Fast::General,
                Simple::Apostrophe | Simple::Mark => {}
                Simple::Other if b < 0x80 => return Fast::General,
                Simple::Other => {
                    let Some(c) = text[i..].chars().next() else {
                        return Fast::General;
                    };
                    let end = i + c.len_utf8();
                    if matches!(c, '\u{200D}' | '\u{FE0F}') {
                        if in_unspaced {
                            return Fast::General;
                        }
                        // Invisible: belongs to the token it is in.
                        if MAP && (word_letters > 0 || in_number) {
                            ends[w - 1] = end as u32;
                        }
                        i = end;
                        continue;
                    }
                    if is_plain_unspaced(c) {
                        if !RICH {
                            return Fast::Rich;
                        }
                        // Written as it is; a token of its own, never glued to letters or
                        // digits (the general path would split or leet them).
                        if word_letters > 0 || in_number {
                            return Fast::General;
                        }
                        let joins = in_unspaced
                            || (unspaced_last != 0 && gap <= MAX_JOIN_GAP && !gap_newline);
                        if joins && !in_unspaced {
                            // Drop the space written after the last token.
                            w -= 1;
                            spaces[w / PAD] &= !(1 << (w % PAD));
                        }
                        let k = end - i;
                        if joins && u32::from(c) == unspaced_last {
                            // A repeat (`哈哈哈`): every byte of the char counts it.
                            for j in w - k..w {
                                runs[j] = runs[j].saturating_add(1);
                                if MAP {
                                    ends[j] = end as u32;
                                }
                            }
                        } else {
                            out[w..w + k].copy_from_slice(&bytes[i..end]);
                            runs[w..w + k].fill(1);
                            if MAP {
                                starts[w..w + k].fill(i as u32);
                                ends[w..w + k].fill(end as u32);
                            }
                            w += k;
                            unspaced_last = u32::from(c);
                        }
                        n.has |= HAS_NON_ASCII;
                        in_unspaced = true;
                        i = end;
                        continue;
                    }
                    if !is_simple_emoji(c) {
                        return Fast::General;
                    }
                    i = end - 1;
                }
            }
            // A separator.
            if word_letters > 0 || in_number || in_unspaced {
                let single = word_letters == 1;
                if single && prev_single {
                    // Possibly a `f u c k` chain.
                    return Fast::General;
                }
                prev_single = single;
                out[w] = b' ';
                runs[w] = 1;
                spaces[w / PAD] |= 1 << (w % PAD);
                if MAP {
                    let at = ends[w - 1];
                    starts[w] = at;
                    ends[w] = at;
                }
                w += 1;
                if MAP && w > upto {
                    // Enough for `set_mapped_to`.
                    n.len = w;
                    return Fast::Done;
                }
                in_number = false;
                last = 0;
                word_letters = 0;
                if in_unspaced {
                    in_unspaced = false;
                    (gap, gap_newline, in_tail) = (0, false, true);
                } else {
                    unspaced_last = 0;
                }
            }
            if unspaced_last != 0
                && !(in_tail && matches!(class, Simple::Apostrophe | Simple::Mark))
            {
                in_tail = false;
                gap += 1;
                gap_newline |= matches!(b, b'\n' | 0x0b | 0x0c | b'\r');
            }
            i += 1;
        }
        if word_letters > 0 || in_number {
            if word_letters == 1 && prev_single {
                return Fast::General;
            }
        } else if w > 0 && out[w - 1] == b' ' {
            w -= 1;
            spaces[w / PAD] &= !(1 << (w % PAD));
        }
        n.len = w;
        Fast::Done
    }

    /// The folded text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes())
            .expect("the folded text is built from whole chars. This is a bug.")
    }

    /// The folded text as bytes (what the lexicon searches).
    pub fn as_bytes(&self) -> &[u8] {
        &self.text[..self.len]
    }

    /// The folded text and at least [`TAIL`] bytes after it, [`MIN_PADDED`] bytes in all at
    /// least (whatever bytes an earlier text left there), for readers of whole blocks.
    pub(crate) fn padded_bytes(&self) -> &[u8] {
        &self.text[..(self.len + TAIL).max(MIN_PADDED)]
    }

    /// Where the folded text has spaces: one bit per byte, bit `i % 64` of word `i / 64`
    /// for byte `i`, as many words as cover [`Normalized::len`] bytes (bits past it clear).
    pub fn spaces(&self) -> &[u64] {
        &self.spaces[..self.len.div_ceil(PAD)]
    }

    /// Length of the folded text in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the folded text is empty (the input had no letters or digits).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The byte range of the original text that the folded byte range `norm` came from
    /// (char boundaries of the original), or `None` if `norm` is empty or out of bounds.
    pub fn original_range(&self, norm: Range<usize>) -> Option<Range<usize>> {
        if !self.mapped || norm.start >= norm.end || norm.end > self.len {
            return None;
        }
        Some(self.starts[norm.start] as usize..self.ends[norm.end - 1] as usize)
    }

    /// Per folded byte: how many original letters its char stands for (runs collapse).
    pub fn runs(&self) -> &[u8] {
        &self.runs[..self.len]
    }

    /// Which kinds of chars the folded text holds: [`HAS_DIGIT`] | [`HAS_STAR`] |
    /// [`HAS_NON_ASCII`].
    pub fn has(&self) -> u8 {
        self.has
    }

    /// Byte ranges of the folded text that are joined single-letter chains (`f.u.c.k`);
    /// word boundaries may fall anywhere inside one.
    pub fn chains(&self) -> &[(u32, u32)] {
        &self.chains
    }
}

/// `text` cut to at most `max` bytes at a char boundary.
pub(crate) fn clip(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The folded form of `text` (see the module docs): the key to compare messages by, so that
/// `F.U.C.K`, `ｆｕｃｋ` and `fuuuck` give the same key.
pub fn normalize(text: &str) -> String {
    thread_local! {
        // Called for every message (duplicate keys): one value per thread keeps its buffers
        // and its cache of non-ASCII chars.
        static SCRATCH: std::cell::RefCell<Normalized> = std::cell::RefCell::default();
    }
    SCRATCH.with_borrow_mut(|n| {
        n.set_unmapped(text);
        n.as_str().to_owned()
    })
}

/// The normalizer's state while it walks one text.
struct Builder<'a> {
    /// Output (and the token and pending-letter buffers).
    n: &'a mut Normalized,
    /// Separator chars since the last token.
    gap: u32,
    /// The first separator char of that gap (`\0` before any).
    gap_first: char,
    /// Whether that gap holds a line break.
    gap_newline: bool,
    /// Whether the last emitted char is of an unspaced script.
    last_unspaced: bool,
    /// The last emitted char, if nothing (no space) has been emitted after it.
    last_char: Option<char>,
    /// Whether to fill the offset map.
    map: bool,
}

impl Builder<'_> {
    fn run(&mut self, text: &str) {
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if b >= 0x80 {
                let Some(c) = text[i..].chars().next() else {
                    break;
                };
                let end = i + c.len_utf8();
                self.non_ascii(c, i as u32, end as u32);
                i = end;
                continue;
            }
            if self.n.units.is_empty() {
                match ASCII[usize::from(b)].kind {
                    Kind::Space | Kind::Punct => {
                        self.gap_char(char::from(b), false);
                        i += 1;
                        continue;
                    }
                    Kind::Newline => {
                        self.gap_char('\n', true);
                        i += 1;
                        continue;
                    }
                    Kind::Letter => {
                        if let Some(next) = self.plain_word(bytes, i) {
                            i = next;
                            continue;
                        }
                    }
                    _ => {}
                }
            }
            let pos = i as u32;
            self.ascii(b, pos, pos + 1);
            i += 1;
        }
        self.end_token();
        self.flush_letters();
    }

    /// A separator char outside any token.
    fn gap_char(&mut self, c: char, newline: bool) {
        if self.gap == 0 {
            self.gap_first = c;
        }
        self.gap = self.gap.saturating_add(1);
        self.gap_newline |= newline;
    }

    /// Fast path for the common token: ASCII letters (with inner apostrophes, `don't`) and
    /// maybe trailing `!?*#...`, ending at ASCII whitespace/punctuation or the end of the text.
    /// Emits it and returns where the text goes on, or `None` (nothing done) for any other
    /// token.
    fn plain_word(&mut self, bytes: &[u8], start: usize) -> Option<usize> {
        let mut j = start + 1;
        let mut apostrophes = false;
        loop {
            while j < bytes.len() && bytes[j].is_ascii_alphabetic() {
                j += 1;
            }
            if j + 1 < bytes.len() && bytes[j] == b'\'' && bytes[j + 1].is_ascii_alphabetic() {
                apostrophes = true;
                j += 2;
                continue;
            }
            break;
        }
        // Trailing marks that only count between letters: dropped.
        let mut k = j;
        while k < bytes.len()
            && matches!(
                bytes[k],
                b'!' | b'|' | b'+' | b'*' | b'#' | b'%' | b'?' | b'^'
            )
        {
            k += 1;
        }
        let ends = bytes.get(k).is_none_or(|&n| {
            n < 0x80
                && matches!(
                    ASCII[usize::from(n)].kind,
                    Kind::Space | Kind::Punct | Kind::Newline
                )
        });
        if !ends {
            return None;
        }
        let word = &bytes[start..j];
        if word.len() == 1 {
            let pos = start as u32;
            self.lone_letter(char::from(word[0] | 0x20), pos, pos + 1);
        } else {
            self.flush_letters();
            if !self.n.text.is_empty() {
                self.space();
            }
            let n = &mut *self.n;
            let lower = |b: u8| b | 0x20;
            if !apostrophes && word.windows(2).all(|p| lower(p[0]) != lower(p[1])) {
                // No letter repeats: one char a byte, written in bulk.
                n.text.extend(word.iter().map(|&b| lower(b)));
                n.runs.resize(n.runs.len() + word.len(), 1);
                if self.map {
                    let (from, to) = (start as u32, j as u32);
                    n.starts.extend(from..to);
                    n.ends.extend(from + 1..to + 1);
                }
                self.last_char = Some(char::from(lower(word[word.len() - 1])));
                self.last_unspaced = false;
                self.gap = 0;
                self.gap_first = '\0';
                self.gap_newline = false;
                return Some(k);
            }
            let mut last = 0u8;
            for (pos, &b) in (start as u32..).zip(word) {
                if apostrophes && b == b'\'' {
                    continue;
                }
                let c = b | 0x20;
                if c == last {
                    let k = n.text.len() - 1;
                    n.runs[k] = n.runs[k].saturating_add(1);
                    if self.map {
                        n.ends[k] = pos + 1;
                    }
                } else {
                    n.text.push(c);
                    n.runs.push(1);
                    if self.map {
                        n.starts.push(pos);
                        n.ends.push(pos + 1);
                    }
                    last = c;
                }
            }
            self.last_char = Some(char::from(last));
            self.last_unspaced = false;
        }
        self.gap = 0;
        self.gap_first = '\0';
        self.gap_newline = false;
        Some(k)
    }

    /// A token that folded to one letter: it waits in `letters` for its neighbours.
    fn lone_letter(&mut self, ch: char, start: u32, end: u32) {
        let short_gap = self.gap <= MAX_JOIN_GAP && !self.gap_newline;
        if !short_gap {
            self.flush_letters();
        }
        let gap = (self.gap_first, self.gap.min(u32::from(u8::MAX)) as u8);
        self.n.letters.push(Letter {
            ch,
            start,
            end,
            gap,
            join: false,
        });
    }

    fn ascii(&mut self, b: u8, start: u32, end: u32) {
        let class = ASCII[usize::from(b & 0x7f)];
        match class.kind {
            Kind::Space | Kind::Punct => self.separator(char::from(b), false),
            Kind::Newline => self.separator('\n', true),
            Kind::Drop => self.attach(end),
            kind => self.n.units.push(Unit {
                start,
                end,
                ch: char::from(class.ch),
                alt: char::from(class.alt),
                kind,
            }),
        }
    }

    fn non_ascii(&mut self, c: char, start: u32, end: u32) {
        // What a char does depends on the char alone: look it up in the cache of recent
        // chars, else work it out (Unicode tables: the dear part) and remember it.
        let recipes = &mut self.n.recipes;
        if recipes.is_empty() {
            recipes.resize(RECIPES, Recipe::EMPTY);
        }
        let slot = recipe_slot(c);
        let cached = recipes[slot];
        if cached.c == c {
            for &op in &cached.ops[..usize::from(cached.len)] {
                self.apply(op, start, end);
            }
            return;
        }
        let mut ops = [Op::Attach; MAX_OPS];
        let mut len = 0;
        recipe(c, &mut |op| {
            // Past `MAX_OPS` (long decompositions such as U+FDFA), the rest is dropped.
            if len < MAX_OPS {
                ops[len] = op;
                len += 1;
            }
        });
        if len <= RECIPE_OPS {
            let mut recipe = Recipe {
                c,
                len: len as u8,
                ops: [Op::Attach; RECIPE_OPS],
            };
            recipe.ops[..len].copy_from_slice(&ops[..len]);
            self.n.recipes[slot] = recipe;
        }
        for &op in &ops[..len] {
            self.apply(op, start, end);
        }
    }

    /// Does what `op` says for the original char at `start..end`.
    fn apply(&mut self, op: Op, start: u32, end: u32) {
        match op {
            Op::Letter(ch, alt) => self.letter(ch, alt, start, end),
            Op::Attach => self.attach(end),
            Op::Joiner => self.push(Kind::Joiner, '\0', '\0', start, end),
            Op::Separator(c, newline) => self.separator(c, newline),
            Op::Leet(alt) => self.push(Kind::LeetAny, '\0', alt, start, end),
            Op::Ascii(b) => self.ascii(b, start, end),
        }
    }

    fn letter(&mut self, ch: char, alt: char, start: u32, end: u32) {
        self.push(Kind::Letter, ch, alt, start, end);
    }

    fn push(&mut self, kind: Kind, ch: char, alt: char, start: u32, end: u32) {
        self.n.units.push(Unit {
            start,
            end,
            ch,
            alt,
            kind,
        });
    }

    /// An invisible char ending at `end`: it belongs to the char before it in the token.
    fn attach(&mut self, end: u32) {
        if let Some(u) = self.n.units.last_mut() {
            u.end = end;
        }
    }

    fn separator(&mut self, c: char, newline: bool) {
        self.end_token();
        self.gap_char(c, newline);
    }

    /// Decides what the units of the token just read emit, and emits them (a lone letter
    /// waits in `letters` for its neighbours).
    fn end_token(&mut self) {
        if self.n.units.is_empty() {
            return;
        }
        let units = &mut self.n.units;
        let mut has_letter = false;
        let mut has_latin = false;
        let mut all_lookalike = true;
        let mut first_alnum = usize::MAX;
        let mut last_alnum = 0;
        for (i, u) in units.iter().enumerate() {
            match u.kind {
                // Unspaced-script letters become their own word; they do not decide
                // look-alike folding for the Latin/Cyrillic/Greek part.
                Kind::Letter if is_unspaced(u.ch) => has_letter = true,
                Kind::Letter => {
                    has_letter = true;
                    if u.ch.is_ascii() {
                        has_latin = true;
                    } else if u.alt == '\0' {
                        all_lookalike = false;
                    }
                }
                Kind::Digit => {}
                _ => continue,
            }
            first_alnum = first_alnum.min(i);
            last_alnum = i;
        }
        if first_alnum == usize::MAX {
            // Only symbols: the whole token is a separator.
            let len = u32::try_from(units.len()).unwrap_or(u32::MAX);
            units.clear();
            if self.gap == 0 {
                self.gap_first = '*';
            }
            self.gap = self.gap.saturating_add(len);
            return;
        }
        let fold_lookalikes = has_latin || all_lookalike;
        let mut count = 0usize;
        let mut first = 0;
        let mut prev_unspaced = false;
        for (i, u) in units.iter_mut().enumerate() {
            let inner = first_alnum < i && i < last_alnum;
            let unspaced = u.kind == Kind::Letter && is_unspaced(u.ch);
            u.ch = match u.kind {
                // `傻*逼`: a mark after an unspaced-script letter is a separator.
                Kind::Censor if prev_unspaced => '\0',
                Kind::Letter if fold_lookalikes && u.alt != '\0' => u.alt,
                Kind::Letter => u.ch,
                Kind::Digit if has_letter => u.alt,
                Kind::Digit => u.ch,
                Kind::LeetAny if has_letter => u.alt,
                Kind::LeetInner | Kind::Censor if has_letter && inner => u.alt,
                _ => '\0',
            };
            if matches!(u.kind, Kind::Letter | Kind::Digit) {
                prev_unspaced = unspaced;
            }
            if u.ch != '\0' {
                if count == 0 {
                    first = i;
                }
                count += 1;
            }
        }
        let head = units[first];
        let short_gap = self.gap <= MAX_JOIN_GAP && !self.gap_newline;
        if count == 1 && head.ch.is_alphabetic() && !is_unspaced(head.ch) {
            // A lone letter: maybe part of `f.u.c.k`.
            units.clear();
            self.lone_letter(head.ch, head.start, head.end);
        } else {
            self.flush_letters();
            if self.n.text.is_empty() || (is_unspaced(head.ch) && self.last_unspaced && short_gap) {
                // Start of text, or unspaced script continued across a short gap.
            } else {
                self.space();
            }
            let mut units = std::mem::take(&mut self.n.units);
            for u in &units {
                if u.ch != '\0' {
                    self.emit(u.ch, u.start, u.end);
                }
            }
            units.clear();
            self.n.units = units;
        }
        self.gap = 0;
        self.gap_first = '\0';
        self.gap_newline = false;
    }

    /// Emits the pending lone letters, joining neighbours into chains. Runs of two or more
    /// equal gaps join their letters (`f.u.c.k`); a single gap joins its two letters only
    /// when neither belongs to such a run (`a f.u.c.k` → `a fuck`).
    fn flush_letters(&mut self) {
        if self.n.letters.is_empty() {
            return;
        }
        let mut letters = std::mem::take(&mut self.n.letters);
        let k = letters.len();
        let mut i = 1;
        while i < k {
            let mut j = i;
            while j + 1 < k && letters[j + 1].gap == letters[i].gap {
                j += 1;
            }
            if j > i {
                // A letter already chained leftwards does not also join this run.
                let from = if letters[i - 1].join { i + 1 } else { i };
                for l in &mut letters[from..=j] {
                    l.join = true;
                }
            } else {
                let next_is_run = j + 2 < k && letters[j + 2].gap == letters[j + 1].gap;
                letters[i].join = !letters[i - 1].join && !next_is_run;
            }
            i = j + 1;
        }
        let mut chain: Option<(u32, usize)> = None;
        for l in &letters {
            if !l.join {
                self.close_chain(chain.take());
                if !self.n.text.is_empty() {
                    self.space();
                }
                chain = Some((self.n.text.len() as u32, 0));
            }
            self.emit(l.ch, l.start, l.end);
            if let Some((_, n)) = &mut chain {
                *n += 1;
            }
        }
        self.close_chain(chain);
        letters.clear();
        self.n.letters = letters;
    }

    fn close_chain(&mut self, chain: Option<(u32, usize)>) {
        if let Some((start, n)) = chain
            && n >= 2
        {
            self.n.chains.push((start, self.n.text.len() as u32));
        }
    }

    fn space(&mut self) {
        self.n.text.push(b' ');
        self.n.runs.push(1);
        if self.map {
            let at = self.n.ends.last().copied().unwrap_or(0);
            self.n.starts.push(at);
            self.n.ends.push(at);
        }
        self.last_char = None;
    }

    fn emit(&mut self, c: char, start: u32, end: u32) {
        if c.is_ascii()
            && self
                .last_char
                .is_none_or(|last| last != c && last.is_ascii())
        {
            // The common char: one byte, no repeat, no change of script. Skipping the checks
            // below folds general-path lines ~2 % faster than running them for every char.
            self.push_byte(c as u8, has_bit(c), start, end);
            self.last_char = Some(c);
            self.last_unspaced = false;
            return;
        }
        let unspaced = is_unspaced(c);
        if let Some(last) = self.last_char {
            if last == c && !c.is_ascii_digit() {
                let n = &mut *self.n;
                let from = n.text.len() - c.len_utf8();
                for r in &mut n.runs[from..] {
                    *r = r.saturating_add(1);
                }
                if self.map {
                    for e in &mut n.ends[from..] {
                        *e = end;
                    }
                }
                return;
            }
            if unspaced != self.last_unspaced {
                self.space();
            }
        }
        let mut buf = [0; 4];
        for &b in c.encode_utf8(&mut buf).as_bytes() {
            self.push_byte(b, has_bit(c), start, end);
        }
        self.last_char = Some(c);
        self.last_unspaced = unspaced;
    }

    /// Appends byte `b` of a char that stands for the original `start..end`, with the
    /// char's [`has_bit`].
    #[inline]
    fn push_byte(&mut self, b: u8, has: u8, start: u32, end: u32) {
        let n = &mut *self.n;
        n.has |= has;
        n.text.push(b);
        n.runs.push(1);
        if self.map {
            n.starts.push(start);
            n.ends.push(end);
        }
    }
}

/// The `HAS_*` bit a folded char sets.
#[inline]
fn has_bit(c: char) -> u8 {
    match c {
        '0'..='9' => HAS_DIGIT,
        '*' => HAS_STAR,
        _ if !c.is_ascii() => HAS_NON_ASCII,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_char_boundaries() {
        assert_eq!(clip("héllo", 2), "h");
        assert_eq!(clip("héllo", 3), "hé");
        assert_eq!(clip("abc", 10), "abc");
    }

    /// Asserts that the fast path's plain variant hands each of `texts` over to the `RICH`
    /// one, and that one folds it.
    #[track_caller]
    fn assert_rich_variant_folds(texts: &[&str]) {
        let mut x = Normalized::new();
        for &text in texts {
            assert_eq!(
                x.fill_simple::<true, false>(text, usize::MAX),
                Fast::Rich,
                "{text:?}"
            );
            assert_eq!(
                x.fill_simple::<true, true>(text, usize::MAX),
                Fast::Done,
                "{text:?}"
            );
        }
    }

    #[test]
    fn mixed_tokens_take_the_fast_path() {
        assert_rich_variant_folds(&[
            "meet at 3pm",
            "an mp3 file",
            "b00bs",
            "2fa on",
            "h264 x 4x4",
        ]);
        let x = Normalized::of("b00bs at 2pm");
        assert_eq!(x.as_str(), "bobs at 2pm");
        assert_eq!(x.runs(), &[1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
        assert_eq!(x.original_range(1..2), Some(1..3));
        assert_eq!(x.has(), HAS_DIGIT);
    }

    #[test]
    fn unspaced_scripts_take_the_fast_path() {
        // What the fast path gives is compared with the general path in tests/text.rs and
        // tests/fuzz.rs; this checks that it is really taken, and left where it must be.
        assert_rich_variant_folds(&[
            "你好 the patch notes are out haha",
            "好的 没问题 ok",
            "哈哈哈哈哈!",
            "哈!! 哈",
            "こんにちは HAHA",
            "감사합니다 lol",
            "988 今天天气很好 🙂",
        ]);
        let mut x = Normalized::new();
        for text in [
            "你好fuck你",
            "fuck你",
            "哈5",
            "5哈",
            "哈!a",
            "a!哈",
            "哈\u{fe0f}",
            "감'3",
            "哈'a",
        ] {
            assert_eq!(
                x.fill_simple::<true, true>(text, usize::MAX),
                Fast::General,
                "{text:?}"
            );
        }
        let x = Normalized::of("好的 没问题 哈哈!");
        assert_eq!(x.as_str(), "好的没问题哈");
        assert_eq!(&x.runs()[15..], &[2, 2, 2]);
        assert_eq!(x.original_range(15..18), Some(17..23));
    }

    #[test]
    fn space_bits_marks_exactly_the_spaces() {
        let bytes: Vec<u8> = (0..=255u8).chain([b' '; 70]).chain(*b"a b  c d").collect();
        for block in bytes.windows(PAD) {
            let want = block
                .iter()
                .enumerate()
                .fold(0u64, |m, (i, &b)| m | u64::from(b == b' ') << i);
            assert_eq!(space_bits(block.try_into().unwrap()), want, "{block:?}");
        }
    }

    #[test]
    fn letter_and_zero_bytes_are_exact() {
        // Every byte value at every position, among neighbours of every kind.
        for fill in [0u8, b'a', b'Z', b' ', 0x7f, 0x80, 0xff] {
            for k in 0..8 {
                for b in 0..=255u8 {
                    let mut word = [fill; 8];
                    word[k] = b;
                    let v = u64::from_le_bytes(word);
                    let (letters, zeros) = (letter_bytes(v), zero_bytes(v));
                    for (j, &x) in word.iter().enumerate() {
                        let bit = |m: u64| m >> (8 * j + 7) & 1 == 1;
                        let letter = SIMPLE[usize::from(x)] == Simple::Letter;
                        assert_eq!(bit(letters), letter, "{word:?} @{j}");
                        assert_eq!(bit(zeros), x == 0, "{word:?} @{j}");
                    }
                    assert_eq!(letters & !HIGH_BITS, 0);
                    assert_eq!(zeros & !HIGH_BITS, 0);
                }
            }
        }
    }

    #[test]
    fn lazy_maps_only_the_general_path() {
        let mut lazy = Normalized::new();
        for (text, general) in [
            ("gg that was close", false),
            ("你好 3pm ok", false),
            ("f u c k off", true),
            ("ｆｕｃｋ", true),
        ] {
            lazy.set_lazy(text);
            let full = Normalized::of(text);
            assert_eq!(lazy.as_str(), full.as_str(), "{text:?}");
            assert_eq!(lazy.runs(), full.runs(), "{text:?}");
            assert_eq!(lazy.chains(), full.chains(), "{text:?}");
            assert_eq!(lazy.has(), full.has(), "{text:?}");
            assert_eq!(lazy.is_mapped(), general, "{text:?}");
            let all = 0..full.len();
            let expect = if general {
                full.original_range(all.clone())
            } else {
                None
            };
            assert_eq!(lazy.original_range(all), expect, "{text:?}");
        }
    }

    #[test]
    fn a_map_up_to_a_point_agrees_with_the_whole_map() {
        let texts = [
            "you are a fucking idiot lol and more words after it",
            "shit happens 好的 没问题 ok then",
            "fuuuck this 10am meeting, don't care",
            "abc def ghi",
            "x",
        ];
        let mut part = Normalized::new();
        for text in texts {
            let whole = Normalized::of(text);
            for upto in 0..=whole.len() {
                part.set_lazy(text);
                if part.is_mapped() {
                    continue;
                }
                part.set_mapped_to(text, upto);
                let n = upto.min(whole.len());
                assert!(part.len() >= n, "{text:?} up to {upto}");
                assert_eq!(part.as_bytes()[..n], whole.as_bytes()[..n], "{text:?}");
                assert_eq!(part.runs()[..n], whole.runs()[..n], "{text:?}");
                for i in 0..n {
                    assert_eq!(
                        part.original_range(i..i + 1),
                        whole.original_range(i..i + 1),
                        "{text:?} up to {upto} @{i}"
                    );
                }
            }
            // And `set` maps the whole text again afterwards.
            part.set(text);
            assert_eq!(part.as_bytes(), whole.as_bytes(), "{text:?}");
        }
    }

    #[test]
    fn a_reused_value_shows_only_the_last_text() {
        // The fast path keeps its buffers at their largest size: what a longer text left
        // behind must never show through a shorter one, on either path.
        let texts = [
            "a rather long message about the weather and the weekend plans",
            "ok",
            "f u c k off",
            "hi",
            "",
            "你好 3pm ok, see you at the meeting tomorrow",
            "ｆｕｃｋ",
            "yes!",
        ];
        let mut reused = Normalized::new();
        for text in texts.iter().chain(texts.iter().rev()) {
            reused.set(text);
            let fresh = Normalized::of(text);
            assert_eq!(reused.as_str(), fresh.as_str(), "{text:?}");
            assert_eq!(reused.len(), fresh.len(), "{text:?}");
            assert_eq!(reused.is_empty(), fresh.is_empty(), "{text:?}");
            assert_eq!(reused.runs(), fresh.runs(), "{text:?}");
            assert_eq!(reused.spaces(), fresh.spaces(), "{text:?}");
            for end in 0..=fresh.len() + 1 {
                assert_eq!(
                    reused.original_range(0..end),
                    fresh.original_range(0..end),
                    "{text:?} 0..{end}"
                );
            }
        }
        assert_eq!(normalize("Hello  World"), "helo world");
    }

    #[track_caller]
    fn n(s: &str) -> String {
        normalize(s)
    }

    #[test]
    fn folds() {
        assert_eq!(n("Hello,  World!"), "helo world");
        assert_eq!(n("ｆｕｃｋ"), "fuck");
        assert_eq!(n("𝐟𝐮𝐜𝐤"), "fuck");
        assert_eq!(n("ⓕⓤⓒⓚ"), "fuck");
        assert_eq!(n("🇫🇺🇨🇰"), "fuck");
        assert_eq!(n("fυсk"), "fuck");
        assert_eq!(n("привет"), "привет");
        assert_eq!(n("f\u{200b}u\u{200d}ck"), "fuck");
        assert_eq!(n("f\u{0336}u\u{0336}c\u{0336}k\u{0336}"), "fuck");
        assert_eq!(n("Crème brûlée"), "creme brule");
        assert_eq!(n("Straße"), "strase");
    }

    #[test]
    fn leet_only_in_words() {
        assert_eq!(n("sh1t"), "shit");
        assert_eq!(n("$h!t"), "shit");
        assert_eq!(n("I have 3 cats"), "i have 3 cats");
        assert_eq!(n("2024"), "2024");
        assert_eq!(n("wow!!!"), "wow");
        assert_eq!(n("f*ck"), "f*ck");
        assert_eq!(n("*fuck*"), "fuck");
        assert_eq!(n("don't"), "dont");
    }

    #[test]
    fn runs_and_chains() {
        let x = Normalized::of("fuuuuck");
        assert_eq!(x.as_str(), "fuck");
        assert_eq!(x.runs(), &[1, 4, 1, 1]);
        assert_eq!(x.original_range(0..4), Some(0..7));
        let x = Normalized::of("a f.u.c.k.i.n.g idiot");
        assert_eq!(x.as_str(), "a fucking idiot");
        assert_eq!(x.chains(), &[(2, 9)]);
        assert_eq!(x.original_range(2..9), Some(2..15));
        assert_eq!(n("you are a f u c k i n g idiot"), "you are afucking idiot");
        assert_eq!(n("f u c k you"), "fuck you");
        assert_eq!(n("你 是 傻 逼 bitch"), "你是傻逼 bitch");
        assert_eq!(n("你是bitch"), "你是 bitch");
        assert_eq!(n("傻*逼"), "傻逼");
        assert_eq!(n("f.u.c.k.i.n.g i d i o t"), "fucking idiot");
    }

    #[test]
    fn simple_emoji_are_separators_in_the_general_path() {
        for c in ('\u{2600}'..='\u{2775}')
            .chain('\u{2794}'..='\u{27BF}')
            .chain('\u{1F300}'..='\u{1FAFF}')
        {
            let text = format!("ab{c}cd");
            let n = Normalized::of(&text);
            // The general path must split the word here, like the fast path does.
            let mut g = Normalized::new();
            g.set_general(&text);
            assert_eq!(g.as_str(), "ab cd", "{c:?} U+{:04X}", c as u32);
            assert_eq!(n.as_str(), g.as_str());
        }
    }

    #[test]
    fn never_empty_ranges() {
        for s in ["", " ", "!!!", "\u{301}\u{301}", "\u{200b}"] {
            let x = Normalized::of(s);
            assert!(x.is_empty(), "{s:?} -> {:?}", x.as_str());
        }
    }
}
