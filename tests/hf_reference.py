#!/usr/bin/env python3
"""An independent forward pass of Hugging Face's MixtralForCausalLM and
Qwen2MoeForCausalLM in plain PyTorch (float64), written from transformers'
modeling_mixtral.py and modeling_qwen2_moe.py (eager attention, no cache), reading
the checkpoint files directly (no transformers, no safetensors package needed).

    hf_reference.py make-fixture DIR --arch mixtral|qwen2_moe [--seed N]
        writes an HF checkpoint of random weights made here, not by cmoe
        (config.json, model.safetensors, F32), fixed tokens, and the logits of this
        forward in float64 (logits.safetensors: "tokens" I32 [B, S], "logits" F64
        [B*S, V]). tests/test_hf checks cmoe's logits after `cmoe import` against them.
    hf_reference.py logits HF_DIR TOKENS OUT.safetensors
        the logits of any checkpoint (e.g. from `cmoe export`) for TOKENS: the "tokens"
        tensor of a .safetensors file, or a list such as 1,5,2 (one sequence).

Needs python3 with torch (Debian: python3-torch) and numpy.
"""
import json
import math
import struct
import sys

import numpy as np
import torch

DT = {"F64": np.float64, "F32": np.float32, "I32": np.int32, "I64": np.int64}
BF16 = "BF16"


def st_read(path):
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8 : 8 + n])
    data = buf[8 + n :]
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, en = e["data_offsets"]
        raw = data[b:en]
        if e["dtype"] == BF16:
            u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            a = u.view(np.float32)
        else:
            a = np.frombuffer(raw, dtype=np.dtype(DT[e["dtype"]]).newbyteorder("<"))
        out[name] = a.reshape(e["shape"]).copy()
    return out


def st_write(path, tensors, meta=None):
    header, chunks, at = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        dt = {np.float64: "F64", np.float32: "F32", np.int32: "I32", np.int64: "I64"}[a.dtype.type]
        raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [at, at + len(raw)]}
        chunks.append(raw)
        at += len(raw)
    if meta:
        header["__metadata__"] = meta
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(chunks))


# ---- the forward pass, as modeling_mixtral.py / modeling_qwen2_moe.py ----------------------


def rmsnorm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def act(cfg):
    a = cfg.get("hidden_act", "silu")
    return torch.nn.functional.silu if a in ("silu", "swish") else torch.nn.functional.gelu


def mlp(x, w1, w3, w2, f):  # down(act(gate(x)) * up(x)); HF Linear weights are [out, in]
    return (f(x @ w1.T) * (x @ w3.T)) @ w2.T


def forward(cfg, W, tokens):
    qwen = cfg["model_type"] == "qwen2_moe"
    T = lambda n: torch.from_numpy(W[n].astype(np.float64))
    C, H, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    Hkv = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or C // H
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    E = cfg["num_experts"] if qwen else cfg["num_local_experts"]
    k = cfg["num_experts_per_tok"]
    renorm = cfg.get("norm_topk_prob", False) if qwen else True
    f = act(cfg)
    margin = math.inf  # smallest gap between the k-th and (k+1)-th routing probability
    B, S = tokens.shape
    h = T("model.embed_tokens.weight")[torch.from_numpy(tokens.astype(np.int64))]
    pos = torch.arange(S, dtype=torch.float64)
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    emb = torch.cat((pos[:, None] * inv[None], pos[:, None] * inv[None]), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    mask = torch.full((S, S), float("-inf"), dtype=torch.float64).triu(1)
    for l in range(L):
        p = f"model.layers.{l}."
        x = rmsnorm(h, T(p + "input_layernorm.weight"), eps)
        q, kk, v = (x @ T(p + f"self_attn.{n}_proj.weight").T for n in "qkv")
        if qwen and cfg.get("qkv_bias", True):
            q, kk, v = (t + T(p + f"self_attn.{n}_proj.bias") for t, n in zip((q, kk, v), "qkv"))
        q = q.view(B, S, H, hd).transpose(1, 2)
        kk = kk.view(B, S, Hkv, hd).transpose(1, 2)
        v = v.view(B, S, Hkv, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        kk = kk * cos + rotate_half(kk) * sin
        kk = kk.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
        att = torch.softmax(q @ kk.transpose(2, 3) * hd**-0.5 + mask, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, S, H * hd) @ T(p + "self_attn.o_proj.weight").T
        h = h + o
        x = rmsnorm(h, T(p + "post_attention_layernorm.weight"), eps).reshape(B * S, C)
        sparse = not qwen or (
            l not in cfg.get("mlp_only_layers", []) and E > 0 and (l + 1) % cfg.get("decoder_sparse_step", 1) == 0
        )
        if not sparse:
            y = mlp(x, T(p + "mlp.gate_proj.weight"), T(p + "mlp.up_proj.weight"), T(p + "mlp.down_proj.weight"), f)
        else:
            m = p + ("mlp." if qwen else "block_sparse_moe.")
            probs = torch.softmax(x @ T(m + "gate.weight").T, dim=1)
            wts, sel = torch.topk(probs, k, dim=-1)
            if k < E:
                top = torch.topk(probs, k + 1, dim=-1).values
                margin = min(margin, float((top[:, k - 1] - top[:, k]).min()))
            if renorm:
                wts = wts / wts.sum(dim=-1, keepdim=True)
            y = torch.zeros_like(x)
            for e in range(E):
                pe = m + f"experts.{e}."
                names = ("gate_proj", "up_proj", "down_proj") if qwen else ("w1", "w3", "w2")
                ye = mlp(x, *(T(pe + n + ".weight") for n in names), f)
                y = y + (wts * (sel == e)).sum(-1, keepdim=True) * ye
            if qwen:
                sh = mlp(x, *(T(m + f"shared_expert.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")), f)
                y = y + torch.sigmoid(x @ T(m + "shared_expert_gate.weight").T) * sh
        h = h + y.reshape(B, S, C)
    h = rmsnorm(h, T("model.norm.weight"), eps)
    head = T("model.embed_tokens.weight") if cfg.get("tie_word_embeddings") else T("lm_head.weight")
    return (h @ head.T).reshape(B * S, -1), margin


# ---- fixtures --------------------------------------------------------------------------------


def make_fixture(out, arch, seed):
    import os

    g = np.random.default_rng(seed)
    qwen = arch == "qwen2_moe"
    C, H, Hkv, hd, L, E, k = 16, 4, 2, 4, (3 if qwen else 2), 4, 2
    V = 40 if qwen else 48
    cfg = {
        "architectures": ["Qwen2MoeForCausalLM" if qwen else "MixtralForCausalLM"],
        "model_type": arch,
        "vocab_size": V,
        "hidden_size": C,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": Hkv,
        "hidden_act": "silu",
        "max_position_embeddings": 32,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "num_experts_per_tok": k,
        "tie_word_embeddings": qwen,
        "torch_dtype": "float32",
    }
    if qwen:
        cfg.update(intermediate_size=24, moe_intermediate_size=12, shared_expert_intermediate_size=20,
                   num_experts=E, decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=False,
                   use_sliding_window=False)
    else:
        cfg.update(intermediate_size=24, num_local_experts=E, sliding_window=None, router_jitter_noise=0.0)
    W = {}

    def w(name, *shape, scale=0.4):
        W[name] = (g.standard_normal(shape) * scale).astype(np.float32)

    w("model.embed_tokens.weight", V, C, scale=1.0)
    for l in range(L):
        p = f"model.layers.{l}."
        W[p + "input_layernorm.weight"] = (1 + 0.1 * g.standard_normal(C)).astype(np.float32)
        W[p + "post_attention_layernorm.weight"] = (1 + 0.1 * g.standard_normal(C)).astype(np.float32)
        w(p + "self_attn.q_proj.weight", H * hd, C)
        w(p + "self_attn.k_proj.weight", Hkv * hd, C)
        w(p + "self_attn.v_proj.weight", Hkv * hd, C)
        w(p + "self_attn.o_proj.weight", C, H * hd)
        if qwen:
            for n, d in (("q", H * hd), ("k", Hkv * hd), ("v", Hkv * hd)):
                w(p + f"self_attn.{n}_proj.bias", d, scale=0.1)
        if qwen and l == 0:
            F = cfg["intermediate_size"]
            w(p + "mlp.gate_proj.weight", F, C)
            w(p + "mlp.up_proj.weight", F, C)
            w(p + "mlp.down_proj.weight", C, F)
            continue
        m = p + ("mlp." if qwen else "block_sparse_moe.")
        f = cfg["moe_intermediate_size"] if qwen else cfg["intermediate_size"]
        w(m + "gate.weight", E, C, scale=1.0)
        for e in range(E):
            names = ("gate_proj", "up_proj", "down_proj") if qwen else ("w1", "w3", "w2")
            w(m + f"experts.{e}.{names[0]}.weight", f, C)
            w(m + f"experts.{e}.{names[1]}.weight", f, C)
            w(m + f"experts.{e}.{names[2]}.weight", C, f)
        if qwen:
            Fs = cfg["shared_expert_intermediate_size"]
            w(m + "shared_expert.gate_proj.weight", Fs, C)
            w(m + "shared_expert.up_proj.weight", Fs, C)
            w(m + "shared_expert.down_proj.weight", C, Fs)
            w(m + "shared_expert_gate.weight", 1, C)
    w("model.norm.weight", C, scale=0.1)
    W["model.norm.weight"] += 1
    if not qwen:
        w("lm_head.weight", V, C)
    tokens = g.integers(0, V, size=(2, 12)).astype(np.int32)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
        fh.write("\n")
    st_write(os.path.join(out, "model.safetensors"), W, {"format": "pt"})
    logits, margin = forward(cfg, W, tokens)
    # fp32 must select the same experts as float64: no near-ties in routing
    if margin < 1e-3:
        return make_fixture(out, arch, seed + 1000)
    print("%s: seed %d, smallest top-k routing margin %.3g" % (out, seed, margin))
    st_write(os.path.join(out, "logits.safetensors"), {"tokens": tokens, "logits": logits.numpy()},
             {"source": "tests/hf_reference.py make-fixture %s --arch %s --seed %d" % (out, arch, seed)})


def main(argv):
    torch.set_default_dtype(torch.float64)
    if len(argv) >= 2 and argv[1] == "make-fixture":
        out = argv[2]
        arch = argv[argv.index("--arch") + 1]
        seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 1
        make_fixture(out, arch, seed)
        return 0
    if len(argv) == 5 and argv[1] == "logits":
        d = argv[2]
        cfg = json.load(open(d + "/config.json"))
        W = st_read(d + "/model.safetensors")
        if argv[3].endswith(".safetensors"):
            tokens = st_read(argv[3])["tokens"]
        else:
            tokens = np.array([[int(t) for t in argv[3].split(",")]], dtype=np.int32)
        logits, _ = forward(cfg, W, tokens)
        st_write(argv[4], {"logits": logits.numpy()})
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
