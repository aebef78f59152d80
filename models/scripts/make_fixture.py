"""Write tests/data/text_model_expected.json: the Python reference outputs of the text stack
(python onnxruntime 1.31.1 + tokenizers on the exported ONNX files, head from models/head/text_head.json)
for a fixed set of sentences. The Rust parity test compares against it within 1e-4.

Run by `bash models/setup.sh --fixture` (and after `--train`).
"""
import json
import os
import sys

import numpy as np
import onnxruntime
import tokenizers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build  # noqa: E402
import textstack as ts  # noqa: E402

OUT = os.path.join(ts.ROOT, "tests", "data", "text_model_expected.json")

SENTENCES = [
    ("clean", "Have a nice day, see you at the meeting tomorrow."),
    ("clean", "Thanks for fixing the build, great work!"),
    ("clean", "Can you send me the slides from yesterday's call?"),
    ("short", "ok"),
    ("short", "   lol   "),
    ("insult_no_keyword", "nobody would miss you if you disappeared"),
    ("insult_no_keyword", "you are the reason they put instructions on shampoo bottles"),
    ("insult", "you are a worthless idiot"),
    ("insult", "Shut up, nobody cares about your opinion, moron."),
    ("threat", "I will kill you and your whole family"),
    ("threat", "I know where you live and I'm coming for you tonight"),
    ("sexual", "send me nudes or I'll share your pics with everyone"),
    ("sexual", "I want to fuck her tight ass so hard"),
    ("hate", "go back to your country you dirty immigrant"),
    ("hate", "those people are animals and should be wiped out"),
    ("profane", "You fucking idiot, I hope you die"),
    ("obfuscated", "y0u are such a l0ser, g0 d!e"),
    ("unicode", "Café crème 🍰 avec naïve résumé — 你好，世界! 😀👍"),
    ("unicode", "Привет, как дела? مرحبا بك"),
    ("emoji_only", "😡😡😡"),
    ("punctuation", "WHAT\tis\nTHIS??? (brackets) [x] {y} ~tilde~ #hashtag @user"),
    ("long_truncated", "This is a long and friendly message about the weather and the garden. " * 12
     + "And at the very end: you are a stupid idiot."),
]


def f(x):
    return [float(v) for v in x]


def main():
    stack = ts.TextStack(threads=2)
    hd, W, b = ts.load_head()
    texts = [t for _, t in SENTENCES]
    cases = []
    for kind, text in SENTENCES:
        ids, mask = stack.minilm_encode([text])
        lh, se = stack.menc.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
        tids = stack.toxblock_ids(text)
        probs = stack.tox.run(["probs"], {"input_ids": np.array([tids], np.int64)})[0]
        scores = ts.head_scores(hd, W, b, se, probs)[0]
        raw_tox = [i for i in stack.ttok.encode(text).ids if i != ts.TOX_UNK]
        cases.append({
            "kind": kind, "text": text,
            "minilm_input_ids": [int(v) for v in ids[0]],
            "minilm_truncated": len(stack.mtok.encode(text, add_special_tokens=True).overflowing) > 0,
            "sentence_embedding_first8": f(se[0, :8]),
            "sentence_embedding_l2": float(np.linalg.norm(se[0].astype(np.float64))),
            "toxblock_input_ids": [int(v) for v in tids],
            "toxblock_truncated": len(raw_tox) > ts.TOX_LEN,
            "toxblock_probs": f(probs[0]),
            "head_scores": f(scores),
        })
    # batched inference must agree with one-at-a-time (padding must not leak): record the max deviation
    ids, mask = stack.minilm_encode(texts)
    se_b = stack.menc.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
    pr_b = stack.toxblock_probs(texts)
    d_emb = max(float(np.abs(se_b[i, :8] - np.array(c["sentence_embedding_first8"])).max()) for i, c in enumerate(cases))
    d_tox = max(float(np.abs(pr_b[i] - np.array(c["toxblock_probs"])).max()) for i, c in enumerate(cases))
    assert d_emb < 1e-5 and d_tox < 1e-5, (d_emb, d_tox)
    man = build.read_manifest(build.MANIFEST)
    doc = {
        "generated_by": "bash models/setup.sh --fixture   (models/scripts/make_fixture.py)",
        "reference": f"python onnxruntime {onnxruntime.__version__} + tokenizers {tokenizers.__version__}, CPU, "
                     "one sentence per run (batch of 1)",
        "tolerance": 1e-4,
        "models_sha256": {p: man[p] for p in ("models/minilm/minilm-l6-v2.onnx", "models/minilm/tokenizer.json",
                                              "models/toxblock/toxblock.onnx", "models/toxblock/toxblock_tokenizer.json")},
        "head": "models/head/text_head.json",
        "head_labels": hd["labels"],
        "head_toxblock_transform": hd["toxblock_transform"],
        "toxblock_labels": ts.TOX_LABELS,
        "notes": {
            "minilm_input_ids": "tokenizer.json encode(text) with special tokens; BatchLongest padding of a single "
                                "sentence = no padding; truncated to 128. attention_mask = all 1, token_type_ids = all 0",
            "toxblock_input_ids": "toxblock_tokenizer.json ids, drop 20000 ([UNK]), keep the LAST 100, left-pad with 0",
            "head_scores": "sigmoid(concat(sentence_embedding, T(toxblock_probs)) @ W + b), computed in float64 from "
                           "the float32 model outputs",
            "batched_vs_single_max_abs_diff": {"sentence_embedding_first8": d_emb, "toxblock_probs": d_tox},
        },
        "cases": cases,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    text = json.dumps(doc, indent=1, ensure_ascii=False)
    import re
    text = re.sub(r"\[\s*(-?[0-9][-+0-9eE.,\s]*?)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    assert json.loads(text) == json.loads(json.dumps(doc, ensure_ascii=False))
    with open(OUT, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    print(f"make_fixture: wrote {os.path.relpath(OUT, ts.ROOT)} ({len(cases)} sentences; batched-vs-single max diff "
          f"emb {d_emb:.1e}, tox {d_tox:.1e})")
    for c in cases:
        print(f"  {c['kind']:18s} T={len(c['minilm_input_ids']):3d} scores={np.round(c['head_scores'], 3)} "
              f"tox={np.round(c['toxblock_probs'], 3)}  {c['text'][:50]!r}")


if __name__ == "__main__":
    main()
