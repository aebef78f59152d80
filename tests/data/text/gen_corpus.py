#!/usr/bin/env python3
"""Writes chat_corpus.txt, the benchmark corpus (benches/text.rs): ~4000 chat messages of
10-200 bytes, mostly clean, ~15% abusive, with some emoji, CJK and other unicode.
Each line is `clean<TAB>text` or `abusive<TAB>text`. Deterministic:

    python3 tests/data/text/gen_corpus.py > tests/data/text/chat_corpus.txt
"""
import random

rng = random.Random(7)


def load(name, tab=False):
    out = []
    for line in open(__file__.rsplit("/", 1)[0] + "/" + name, encoding="utf-8"):
        line = line.rstrip("\n")
        if not line or line.startswith("#"):
            continue
        out.append(line.split("\t", 1)[1] if tab else line)
    return out


clean = load("safe.txt") + load("negative.txt")
abusive = load("positive.txt", tab=True)
EMOJI = ["😂", "🙂", "👍", "🔥", "❤️", "🎉", "😭", "🙏", "😎", "💀", "✨", "🤔"]
TAILS = ["", "", "", " lol", " haha", "!", "!!", "?", " :)", " ok", " tbh", " fr"]


def message(pool):
    text = rng.choice(pool)
    while len(text.encode()) < 10:
        text += " " + rng.choice(clean)
    if rng.random() < 0.25 and len(text) < 100:
        text += " " + rng.choice(clean)
    text += rng.choice(TAILS)
    if rng.random() < 0.15:
        text += " " + rng.choice(EMOJI)
    if rng.random() < 0.05:
        text = text.upper()
    while len(text.encode()) > 200:
        text = text[: len(text) - 10]
    return text


def main():
    for _ in range(4000):
        if rng.random() < 0.15:
            print("abusive\t" + message(abusive))
        else:
            print("clean\t" + message(clean))


if __name__ == "__main__":
    main()
