//! Text stage: normalization and the keyword lexicon.
//!
//! Run with `cargo test --test tests text::`. Fixture files live in `tests/data/text/`:
//! `positive.txt` (`CATEGORY<TAB>line`, must be flagged with that category), `negative.txt`
//! (tricky lines that must not be flagged) and `safe.txt` (ordinary chat, must not be
//! flagged). Fixture tests collect every failure and panic once with the full list.

use chatguard::text::Match;
use chatguard::text::lexicon::{Lexicon, LexiconError, Scratch};
use chatguard::text::normalize::{Normalized, normalize};

const POSITIVE: &str = include_str!("data/text/positive.txt");
const NEGATIVE: &str = include_str!("data/text/negative.txt");
const SAFE: &str = include_str!("data/text/safe.txt");

fn lex() -> Lexicon {
    Lexicon::embedded().expect("the embedded wordlists build")
}

/// Non-blank, non-comment lines of a fixture file with their line numbers.
fn lines(file: &str) -> impl Iterator<Item = (usize, &str)> {
    file.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
}

fn describe(text: &str, matches: &[Match]) -> String {
    matches
        .iter()
        .map(|m| format!("{}:{:?}={:?}", m.category, m.term, &text[m.start..m.end]))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Offsets are on char boundaries of the original, in order, and char offsets agree with byte
/// offsets.
fn check_offsets(text: &str, matches: &[Match]) -> Result<(), String> {
    let mut last_start = 0;
    for m in matches {
        if !(m.start < m.end && m.end <= text.len()) {
            return Err(format!("bad range {}..{} for {:?}", m.start, m.end, m.term));
        }
        if !text.is_char_boundary(m.start) || !text.is_char_boundary(m.end) {
            return Err(format!("{}..{} not on char boundaries", m.start, m.end));
        }
        if m.start < last_start {
            return Err("matches not sorted by start".into());
        }
        last_start = m.start;
        if m.start_char != text[..m.start].chars().count()
            || m.end_char != text[..m.end].chars().count()
        {
            return Err(format!(
                "char offsets {}..{} disagree",
                m.start_char, m.end_char
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Table-driven cases (aho-corasick `t!` style): text → expected (category, original spelling).

struct Case {
    name: &'static str,
    text: &'static str,
    want: &'static [(&'static str, &'static str)],
}

macro_rules! t {
    ($name:ident, $text:expr, [$(($cat:expr, $spelling:expr)),* $(,)?]) => {
        Case { name: stringify!($name), text: $text, want: &[$(($cat, $spelling)),*] }
    };
}

const CASES: &[Case] = &[
    t!(empty, "", []),
    t!(clean, "hello there, how are you?", []),
    t!(plain, "fuck", [("profanity", "fuck")]),
    t!(upper, "FUCK", [("profanity", "FUCK")]),
    t!(prefix_widened, "fucking hell", [("profanity", "fucking")]),
    t!(
        substring_widened,
        "unfuckingbelievable",
        [("profanity", "unfuckingbelievable")]
    ),
    t!(
        dotted,
        "f.u.c.k you",
        [("insult", "f.u.c.k you"), ("profanity", "f.u.c.k")]
    ),
    t!(
        dotted_chain_after_word,
        "you are a f.u.c.k.i.n.g idiot",
        [("profanity", "f.u.c.k.i.n.g"), ("insult", "idiot"),]
    ),
    t!(
        spaced_chain_after_a,
        "you are a f u c k i n g idiot",
        [("profanity", "f u c k i n g"), ("insult", "idiot"),]
    ),
    t!(
        spaced_chain_suffix,
        "u r a b i t c h",
        [("insult", "b i t c h")]
    ),
    t!(underscores, "f_u_c_k", [("profanity", "f_u_c_k")]),
    t!(repeats, "fuuuuuck", [("profanity", "fuuuuuck")]),
    t!(repeats_need_the_entry_run, "as far as I know", []),
    t!(double_letter_entry, "asssss", [("profanity", "asssss")]),
    t!(censored_one, "f*ck", [("profanity", "f*ck")]),
    t!(censored_two, "f**k", [("profanity", "f**k")]),
    t!(censored_all_inner, "b***h", [("insult", "b***h")]),
    t!(bang_leet, "sh!t", [("profanity", "sh!t")]),
    t!(dollar_leet, "$hit", [("profanity", "$hit")]),
    t!(digit_leet, "sh1t", [("profanity", "sh1t")]),
    t!(
        trailing_bang_is_punctuation,
        "shit!!!",
        [("profanity", "shit")]
    ),
    t!(
        numbers_stay_numbers,
        "I have 3 cats and 5 dogs, call me at 10",
        []
    ),
    t!(cyrillic, "fυсk", [("profanity", "fυсk")]),
    t!(russian_stays_russian, "привет, как дела", []),
    t!(fullwidth, "ｆｕｃｋ", [("profanity", "ｆｕｃｋ")]),
    t!(math_bold, "𝐟𝐮𝐜𝐤", [("profanity", "𝐟𝐮𝐜𝐤")]),
    t!(circled, "ⓕⓤⓒⓚ", [("profanity", "ⓕⓤⓒⓚ")]),
    t!(regional, "🇫🇺🇨🇰", [("profanity", "🇫🇺🇨🇰")]),
    t!(
        zero_width,
        "f\u{200b}u\u{200d}c\u{2060}k",
        [("profanity", "f\u{200b}u\u{200d}c\u{2060}k")]
    ),
    t!(
        bidi,
        "\u{202e}fuck\u{202c}",
        [("profanity", "fuck\u{202c}")]
    ),
    t!(
        zalgo_marks_covered,
        "fu\u{0336}c\u{0334}k\u{0335}\u{0321} off",
        [
            ("insult", "fu\u{0336}c\u{0334}k\u{0335}\u{0321} off"),
            ("profanity", "fu\u{0336}c\u{0334}k\u{0335}\u{0321}"),
        ]
    ),
    t!(accents, "fück", [("profanity", "fück")]),
    t!(scunthorpe, "I live in Scunthorpe", []),
    t!(assassin, "the assassin's class", []),
    t!(allowlist_prefix, "cumulative", []),
    t!(allowlist_phrase, "I'll shoot you an email", []),
    t!(
        threat_not_allowed,
        "I'll shoot you",
        [("threat", "I'll shoot you")]
    ),
    t!(
        phrase_spaces,
        "kill    yourself",
        [("threat", "kill    yourself")]
    ),
    t!(
        phrase_punctuation,
        "kill.your-self",
        [("threat", "kill.your-self")]
    ),
    t!(phrase_joined, "#killyourself", [("threat", "killyourself")]),
    t!(phrase_star, "k*ll yourself", [("threat", "k*ll yourself")]),
    t!(kys_chain, "k y s", [("threat", "k y s")]),
    t!(self_harm, "i want to die", [("self_harm", "i want to die")]),
    t!(
        scam,
        "send me your password",
        [("scam", "send me your password")]
    ),
    t!(cjk_substring, "你是傻逼吗", [("insult", "傻逼")]),
    t!(cjk_spaced, "你是傻 逼吗", [("insult", "傻 逼")]),
    t!(cjk_censored, "傻*逼", [("insult", "傻*逼")]),
    t!(cjk_next_to_latin, "你是bitch", [("insult", "bitch")]),
    t!(
        latin_inside_cjk_is_a_word,
        "你好fuck你",
        [("profanity", "fuck")]
    ),
    t!(
        longer_same_category_wins,
        "motherfucker",
        [("insult", "motherfucker"), ("profanity", "motherfucker"),]
    ),
];

#[test]
fn table() {
    let lex = lex();
    let mut failures = Vec::new();
    for case in CASES {
        let got = lex.scan(case.text);
        if let Err(e) = check_offsets(case.text, &got) {
            failures.push(format!("{}: {e}", case.name));
        }
        let got_pairs: Vec<(&str, &str)> = got
            .iter()
            .map(|m| (&*m.category, &case.text[m.start..m.end]))
            .collect();
        if got_pairs != case.want {
            failures.push(format!(
                "{}: {:?}\n    want {:?}\n    got  {:?}",
                case.name, case.text, case.want, got_pairs
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Normalization.

const NORMALIZE: &[(&str, &str)] = &[
    ("", ""),
    ("   ", ""),
    ("Hello,   World!", "helo world"),
    ("F.U.C.K", "fuck"),
    ("ｆｕｃｋ", "fuck"),
    ("fuuuuck", "fuck"),
    ("I have 3 cats", "i have 3 cats"),
    ("2024", "2024"),
    ("sh1t", "shit"),
    ("don't", "dont"),
    ("Crème Brûlée", "creme brule"),
    ("你 是 傻 逼", "你是傻逼"),
    ("你是bitch", "你是 bitch"),
    ("привет", "привет"),
    ("рussy", "pusy"),
];

#[test]
fn normalize_table() {
    let failures: Vec<String> = NORMALIZE
        .iter()
        .filter(|(input, want)| normalize(input) != *want)
        .map(|(input, want)| format!("{input:?}: want {want:?}, got {:?}", normalize(input)))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn normalize_is_a_stable_key() {
    let spellings = [
        "fuck",
        "F U C K",
        "f.u.c.k",
        "ｆｕｃｋ",
        "fuuuuck",
        "FUCK!!!",
        "fυсk",
    ];
    for s in spellings {
        assert_eq!(normalize(s), "fuck", "{s:?}");
    }
}

#[test]
fn offset_map_points_into_the_original() {
    let text = "Oh  f.u.c.k  😀 ｙｏｕ";
    let n = Normalized::of(text);
    assert_eq!(n.as_str(), "oh fuck you");
    assert_eq!(n.original_range(3..7).map(|r| &text[r]), Some("f.u.c.k"));
    assert_eq!(n.original_range(8..11).map(|r| &text[r]), Some("ｙｏｕ"));
    assert_eq!(n.original_range(0..0), None);
    assert_eq!(n.original_range(0..100), None);
}

// ---------------------------------------------------------------------------------------------
// Fixture files.

#[test]
fn positive_fixture() {
    let lex = lex();
    let mut scratch = Scratch::default();
    let mut out = Vec::new();
    let mut failures = Vec::new();
    let mut count = 0;
    for (no, line) in lines(POSITIVE) {
        let Some((category, text)) = line.split_once('\t') else {
            failures.push(format!("line {no}: no TAB"));
            continue;
        };
        count += 1;
        lex.scan_into(text, &mut scratch, &mut out);
        if let Err(e) = check_offsets(text, &out) {
            failures.push(format!("line {no}: {text:?}: {e}"));
        }
        if !out.iter().any(|m| &*m.category == category) {
            failures.push(format!(
                "line {no}: want {category}: {text:?} (normalized {:?}) got [{}]",
                normalize(text),
                describe(text, &out)
            ));
        }
    }
    assert!(count >= 500, "only {count} positive lines");
    assert!(
        failures.is_empty(),
        "{} of {count} positive lines failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn assert_clean(name: &str, file: &str, min_lines: usize) {
    let lex = lex();
    let mut scratch = Scratch::default();
    let mut out = Vec::new();
    let mut failures = Vec::new();
    let mut count = 0;
    for (no, text) in lines(file) {
        count += 1;
        lex.scan_into(text, &mut scratch, &mut out);
        if !out.is_empty() {
            failures.push(format!(
                "line {no}: {text:?} (normalized {:?}) got [{}]",
                normalize(text),
                describe(text, &out)
            ));
        }
    }
    assert!(count >= min_lines, "only {count} {name} lines");
    assert!(
        failures.is_empty(),
        "{} of {count} {name} lines were flagged:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn negative_fixture() {
    assert_clean("negative", NEGATIVE, 150);
}

#[test]
fn safe_fixture() {
    assert_clean("safe", SAFE, 250);
}

// ---------------------------------------------------------------------------------------------
// Matches, dedup, offsets.

#[test]
fn match_fields() {
    let text = "héllo, f.u.c.k you";
    let ms = lex().scan(text);
    let m = ms
        .iter()
        .find(|m| &*m.category == "profanity")
        .expect("profanity match");
    assert_eq!(&*m.term, "fuck");
    assert_eq!(&text[m.start..m.end], "f.u.c.k");
    assert_eq!((m.start, m.end), (8, 15));
    assert_eq!((m.start_char, m.end_char), (7, 14));
    let insult = ms
        .iter()
        .find(|m| &*m.category == "insult")
        .expect("insult");
    assert_eq!(&*insult.term, "fuck you");
    assert_eq!(insult.severity.as_str(), "medium");
}

#[test]
fn terms_are_spelled_out() {
    let ms = lex().scan("assssss");
    assert_eq!(ms.len(), 1);
    assert_eq!(&*ms[0].term, "ass");
}

#[test]
fn sub_labels_come_through() {
    let ms = lex().scan("you fag");
    assert_eq!(ms.len(), 1);
    assert_eq!(ms[0].sub.as_deref(), Some("homophobic"));
    assert_eq!(ms[0].severity.as_str(), "high");
}

#[test]
fn scan_into_reuses_buffers_and_agrees_with_scan() {
    let lex = lex();
    let mut scratch = Scratch::default();
    let mut out = Vec::new();
    for (_, line) in lines(POSITIVE).chain(lines(SAFE)) {
        let text = line.split_once('\t').map_or(line, |(_, t)| t);
        lex.scan_into(text, &mut scratch, &mut out);
        assert_eq!(out, lex.scan(text), "{text:?}");
    }
}

#[test]
fn large_input() {
    let lex = lex();
    let mut text = String::new();
    for i in 0..20_000 {
        text.push_str(if i % 1000 == 999 {
            "go f.u.c.k yourself 你是傻逼\n"
        } else {
            "hello 世界 🙂 ok\n"
        });
    }
    let ms = lex.scan(&text);
    check_offsets(&text, &ms).expect("offsets");
    assert_eq!(ms.iter().filter(|m| &*m.term == "傻逼").count(), 20);
    assert_eq!(
        ms.iter().filter(|m| &*m.term == "go fuck yourself").count(),
        20
    );
    // Only combining marks: nothing to match, nothing to panic on.
    let marks = "a".to_string() + &"\u{0301}".repeat(100_000);
    assert!(lex.scan(&marks).is_empty());
}

/// [`Normalized::spaces`] of folded `bytes`, byte by byte.
fn space_bits(bytes: &[u8]) -> Vec<u64> {
    let mut bits = vec![0u64; bytes.len().div_ceil(64)];
    for (i, _) in bytes.iter().enumerate().filter(|&(_, &b)| b == b' ') {
        bits[i / 64] |= 1 << (i % 64);
    }
    bits
}

/// Asserts that the fast path (mapped, unmapped, lazy, and lazy into a reused value) folds
/// `text` exactly like the general path: folded text, runs, chains, `has` bits, space bits and
/// the offset of every folded byte.
pub(crate) fn check_fast_path(text: &str) {
    let mut general = Normalized::new();
    general.set_general(text);
    let mapped = Normalized::of(text);
    let mut unmapped = Normalized::new();
    unmapped.set_unmapped(text);
    let mut lazy = Normalized::new();
    lazy.set_lazy(text);
    // One value reused across calls too: what earlier texts left in its buffers must not
    // show through.
    thread_local! {
        static REUSED: std::cell::RefCell<Normalized> = std::cell::RefCell::default();
    }
    let reused = REUSED.with_borrow_mut(|reused| {
        reused.set_lazy(text);
        reused.clone()
    });
    let want_spaces = space_bits(general.as_bytes());
    for fast in [&mapped, &unmapped, &lazy, &reused] {
        assert_eq!(fast.as_str(), general.as_str(), "{text:?}");
        assert_eq!(fast.runs(), general.runs(), "{text:?}");
        assert_eq!(fast.chains(), general.chains(), "{text:?}");
        assert_eq!(fast.has(), general.has(), "{text:?}");
        assert_eq!(fast.spaces(), want_spaces, "{text:?}");
    }
    assert_eq!(general.spaces(), want_spaces, "{text:?}");
    for i in 0..general.len() {
        assert_eq!(
            mapped.original_range(i..i + 1),
            general.original_range(i..i + 1),
            "{text:?} @{i}"
        );
    }
    assert_eq!(unmapped.original_range(0..1), None);
}

#[test]
fn fast_path_agrees_with_general_path() {
    let extra = [
        "don't do that!!",
        "'quoted' words",
        "rock'n'roll",
        "what?why",
        "hi!you",
        "a b",
        "I a",
        "x'",
        "lol!!! ok?? fine...",
        "f*ck",
        "f u c k",
        "aaa bbb",
        "Hello\nWorld",
        "it's 5pm",
        "90's",
        "a'1",
        "1*2",
        "10!",
        "'90",
        "1\u{200d}2",
        "ab\u{200d}cd 😀\u{fe0f}",
        "ok 👍🏽 ok",
        "x ❤️ y",
        "a 😀 b",
        "  leading and trailing  ",
        "",
        "!!!",
        "a",
        "ab'",
        "'em",
        // Unspaced scripts (Han, kana, Hangul) take the fast path too.
        "你好 the patch notes are out haha",
        "好的 没问题 ok",
        "好的, 没问题",
        "好的...  没问题",
        "好的\n没问题",
        "哈哈哈哈哈!",
        "哈 哈",
        "哈!! 哈",
        "哈! ! 哈",
        "哈 !! 哈",
        "哈 !!! 哈",
        "哈 '' 哈",
        "哈'a",
        "哈'a b",
        "b 哈'a",
        "a 哈 b",
        "哈 a 哈",
        "哈 5 哈",
        "988 今天天气很好 lol",
        "哈🙂哈",
        "哈 🙂\u{fe0f} 哈",
        "哈\u{fe0f}",
        "哈\u{200d}哈",
        "你好fuck你 :) 😎",
        "fuck你",
        "哈5",
        "5哈",
        "哈!a",
        "감'3",
        "감'a",
        "哈*哈",
        "哈!哈",
        "a!哈",
        "こんにちは HAHA",
        "감사합니다 lol",
        "\u{20000}\u{20000} 𠀀",
        "゛゜ ゛",
        "哈，哈",
        "操你妈 tbh",
        // Tokens mixing letters and digits (leetspeak) take the fast path too.
        "meet at 3pm",
        "b00bs",
        "a4",
        "a4 b",
        "4 b c",
        "5th's",
        "th5's",
        "5th'9",
        "5th'sa5",
        "ab'c5",
        "226a",
        "a22",
        "ss5s",
        "5\u{200d}th",
        "h4x\u{200d} ok",
        "10am meeting",
        "2fa 哈",
        "哈 2fa",
    ];
    let all = lines(SAFE)
        .chain(lines(NEGATIVE))
        .map(|(_, l)| l)
        .chain(lines(POSITIVE).map(|(_, l)| l.split_once('\t').map_or(l, |(_, t)| t)))
        .chain(extra);
    for text in all {
        check_fast_path(text);
    }
    // Long runs of marks: each ending in a space, the end of the text, or more text.
    let run = "!".repeat(50_000);
    for text in [
        format!("wow{run} ok"),
        format!("wow{run}"),
        format!("sh{run}'t"),
        format!("a{run}.{run}b"),
    ] {
        check_fast_path(&text);
    }
}

/// Calls `check` on every string of 1 to `max` pieces of `pieces` (repeats allowed), each
/// followed by `tail`.
fn for_every_mix(pieces: &[&str], max: usize, tail: &str, mut check: impl FnMut(&str)) {
    let mut text = String::new();
    let mut idx = vec![0usize; max];
    for len in 1..=max {
        idx.fill(0);
        loop {
            text.clear();
            for &k in &idx[..len] {
                text.push_str(pieces[k]);
            }
            text.push_str(tail);
            check(&text);
            // Next combination, like an odometer.
            let mut d = 0;
            while d < len {
                idx[d] += 1;
                if idx[d] < pieces.len() {
                    break;
                }
                idx[d] = 0;
                d += 1;
            }
            if d == len {
                break;
            }
        }
    }
}

/// Every mix of up to four pieces from an alphabet around the Han/kana/Hangul and letter-digit
/// parts of the fast path (tokens gluing, gaps of 1–4 separators, marks after a token, repeats
/// across a gap, `a5`, `5bc`).
#[test]
fn fast_path_agrees_on_every_short_mix() {
    const PIECES: &[&str] = &[
        "哈", "好", "a", "bc", "5", " ", "   ", "!", "'", "*", ".", "\n", "🙂", "\u{fe0f}",
        "\u{200d}",
    ];
    for_every_mix(PIECES, 4, "", check_fast_path);
}

/// Same, for runs of letters, which the unmapped fast path reads eight bytes at a time: every
/// mix of up to 6 of `a A b 5 ' bAbAb` and space, then spaces (so every position of the mix has
/// eight bytes after it): repeats at every place in and across the eight, case, words longer
/// than eight, a digit after letters, an apostrophe inside a word, one-letter words.
#[test]
fn fast_path_agrees_on_every_short_letter_run() {
    const PIECES: &[&str] = &["a", "A", "b", "5", " ", "'", "bAbAb"];
    for_every_mix(PIECES, 6, "        ", check_fast_path);
}

// ---------------------------------------------------------------------------------------------
// Property-style: random mixes never panic and always give valid offsets.

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const PIECES: &[&str] = &[
    "a",
    "e",
    "i",
    "o",
    "u",
    "s",
    "t",
    "k",
    "f",
    "c",
    "h",
    "n",
    "g",
    "A",
    "Z",
    " ",
    " ",
    "  ",
    ".",
    "_",
    "-",
    "*",
    "!",
    "@",
    "$",
    "'",
    "1",
    "3",
    "0",
    "5",
    "7",
    "\n",
    "\t",
    "fuck",
    "shit",
    "kill yourself",
    "ass",
    "nigger",
    "cum",
    "laude",
    "傻",
    "逼",
    "你",
    "好",
    "한",
    "グ",
    "ｆ",
    "𝐟",
    "ⓚ",
    "🇫",
    "🅰",
    "ᴀ",
    "а",
    "о",
    "с",
    "ο",
    "ß",
    "İ",
    "ﬁ",
    "ﷺ",
    "½",
    "\u{0301}",
    "\u{0336}",
    "\u{20DD}",
    "\u{200b}",
    "\u{200d}",
    "\u{202e}",
    "\u{2066}",
    "\u{FE0F}",
    "\u{E0041}",
    "\u{00AD}",
    "😀",
    "👨‍👩‍👧",
    "🏳️‍🌈",
    "\u{10FFFF}",
    "\u{FFFD}",
    "\u{0}",
    "\u{7f}",
    "\u{85}",
    "\u{2028}",
    "ǅ",
    "ﾞ",
    "ｶﾞ",
    "㈱",
    "㍿",
    "\u{1D173}",
];

#[test]
fn random_inputs_never_panic_and_offsets_are_valid() {
    let lex = lex();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut scratch = Scratch::default();
    let mut out = Vec::new();
    let mut text = String::new();
    let mut flagged = 0;
    for round in 0..20_000 {
        text.clear();
        let len = rng.below(if round % 100 == 0 { 400 } else { 40 });
        for _ in 0..len {
            if rng.below(8) == 0 {
                // Any scalar value at all.
                let c = char::from_u32(rng.next() as u32 % 0x11_0000).unwrap_or('\u{FFFD}');
                text.push(c);
            } else {
                text.push_str(PIECES[rng.below(PIECES.len())]);
            }
        }
        lex.scan_into(&text, &mut scratch, &mut out);
        if let Err(e) = check_offsets(&text, &out) {
            panic!("{text:?}: {e}: [{}]", describe(&text, &out));
        }
        flagged += usize::from(!out.is_empty());
        let n = Normalized::of(&text);
        assert!(
            !n.as_str().starts_with(' ') && !n.as_str().ends_with(' '),
            "{text:?}"
        );
        check_fast_path(&text);
        for (i, _) in n.as_str().char_indices() {
            let r = n.original_range(i..i + 1).expect("in range");
            assert!(r.start <= r.end && r.end <= text.len(), "{text:?}");
            assert!(
                text.is_char_boundary(r.start) && text.is_char_boundary(r.end),
                "{text:?}"
            );
        }
        let key = normalize(&text);
        assert!(
            !key.contains("  ") && !key.bytes().any(|b| b.is_ascii_uppercase()),
            "{key:?}"
        );
    }
    assert!(
        flagged > 1000,
        "the generator should hit the lexicon often ({flagged})"
    );
}

// ---------------------------------------------------------------------------------------------
// Building lexicons.

#[test]
fn embedded_lists_have_the_expected_scale() {
    let lex = lex();
    let cats = lex.categories();
    for want in [
        "profanity",
        "insult",
        "sexual",
        "hate",
        "threat",
        "self_harm",
        "scam",
    ] {
        let n = cats
            .iter()
            .find(|(c, _)| &**c == want)
            .map_or(0, |(_, n)| *n);
        assert!(n >= 150, "{want}: only {n} entries");
    }
    assert!(lex.len() >= 1500);
    assert!(lex.allow_len() >= 50);
}

#[test]
fn from_dir_loads_the_same_lists() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("wordlists");
    let from_dir = Lexicon::from_dir(&dir).expect("wordlists/ loads");
    let embedded = lex();
    assert_eq!(from_dir.len(), embedded.len());
    assert_eq!(from_dir.allow_len(), embedded.allow_len());
    assert_eq!(from_dir.categories(), embedded.categories());
    let text = "you are a f.u.c.k.i.n.g idiot, kill yourself";
    assert_eq!(from_dir.scan(text), embedded.scan(text));
}

#[test]
fn bad_entries_name_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("en")).expect("mkdir");
    std::fs::write(
        dir.path().join("en/insult.txt"),
        "# comment\nidiot | low\nmoron | terrible\n",
    )
    .expect("write");
    let err = Lexicon::from_dir(dir.path()).expect_err("bad severity");
    assert!(matches!(err, LexiconError::Entry { line: 3, .. }), "{err}");
    assert!(err.to_string().starts_with("en/insult.txt:3:"), "{err}");

    std::fs::write(dir.path().join("en/insult.txt"), "f*ck | high\n").expect("write");
    let err = Lexicon::from_dir(dir.path()).expect_err("inner star");
    assert!(err.to_string().contains("en/insult.txt:1:"), "{err}");

    let empty = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        Lexicon::from_dir(empty.path()),
        Err(LexiconError::Empty(_))
    ));
    assert!(matches!(
        Lexicon::from_dir(&empty.path().join("missing")),
        Err(LexiconError::Io { .. })
    ));
}

#[test]
fn with_extra_adds_entries_and_allows() {
    let lex = lex();
    let extra = lex
        .with_extra(&[
            (
                "frobnicat* | high | custom".to_string(),
                "insult".to_string(),
            ),
            ("frobnicator".to_string(), "allow".to_string()),
        ])
        .expect("extras build");
    assert_eq!(extra.len(), lex.len() + 1);
    let ms = extra.scan("you frobnicating f r o b n i c a t e");
    assert_eq!(ms.len(), 2, "{ms:?}");
    assert_eq!(ms[0].sub.as_deref(), Some("custom"));
    assert!(extra.scan("the frobnicator").is_empty());
    assert!(
        lex.scan("you frobnicating").is_empty(),
        "the original is unchanged"
    );
    let err = lex
        .with_extra(&[("x | high".to_string(), "Bad Name".to_string())])
        .expect_err("bad category");
    assert!(matches!(err, LexiconError::Category(_)));
}

#[test]
fn lexicon_is_a_cheap_shared_handle() {
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync::<Lexicon>();
    let lex = lex();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let lex = lex.clone();
            std::thread::spawn(move || lex.scan("kill yourself").len())
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().expect("thread"), 1);
    }
}
