"""Peer benchmark for chatguard's text-model path: the same stack (MiniLM-L6-v2 + tox-block + head,
the same ONNX files, see textstack.py) served the way a Python service would run it at its best:
onnxruntime + tokenizers, 2 intra-op threads per session, all messages tokenized at once, sorted by
length and run in batches (the batch size is picked by a calibration pass), head in numpy.

  target/models-venv/bin/python models/scripts/py_text_bench.py                # 10k messages
  target/models-venv/bin/python models/scripts/py_text_bench.py --input FILE   # one message a line

Without --input it generates the same 10k chat messages as benches/model.rs (same generator).
`cargo bench --bench model` runs it after the Rust measurement and prints the ratio.
Last line, for scripts:  PYTEXT messages=N batch=B threads=T msgs_per_s=X mean_insult=Y
(with --arrival-batch B also, before it, PYTEXT_ARRIVAL ...: unsorted batches of B, what a service
batching in arrival order gets; compare with the Rust batcher).
With --interleave (and --arrival-batch), it prints PYTEXT_READY after warm-up and calibration,
then runs one arrival-order pass per `arrival` line on stdin (a PYTEXT_ARRIVAL line each) until
`done`: the Rust bench alternates its own passes with these, so a machine whose speed drifts
affects both sides of each ratio alike.
"""
import argparse
import os
import sys
import time

sys.dont_write_bytecode = True  # keep models/scripts/ free of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import textstack  # noqa: E402

OPENERS = ["", "hey", "lol", "ok", "guys", "omg", "yo", "hmm", "well", "bro"]
BODIES = [
    "are you coming to the raid tonight",
    "what time is the stream",
    "gg that was a close one",
    "can someone send me the link to the docs",
    "I think the update broke my settings",
    "thanks for the help earlier, it works now",
    "anyone want to team up for ranked",
    "brb getting food",
    "this song is so good",
    "where did you buy that skin",
    "you are the worst player I have ever seen",
    "shut up nobody asked you",
    "uninstall the game you absolute idiot",
    "nobody would miss you if you disappeared",
    "I will find you and hurt you",
    "have a great day everyone",
    "the meeting moved to 3pm, see you there",
    "did you see the match last night? the second half was unbelievable and the keeper saved everything",
    "happy birthday!! hope you have an amazing year",
    "stop spamming the chat please",
]
CLOSERS = ["", "", "", "!", "?", " :)", " lmao", " pls", " xD", " ..."]
MASK = (1 << 64) - 1


def chat_messages(n):
    """benches/model.rs `chat_messages`: xorshift64 picks of opener, body(, body), closer."""
    state = 0x9E3779B97F4A7C15

    def nxt(m):
        nonlocal state
        state ^= (state << 13) & MASK
        state ^= state >> 7
        state ^= (state << 17) & MASK
        return state % m

    out = []
    for _ in range(n):
        msg = ""
        opener = OPENERS[nxt(len(OPENERS))]
        if opener:
            msg += opener + " "
        msg += BODIES[nxt(len(BODIES))]
        if nxt(8) == 0:
            msg += ", and also " + BODIES[nxt(len(BODIES))]
        msg += CLOSERS[nxt(len(CLOSERS))]
        out.append(msg)
    return out


class Service:
    """The batched Python pipeline: texts in, head scores [N,6] out."""

    def __init__(self, threads):
        self.stack = textstack.TextStack(threads=threads)
        self.head, self.W, self.b = textstack.load_head()

    def toxblock_ids(self, texts):
        x = np.zeros((len(texts), textstack.TOX_LEN), np.int64)
        for row, enc in enumerate(self.stack.ttok.encode_batch(texts)):
            ids = [i for i in enc.ids if i != textstack.TOX_UNK][-textstack.TOX_LEN:]
            if ids:
                x[row, textstack.TOX_LEN - len(ids):] = ids
        return x

    def scores(self, texts, batch, sort=True):
        """Tokenize everything, sort by MiniLM length (unless `sort` is false: arrival order, as a
        service batching whatever has queued), run the batches."""
        n = len(texts)
        enc = self.stack.mtok.encode_batch(texts)
        lengths = np.fromiter((sum(e.attention_mask) for e in enc), np.int64, n)
        tox_ids = self.toxblock_ids(texts)
        order = np.argsort(lengths, kind="stable") if sort else np.arange(n)
        emb = np.empty((n, 384), np.float32)
        probs = np.empty((n, 6), np.float32)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            width = int(lengths[idx].max())
            ids = np.zeros((len(idx), width), np.int64)
            for r, i in enumerate(idx):
                ids[r, :lengths[i]] = enc[i].ids[:lengths[i]]
            mask = (np.arange(width)[None, :] < lengths[idx][:, None]).astype(np.int64)
            emb[idx] = self.stack.menc.run(["sentence_embedding"], {
                "input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
            probs[idx] = self.stack.tox.run(["probs"], {"input_ids": tox_ids[idx]})[0]
        return textstack.head_scores(self.head, self.W, self.b, emb, probs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", help="messages, one a line (default: the bench's 10k)")
    ap.add_argument("--messages", type=int, default=10_000, help="generated messages (no --input)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads per session")
    ap.add_argument("--batches", default="8,16,32,64,128", help="batch sizes to calibrate")
    ap.add_argument("--batch", type=int, help="skip calibration, use this batch size")
    ap.add_argument("--arrival-batch", type=int, default=0,
                    help="also run unsorted (arrival order) batches of this size: PYTEXT_ARRIVAL")
    ap.add_argument("--interleave", action="store_true",
                    help="run the arrival-order pass once per `arrival` line on stdin, until `done`")
    args = ap.parse_args()

    if args.input:
        with open(args.input, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f]
    else:
        texts = chat_messages(args.messages)
    svc = Service(args.threads)
    svc.scores(texts[:64], 32)  # warm-up: session allocations

    batch = args.batch
    if batch is None:
        sample = texts[:min(len(texts), 1000)]
        best = 0.0
        for b in (int(x) for x in args.batches.split(",")):
            t = time.perf_counter()
            svc.scores(sample, b)
            rate = len(sample) / (time.perf_counter() - t)
            print(f"python calibration: batch {b:>4}: {rate:.0f} msgs/s", flush=True)
            if rate > best:
                best, batch = rate, b

    insult = textstack.HEAD_LABELS.index("insult")

    def arrival_pass():
        t = time.perf_counter()
        scores = svc.scores(texts, args.arrival_batch, sort=False)
        rate = len(texts) / (time.perf_counter() - t)
        print(f"PYTEXT_ARRIVAL messages={len(texts)} batch={args.arrival_batch} threads={args.threads} "
              f"msgs_per_s={rate:.1f} mean_insult={float(scores[:, insult].mean()):.5f}", flush=True)

    if args.interleave and args.arrival_batch > 0:
        print("PYTEXT_READY", flush=True)
        for line in sys.stdin:
            if line.strip() == "arrival":
                arrival_pass()
            elif line.strip() == "done":
                break
    elif args.arrival_batch > 0:
        arrival_pass()

    t = time.perf_counter()
    scores = svc.scores(texts, batch)
    rate = len(texts) / (time.perf_counter() - t)
    print(f"PYTEXT messages={len(texts)} batch={batch} threads={args.threads} "
          f"msgs_per_s={rate:.1f} mean_insult={float(scores[:, insult].mean()):.5f}", flush=True)


if __name__ == "__main__":
    main()
