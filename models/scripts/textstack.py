"""Python reference of chatguard's text-model stack (what the Rust side reproduces).

  MiniLM:    tokenizer.json (BatchLongest padding, truncation 128) -> minilm-l6-v2.onnx -> sentence_embedding [384]
  tox-block: toxblock_tokenizer.json -> drop [UNK]=20000 -> keep LAST 100 ids -> left-pad 0 -> toxblock.onnx -> probs [6]
  head:      x = concat(sentence_embedding, T(probs)) (390 floats), T = identity | logit(clip(p,1e-6,1-1e-6)),
             scores = sigmoid(x @ W + b)  (W [390,6], b [6] from models/head/text_head.json)
"""
import json
import os
import re

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
M = lambda *p: os.path.join(ROOT, "models", *p)  # noqa: E731

MINILM_ONNX = M("minilm", "minilm-l6-v2.onnx")
MINILM_TOK = M("minilm", "tokenizer.json")
TOXBLOCK_ONNX = M("toxblock", "toxblock.onnx")
TOXBLOCK_TOK = M("toxblock", "toxblock_tokenizer.json")
HEAD_JSON = M("head", "text_head.json")
INSULTS_DIR = M("data", "insults")

TOX_LABELS = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
HEAD_LABELS = ["insult", "threat", "sexual", "hate", "toxic", "severe"]
TOX_UNK, TOX_LEN = 20000, 100
CLIP = 1e-6


def clean_comment(s):
    """Kaggle insults 'Comment' cleaning, as the reference trainer: strip the outer quotes, turn the
    literal \\n escapes into spaces, drop literal \\xNN / \\uNNNN escapes, squeeze whitespace."""
    s = s.strip('"').replace('\\\\n', ' ').replace('\\n', ' ')
    s = re.sub(r'\\\\x[0-9a-f]{2}|\\x[0-9a-f]{2}|\\\\u[0-9a-f]{4}|\\u[0-9a-f]{4}', ' ', s)
    return re.sub(r'\s+', ' ', s).strip()


def load_insults(split):
    """split: 'train' | 'test' -> (texts, labels) (labels: np.int64)."""
    import csv
    fn = {"train": "train.csv", "test": "test_with_solutions.csv"}[split]
    with open(os.path.join(INSULTS_DIR, fn), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [clean_comment(r["Comment"]) for r in rows], np.array([int(r["Insult"]) for r in rows], np.int64)


def session(path, threads=2):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


class TextStack:
    def __init__(self, threads=2):
        self.mtok = Tokenizer.from_file(MINILM_TOK)  # padding/truncation come from the file itself
        self.menc = session(MINILM_ONNX, threads)
        self.ttok = Tokenizer.from_file(TOXBLOCK_TOK)
        self.tox = session(TOXBLOCK_ONNX, threads)

    # ---- MiniLM
    def minilm_encode(self, texts):
        enc = self.mtok.encode_batch(list(texts))
        ids = np.array([e.ids for e in enc], np.int64)
        mask = np.array([e.attention_mask for e in enc], np.int64)
        return ids, mask

    def embed(self, texts, batch=64):
        out = []
        for i in range(0, len(texts), batch):
            ids, mask = self.minilm_encode(texts[i:i + batch])
            out.append(self.menc.run(["sentence_embedding"], {
                "input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0])
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)

    # ---- tox-block
    def toxblock_ids(self, text):
        ids = [i for i in self.ttok.encode(text).ids if i != TOX_UNK][-TOX_LEN:]
        return [0] * (TOX_LEN - len(ids)) + ids

    def toxblock_probs(self, texts, batch=256):
        out = []
        for i in range(0, len(texts), batch):
            x = np.array([self.toxblock_ids(t) for t in texts[i:i + batch]], np.int64)
            out.append(self.tox.run(["probs"], {"input_ids": x})[0])
        return np.concatenate(out) if out else np.zeros((0, 6), np.float32)

    def features(self, texts, transform):
        return build_features(self.embed(texts), self.toxblock_probs(texts), transform)


def transform_probs(p, transform):
    p = np.asarray(p, np.float64)
    if transform == "identity":
        return p
    if transform == "logit":
        q = np.clip(p, CLIP, 1 - CLIP)
        return np.log(q) - np.log1p(-q)
    raise ValueError(transform)


def build_features(emb, probs, transform):
    return np.concatenate([np.asarray(emb, np.float64), transform_probs(probs, transform)], axis=1)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def load_head(path=HEAD_JSON):
    hd = json.load(open(path))
    W = np.array(hd["W"], np.float64)
    b = np.array(hd["b"], np.float64)
    assert W.shape == (390, len(hd["labels"])) and b.shape == (len(hd["labels"]),), (W.shape, b.shape)
    return hd, W, b


def head_scores(hd, W, b, emb, probs):
    x = build_features(emb, probs, hd["toxblock_transform"])
    return sigmoid(x @ W + b)
