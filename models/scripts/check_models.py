"""Numpy reference forward passes vs the exported ONNX models (run by `bash models/setup.sh --check`).

MiniLM: plain-numpy BERT forward from model.safetensors vs minilm-l6-v2.onnx (hidden + sentence_embedding).
tox-block: Keras Tokenizer semantics (from the pickled tokenizer) vs toxblock_tokenizer.json, and a plain-numpy
Keras BiLSTM forward from the .h5 vs toxblock.onnx. Fails (exit 1) if a difference exceeds its tolerance.
"""
import math
import os
import sys

import h5py
import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build  # noqa: E402
import textstack as ts  # noqa: E402
from export_toxblock import _U  # noqa: E402


def extracted(conv):
    outs, key, members, _script, pkgdir = build.CONVERSIONS[conv]
    for m in members:
        dest = os.path.join(build.XDIR, conv, m)
        if not os.path.exists(dest):
            build.extract_member(key, m, dest)
    return os.path.join(build.XDIR, conv, pkgdir)


def check_minilm(stack):
    W = load_file(os.path.join(extracted("minilm"), "model.safetensors"))
    S = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market crashed today.",
         "you are a worthless idiot", "ok"]
    ids, mask = stack.minilm_encode(S)
    tt = np.zeros_like(ids)
    erf = np.vectorize(math.erf)

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * W[p + '.weight'] + W[p + '.bias']

    def lin(x, p):
        return x @ W[p + '.weight'].T + W[p + '.bias']

    x = (W['embeddings.word_embeddings.weight'][ids] + W['embeddings.position_embeddings.weight'][:ids.shape[1]]
         + W['embeddings.token_type_embeddings.weight'][tt]).astype(np.float64)
    x = ln(x, 'embeddings.LayerNorm')
    B, T, _ = x.shape
    am = (1 - mask[:, None, None, :]) * -1e4
    for i in range(6):
        p = f'encoder.layer.{i}'
        sh = lambda t: t.reshape(B, T, 12, 32).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = [sh(lin(x, f'{p}.attention.self.{n}')) for n in ('query', 'key', 'value')]
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(32) + am
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(0, 2, 1, 3).reshape(B, T, 384)
        x = ln(lin(a, f'{p}.attention.output.dense') + x, f'{p}.attention.output.LayerNorm')
        f = lin(x, f'{p}.intermediate.dense')
        f = 0.5 * f * (1 + erf(f / np.sqrt(2)))
        x = ln(lin(f, f'{p}.output.dense') + x, f'{p}.output.LayerNorm')
    emb = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    lh, se = stack.menc.run(None, {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': tt})
    d_h = np.abs((lh - x) * mask[..., None]).max()
    d_e = np.abs(se - emb).max()
    sim = se @ se.T
    print(f"minilm: batch-longest T={T}; max |onnx-numpy| hidden {d_h:.2e}, sentence_embedding {d_e:.2e}; "
          f"cos(guitar, instrument)={sim[0, 1]:.3f} cos(guitar, stocks)={sim[0, 2]:.3f}")
    return d_h < 1e-3 and d_e < 1e-4 and sim[0, 1] > sim[0, 2]


def check_toxblock(stack):
    pkg = extracted("toxblock")
    with open(os.path.join(pkg, "trained_models", "encoder_0.1.2.pkl"), "rb") as fh:
        tk = _U(fh).load().tokenizer
    filters = tk.filters

    def keras_seq(t):
        t = t.lower().translate(str.maketrans({c: ' ' for c in filters}))
        ids = [tk.word_index[w] for w in t.split(' ') if w and tk.word_index.get(w, tk.num_words) < tk.num_words]
        ids = ids[-100:]
        return [0] * (100 - len(ids)) + ids

    S = ["Have a nice day, see you at the meeting tomorrow.", "Thanks for fixing the build, great work!",
         "I will kill you, you fucking idiot!", "you stupid bitch", "go back to your country you dirty immigrant",
         "Shut up, nobody cares about your opinion, moron.", "Tabs\tand\nnewlines, (brackets) [x] {y} ~tilde~",
         " ".join(["word"] * 150) + " idiot"]
    X = np.array([keras_seq(s) for s in S], np.int64)
    X2 = np.array([stack.toxblock_ids(s) for s in S], np.int64)
    same_tok = bool((X == X2).all())
    f = h5py.File(os.path.join(pkg, "trained_models", "lstm_model_0.1.2.h5"), "r")["model_weights"]
    g = lambda p: np.array(f[p], np.float64)  # noqa: E731
    hs = lambda x: np.clip(0.2 * x + 0.5, 0, 1)  # noqa: E731

    def lstm(e, p, rev):
        K, Rk, b = g(p + 'kernel:0'), g(p + 'recurrent_kernel:0'), g(p + 'bias:0')
        B, T, _ = e.shape
        hh = np.zeros((B, 50))
        c = np.zeros((B, 50))
        out = np.zeros((B, T, 50))
        for t in (range(T - 1, -1, -1) if rev else range(T)):
            z = e[:, t] @ K + hh @ Rk + b
            i, f_, cc, o = np.split(z, 4, -1)
            i, f_, o = hs(i), hs(f_), hs(o)
            c = f_ * c + i * np.tanh(cc)
            hh = o * np.tanh(c)
            out[:, t] = hh
        return out

    e = g('embedding/embedding/embeddings:0')[X]
    y = np.concatenate([lstm(e, 'bidirectional/bidirectional/forward_lstm/', False),
                        lstm(e, 'bidirectional/bidirectional/backward_lstm/', True)], -1).max(1)
    y = np.maximum(y @ g('dense/dense/kernel:0') + g('dense/dense/bias:0'), 0) @ g('dense_1/dense_1/kernel:0') + g('dense_1/dense_1/bias:0')
    ref = 1 / (1 + np.exp(-y))
    p = stack.tox.run(None, {'input_ids': X})[0]
    d = np.abs(p - ref).max()
    print(f"toxblock: tokenizer.json == keras tokenization: {same_tok}; max |onnx-numpy| probs {d:.2e}")
    for t, r in zip(S[:6], p):
        print("   ", np.round(r, 3), t)
    return same_tok and d < 1e-5


if __name__ == "__main__":
    stack = ts.TextStack()
    good = check_minilm(stack) & check_toxblock(stack)
    print("checks:", "OK" if good else "FAILED")
    sys.exit(0 if good else 1)
