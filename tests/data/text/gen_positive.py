#!/usr/bin/env python3
"""Rewrites the generated block of positive.txt: abusive chat lines with obfuscated
spellings, one per line as `category<TAB>text`. Deterministic (fixed seed); the hand-written
block after `# Hand-written lines.` is kept. Rerun after editing BASE:

    python3 tests/data/text/gen_positive.py

Each base line marks the word to disguise with [brackets]; every base line is written once
plainly and once per obfuscation in its row's list.
"""
import os
import random

rng = random.Random(2024)

CYRILLIC = {"a": "а", "e": "е", "o": "о", "p": "р", "c": "с", "x": "х", "y": "у", "i": "і",
            "s": "ѕ", "h": "һ", "k": "к", "j": "ј"}
GREEK = {"o": "ο", "a": "α", "i": "ι", "k": "κ", "t": "τ", "u": "υ", "v": "ν", "x": "χ",
         "p": "ρ", "e": "ε", "n": "η"}
LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"}
ZW = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad"]
MARKS = [chr(c) for c in range(0x300, 0x36f)]


def homoglyph(w, table):
    out, n = [], 0
    for ch in w:
        if ch in table and (n == 0 or rng.random() < 0.6):
            out.append(table[ch])
            n += 1
        else:
            out.append(ch)
    return "".join(out)


def fullwidth(w):
    return "".join(chr(ord(c) - 0x21 + 0xFF01) if "!" <= c <= "~" else c for c in w)


def math_bold(w):
    return "".join(chr(0x1D41A + ord(c) - 97) if "a" <= c <= "z" else c for c in w)


def math_script(w):
    # Bold script small letters have no holes in Unicode.
    return "".join(chr(0x1D4EA + ord(c) - 97) if "a" <= c <= "z" else c for c in w)


def circled(w):
    return "".join(chr(0x24D0 + ord(c) - 97) if "a" <= c <= "z" else c for c in w)


def regional(w):
    return "".join(chr(0x1F1E6 + ord(c) - 97) if "a" <= c <= "z" else c for c in w)


def zero_width(w):
    return rng.choice(ZW).join(w)


def bidi(w):
    return "\u202e" + w + "\u202c" if rng.random() < 0.5 else "\u2066" + w[:2] + "\u2069" + w[2:]


def zalgo(w):
    return "".join(c + "".join(rng.choice(MARKS) for _ in range(rng.randint(1, 4))) for c in w)


def accents(w):
    table = {"a": "á", "e": "è", "i": "ï", "o": "ö", "u": "ū", "c": "ç", "n": "ñ", "s": "š"}
    return "".join(table.get(c, c) for c in w)


def leet(w):
    out = [LEET.get(c, c) if rng.random() < 0.7 else c for c in w]
    if out == list(w):
        out = [LEET.get(c, c) for c in w]
    return "".join(out)


def dots(w):
    return ".".join(w)


def spaces(w):
    return " ".join(w)


def underscores(w):
    return "_".join(w)


def dashes(w):
    return "-".join(w)


def repeats(w):
    i = rng.randrange(len(w))
    return w[:i] + w[i] * rng.randint(3, 7) + w[i + 1:]


def upper(w):
    return w.upper()


def star(w):
    # Censoring part of a doubled letter (`g*ok`) is not supported: see wordlists/README.md.
    if len(w) < 4 or any(a == b for a, b in zip(w, w[1:])):
        return leet(w)
    vowels = [i for i, c in enumerate(w) if c in "aeiou" and 0 < i < len(w) - 1]
    i = vowels[0] if vowels else len(w) // 2
    return w[:i] + rng.choice("*#") + w[i + 1:]


def bang(w):
    inner = w.find("i", 1, len(w) - 1)
    return w[:inner] + "!" + w[inner + 1:] if inner > 0 else w.replace("s", "$", 1)


ALL = [homoglyph_cyr := lambda w: homoglyph(w, CYRILLIC), lambda w: homoglyph(w, GREEK),
       fullwidth, math_bold, math_script, circled, regional, zero_width, bidi, zalgo, accents,
       leet, dots, spaces, underscores, dashes, repeats, upper, star, bang]

# (category, line with [target])
BASE = [
    ("profanity", "what the [fuck] is this"),
    ("profanity", "this is [fucking] ridiculous"),
    ("profanity", "oh [shit] i forgot"),
    ("profanity", "that movie was [shit] honestly"),
    ("profanity", "this game is [bullshit]"),
    ("profanity", "stop talking [crap] all day"),
    ("profanity", "[damn] that hurt"),
    ("profanity", "[motherfucking] traffic again"),
    ("profanity", "[stfu] already"),
    ("profanity", "[wtf] was that"),
    ("profanity", "[pissed] off right now"),
    ("profanity", "[bollocks] to that"),
    ("profanity", "what a [clusterfuck]"),
    ("profanity", "[shitty] wifi in here"),
    ("profanity", "[goddamn] it"),
    ("profanity", "[wanking] about again"),
    ("insult", "you are a f.u.c.k.i.n.g [idiot]"),
    ("insult", "you stupid [bitch]"),
    ("insult", "shut up you [asshole]"),
    ("insult", "he is such a [dickhead]"),
    ("insult", "you absolute [cunt]"),
    ("insult", "what a [moron]"),
    ("insult", "total [douchebag] move"),
    ("insult", "you [bastard]"),
    ("insult", "[fuck] you"),
    ("insult", "go [fuck] yourself"),
    ("insult", "you little [prick]"),
    ("insult", "fat [slut]"),
    ("insult", "dumb [whore]"),
    ("insult", "you are a [loser]"),
    ("insult", "[dumbass] lol"),
    ("insult", "piece of [shit]"),
    ("insult", "nobody [likes] you"),
    ("insult", "you are [worthless]"),
    ("insult", "u r such a [twat]"),
    ("insult", "[wanker]"),
    ("insult", "[cocksucker]"),
    ("insult", "you [scumbag]"),
    ("sexual", "send [nudes] pls"),
    ("sexual", "show me your [tits]"),
    ("sexual", "wanna see my [dick] pic"),
    ("sexual", "suck my [cock]"),
    ("sexual", "i want a [blowjob]"),
    ("sexual", "nice [pussy]"),
    ("sexual", "watching [porn] again"),
    ("sexual", "free [hentai] here"),
    ("sexual", "are you [horny]"),
    ("sexual", "let's have [sex] tonight"),
    ("sexual", "[cumshot] compilation"),
    ("sexual", "she got [raped]"),
    ("sexual", "[masturbating] right now"),
    ("sexual", "big [boobs]"),
    ("sexual", "[jailbait] pics"),
    ("hate", "get out you [nigger]"),
    ("hate", "sup my [nigga]"),
    ("hate", "you [faggot]"),
    ("hate", "stop being a [fag]"),
    ("hate", "dirty [kike]"),
    ("hate", "filthy [spic]"),
    ("hate", "go home [chink]"),
    ("hate", "he is a [retard]"),
    ("hate", "that's so [retarded]"),
    ("hate", "bunch of [towelheads]"),
    ("hate", "stupid [tranny]"),
    ("hate", "[wetback] go home"),
    ("hate", "[dyke]"),
    ("hate", "[gook]"),
    ("hate", "[raghead]"),
    ("hate", "[heil] hitler"),
    ("hate", "[spastic]"),
    ("hate", "[paki] scum"),
    ("threat", "[kill] yourself"),
    ("threat", "just [kys]"),
    ("threat", "go [die] in a fire"),
    ("threat", "i will [kill] you"),
    ("threat", "i know where you [live]"),
    ("threat", "i hope you [die]"),
    ("threat", "[hang] yourself"),
    ("threat", "i will [stab] you"),
    ("threat", "i'll [shoot] you"),
    ("threat", "i will [rape] you"),
    ("threat", "drink [bleach]"),
    ("threat", "you [deserve] to die"),
    ("threat", "i will [dox] you"),
    ("threat", "[neck] yourself"),
    ("self_harm", "i want to [die]"),
    ("self_harm", "i'm going to [kill] myself"),
    ("self_harm", "i [wanna] die"),
    ("self_harm", "thinking about [suicide]"),
    ("self_harm", "i feel [suicidal]"),
    ("self_harm", "i started [cutting] myself"),
    ("self_harm", "no reason to [live]"),
    ("self_harm", "better off [dead]"),
    ("self_harm", "how to [kill] myself painlessly"),
    ("self_harm", "i want to end my [life]"),
    ("self_harm", "[thinspo] tips"),
    ("scam", "send me your [password]"),
    ("scam", "[free] crypto giveaway"),
    ("scam", "free [bitcoin] for everyone"),
    ("scam", "dm me for [nudes]"),
    ("scam", "claim your [prize] now"),
    ("scam", "free [nitro] click here"),
    ("scam", "[double] your bitcoin today"),
    ("scam", "pay me in gift [cards]"),
    ("scam", "send me your seed [phrase]"),
    ("scam", "hot [singles] in your area"),
    ("scam", "i can do a cash app [flip]"),
    ("scam", "guaranteed [profit] every day"),
    ("scam", "send me the [verification] code"),
    ("scam", "what is your [password]"),
]

CJK = [
    ("insult", "你是[傻逼]吗"),
    ("insult", "[傻逼]"),
    ("insult", "你这个[贱人]"),
    ("profanity", "[他妈的]什么玩意"),
    ("profanity", "[操你妈]"),
    ("profanity", "[草泥马]"),
    ("sexual", "今晚[约炮]吗"),
    ("scam", "[加微信]领取福利"),
    ("scam", "兼职[刷单]日赚"),
    ("insult", "你就是个[白痴]"),
]


def cjk_split(w):
    return rng.choice([" ", ".", "*", "\u200b", "-"]).join(w)


def main():
    out = []
    for cat, line in BASE:
        pre, rest = line.split("[", 1)
        word, post = rest.split("]", 1)
        out.append((cat, pre + word + post))
        for f in rng.sample(ALL, 4):
            out.append((cat, pre + f(word) + post))
    for cat, line in CJK:
        pre, rest = line.split("[", 1)
        word, post = rest.split("]", 1)
        out.append((cat, pre + word + post))
        out.append((cat, pre + cjk_split(word) + post))
        out.append((cat, pre + zero_width(word) + post))
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "positive.txt")
    hand = ""
    if os.path.exists(path):
        old = open(path, encoding="utf-8").read()
        if "# Hand-written lines." in old:
            hand = old[old.index("# Hand-written lines."):]
    with open(path, "w", encoding="utf-8") as f:
        f.write("# Lines that MUST be flagged: CATEGORY<TAB>text (at least one match of CATEGORY).\n")
        f.write("# Generated by gen_positive.py; hand-written lines follow the generated block.\n")
        for cat, text in out:
            f.write(f"{cat}\t{text}\n")
        f.write(hand)


if __name__ == "__main__":
    main()
