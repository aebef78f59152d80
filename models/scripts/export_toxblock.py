"""Convert tox-block 0.1.2 (PyPI, MIT; Keras BiLSTM trained on Jigsaw toxic comments) to ONNX + tokenizer.json.

Adapted from the verified reference converter (numpy Keras reference vs ONNX max diff ~1e-7).
No TensorFlow: the .h5 is read with h5py, the pickled Keras Tokenizer with a stub unpickler.

toxblock.onnx          input  input_ids int64 [batch, 100]  (left-padded with 0)
                       output probs     float32 [batch, 6] = toxic, severe_toxic, obscene, threat, insult, identity_hate
toxblock_tokenizer.json  WordLevel (Keras Tokenizer: lowercase, filter chars -> ' ', split on ' ');
                       OOV -> [UNK]=20000, which the caller must DROP, then keep the LAST 100 ids and left-pad with 0.

Usage: python export_toxblock.py TOXBLOCK_PKG_DIR OUT.onnx OUT_tokenizer.json
"""
import json
import os
import pickle
import sys

import h5py
import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

LABELS = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
MAXLEN = 100


class _Stub:
    def __setstate__(self, st):
        self.__dict__.update(st)


class _U(pickle.Unpickler):
    def find_class(self, mod, name):
        if mod.startswith(("keras_preprocessing", "tox_block")):
            return type(name, (_Stub,), {})
        return super().find_class(mod, name)


def main(pkg, out_onnx, out_tok):
    with open(os.path.join(pkg, "trained_models", "encoder_0.1.2.pkl"), "rb") as fh:
        enc = _U(fh).load()
    tk = enc.tokenizer
    vocab = {w: i for w, i in tk.word_index.items() if i < tk.num_words}
    vocab["[PAD]"] = 0
    vocab["[UNK]"] = tk.num_words  # 20000, never seen by the model: the caller drops it
    filters = tk.filters
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Lowercase"},
            {"type": "Replace",
             "pattern": {"Regex": "[" + "".join("\\" + c if c in "\\[]^-" else c for c in filters) + "]"},
             "content": " "}]},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "Removed", "invert": False},
        "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }
    tmp = out_tok + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(tokenizer_json, fh, ensure_ascii=False)
    os.replace(tmp, out_tok)

    f = h5py.File(os.path.join(pkg, "trained_models", "lstm_model_0.1.2.h5"), "r")["model_weights"]
    g = lambda p: np.array(f[p])  # noqa: E731
    emb = g("embedding/embedding/embeddings:0")
    U = 50

    def reorder(m):  # keras gate order i,f,c,o -> onnx i,o,f,c (along the last axis of size 4U)
        i, f_, c, o = np.split(m, 4, axis=-1)
        return np.concatenate([i, o, f_, c], axis=-1)

    Ws, Rs, Bs = [], [], []
    for d in ("forward_lstm", "backward_lstm"):
        p = f"bidirectional/bidirectional/{d}/"
        Ws.append(reorder(g(p + "kernel:0")).T)            # [4U, in]
        Rs.append(reorder(g(p + "recurrent_kernel:0")).T)  # [4U, U]
        Bs.append(np.concatenate([reorder(g(p + "bias:0")), np.zeros(4 * U, np.float32)]))
    inits = [nh.from_array(np.ascontiguousarray(a.astype(np.float32)), n) for n, a in [
        ("emb", emb), ("W", np.stack(Ws)), ("R", np.stack(Rs)), ("B", np.stack(Bs)),
        ("d1W", g("dense/dense/kernel:0")), ("d1b", g("dense/dense/bias:0")),
        ("d2W", g("dense_1/dense_1/kernel:0")), ("d2b", g("dense_1/dense_1/bias:0"))]]
    inits.append(nh.from_array(np.array([0, 0, 2 * U], np.int64), "shp"))
    nodes = [
        h.make_node("Gather", ["emb", "input_ids"], ["e"]),                       # B,T,50
        h.make_node("Transpose", ["e"], ["eT"], perm=[1, 0, 2]),                  # T,B,50
        h.make_node("LSTM", ["eT", "W", "R", "B"], ["Y"], direction="bidirectional", hidden_size=U,
                    activations=["HardSigmoid", "Tanh", "Tanh"] * 2,
                    activation_alpha=[0.2, 0.2], activation_beta=[0.5, 0.5]),      # T,2,B,U
        h.make_node("Transpose", ["Y"], ["Yt"], perm=[2, 0, 1, 3]),               # B,T,2,U
        h.make_node("Reshape", ["Yt", "shp"], ["Yc"]),                            # B,T,2U (fwd|bwd concat)
        h.make_node("ReduceMax", ["Yc"], ["pool"], axes=[1], keepdims=0),        # GlobalMaxPool1D
        h.make_node("MatMul", ["pool", "d1W"], ["h1"]), h.make_node("Add", ["h1", "d1b"], ["h1b"]),
        h.make_node("Relu", ["h1b"], ["h1r"]),
        h.make_node("MatMul", ["h1r", "d2W"], ["h2"]), h.make_node("Add", ["h2", "d2b"], ["logits"]),
        h.make_node("Sigmoid", ["logits"], ["probs"]),
    ]
    graph = h.make_graph(nodes, "toxblock", [h.make_tensor_value_info("input_ids", TP.INT64, ["batch", MAXLEN])],
                         [h.make_tensor_value_info("probs", TP.FLOAT, ["batch", 6])], inits)
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], producer_name="chatguard/models/scripts/export_toxblock.py")
    m.ir_version = 8
    m.metadata_props.append(onnx.StringStringEntryProto(key="labels", value=json.dumps(LABELS)))
    m.metadata_props.append(onnx.StringStringEntryProto(key="maxlen", value=str(MAXLEN)))
    m.metadata_props.append(onnx.StringStringEntryProto(key="unk_id", value=str(tk.num_words)))
    m.metadata_props.append(onnx.StringStringEntryProto(key="source", value="PyPI tox-block==0.1.2 (MIT)"))
    onnx.checker.check_model(m)
    tmp = out_onnx + ".tmp"
    onnx.save(m, tmp)
    os.replace(tmp, out_onnx)
    print("  wrote", out_onnx, "and", out_tok)


if __name__ == "__main__":
    main(*sys.argv[1:4])
