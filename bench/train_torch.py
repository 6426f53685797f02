#!/usr/bin/python3
"""The PyTorch peer of `cmoe train`: the same MoE language model (a cmoe JSON config,
default configs/laptop.json), the same loss, optimizer and data, trained on the CPU with
the same batch, sequence length and thread count; prints training tokens/s.

The model (src/model/model.h): byte embedding; L blocks of RMSNorm -> causal attention with
RoPE (Llama's rotate_half) and grouped-query heads -> residual -> RMSNorm -> MoE FFN ->
residual; final RMSNorm; untied LM head. The MoE FFN: softmax router, top-k, weights
renormalised (norm_topk_prob), dropless, SwiGLU experts [E, C, f] without biases, i.e.
Mixtral. Loss = mean cross-entropy + per layer router_aux_loss_coef * lb +
router_z_loss_coef * z with cmoe's conventions (ref/aux_loss.c): lb = E * sum_e f_e P_e,
f_e = share of all T*k choices that went to e, P_e = mean router probability;
z = mean_t logsumexp(logits_t)^2. AdamW (betas 0.9/0.95, eps 1e-8, weight decay 0.1 on
matrices only), clipping at global norm 1, linear warmup min(100, steps/10) then cosine
to 0.1*lr, peak lr 3e-3: `cmoe train`'s defaults. Weights N(0, initializer_range^2).
Data: bytes of datasets/brown/brown.txt.gz, the first 90% for training, B rows of S+1
consecutive bytes at uniform random offsets per step (cmoe draws its offsets with
Philox, this script with torch's generator: same distribution, not the same rows).

The MoE FFN comes in four formulations (--formulations), all the same function:
  loop    Hugging Face transformers' MixtralSparseMoeBlock: a Python loop over experts,
          torch.where on a one-hot mask, index_add_ back;
  sorted  tokens sorted by expert once, one gather, torch.split, one matmul chain per
          expert, one index_add_ (Megablocks/Tutel without custom kernels);
  padded  sorted rows scattered into [E, max_count, C], three torch.bmm (GShard's padded
          dispatch with capacity = the largest expert's load);
  dense   every expert on every token with three torch.bmm over [E, T, C] and the gate
          weights zero outside the top-k: E/k times the expert FLOPs, no gather/scatter.

What is timed: one training step — drawing the batch, forward, backward, clipping, the
AdamW update — as `cmoe train` times its steps (src/cli/train.c). A run builds a fresh
model, takes --warmup untimed steps, then --steps timed ones; its tokens/s is the median
of the per-step B*S/step_time (the same statistic bench/train_compare.sh takes from
cmoe's metrics.jsonl). The reported figure is the median over --runs runs.

Thread settings: OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=1 (set before torch is
imported) and torch.set_num_threads(threads): what ran fastest for Debian's PyTorch here.
OPENBLAS_CORETYPE is left as the environment sets it.

Usage: bench/train_torch.py --threads 2 [--batch 8 --seq 128 --steps 30 --warmup 5
       --runs 3 --formulations loop,sorted,padded,dense --json]
       bench/train_torch.py --check-run RUN_DIR    # same model: compare with cmoe eval
       bench/train_torch.py --ceiling --threads 2  # one sgemm of a step's FLOPs
bench/train_compare.sh runs cmoe and this script and prints the ratios.
"""
import argparse
import gzip
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "laptop.json"))
    p.add_argument("--data", default=os.path.join(ROOT, "datasets", "brown", "brown.txt.gz"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blas-threads", type=int, default=1,
                   help="OPENBLAS_NUM_THREADS (default 1: torch's own threads, plus OpenBLAS's, oversubscribe)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--total-steps", type=int, default=600, help="the lr schedule's horizon (cmoe train's --steps)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--formulations", default="loop,sorted,padded,dense")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--check-run", metavar="RUN_DIR",
                   help="instead of timing: load RUN_DIR/model.safetensors (written by cmoe train) and print the "
                        "validation loss of its first --check-batches batches, to compare with "
                        "`cmoe eval RUN_DIR --max-batches N` (the same model must give the same loss)")
    p.add_argument("--check-batches", type=int, default=3)
    p.add_argument("--ceiling", action="store_true",
                   help="instead of training: the machine's ceiling, one sgemm (torch.mm, i.e. OpenBLAS with "
                        "--threads threads of its own) of the FLOPs of one training step, a cube of side "
                        "(FLOPs/2)^(1/3), median of 3 after one warm-up call")
    a = p.parse_args()
    for name in ("batch", "seq", "threads", "steps", "runs"):
        if getattr(a, name) < 1:
            p.error("--%s must be >= 1" % name)
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    return a


ARGS = parse()
if ARGS.ceiling:  # OpenBLAS alone, with its own threads
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["OPENBLAS_NUM_THREADS"] = str(ARGS.threads)
else:
    os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)
    os.environ["OPENBLAS_NUM_THREADS"] = str(ARGS.blas_threads)
import torch  # noqa: E402  (after the thread settings)
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(1 if ARGS.ceiling else ARGS.threads)


# ---- the configuration ---------------------------------------------------------------

def load_config(path):
    with open(path) as fh:
        c = json.load(fh)
    # this peer implements Mixtral-style layers only: refuse anything else rather than
    # time a different model
    want = {"hidden_act": "swiglu", "router": "topk", "scoring_func": "softmax", "norm_topk_prob": True,
            "capacity_factor": 0.0, "n_shared_experts": 0, "residual_moe": False, "qkv_bias": False,
            "router_jitter_noise": 0.0, "use_expert_bias": False, "decoder_sparse_step": 1,
            "first_k_dense_replace": 0, "num_experts_per_layer": [], "importance_loss_coef": 0.0,
            "load_loss_coef": 0.0, "mi_loss_coef": 0.0}
    for k, v in want.items():
        if k in c and c[k] != v:
            sys.exit("train_torch.py: %s: %s = %r, only %r is implemented" % (path, k, c[k], v))
    if not c.get("head_dim"):
        c["head_dim"] = c["hidden_size"] // c["num_attention_heads"]
    c.setdefault("moe_intermediate_size", c["intermediate_size"])
    c.setdefault("tie_word_embeddings", False)
    c.setdefault("router_aux_loss_coef", 0.01)
    c.setdefault("router_z_loss_coef", 0.0)
    c.setdefault("rms_norm_eps", 1e-5)
    c.setdefault("rope_theta", 10000.0)
    c.setdefault("initializer_range", 0.02)
    return c


# ---- the model -------------------------------------------------------------------------

def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_tables(S, hd, theta):
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # [hd/2]
    ang = torch.arange(S, dtype=torch.float64)[:, None] * inv[None, :]  # [S, hd/2]
    ang = torch.cat([ang, ang], dim=-1)  # [S, hd]: rotate_half pairs (i, i + hd/2)
    return ang.cos().float(), ang.sin().float()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def attention(x, p, c, cos, sin, mask):
    B, S, C = x.shape
    H, Hkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    q = (x @ p["q"]).view(B, S, H, hd).transpose(1, 2)  # [B, H, S, hd]
    k = (x @ p["k"]).view(B, S, Hkv, hd).transpose(1, 2)
    v = (x @ p["v"]).view(B, S, Hkv, hd).transpose(1, 2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))
    att = att.masked_fill(mask, float("-inf")).softmax(-1)
    y = (att @ v).transpose(1, 2).reshape(B, S, H * hd)
    return y @ p["o"]


def route(x, wr, k):
    """softmax -> top-k -> renormalise; lb and z with cmoe's conventions."""
    logits = x @ wr  # [T, E]
    probs = F.softmax(logits, dim=-1)
    w, sel = torch.topk(probs, k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    E = wr.shape[1]
    counts = torch.bincount(sel.flatten(), minlength=E).to(probs.dtype)
    lb = E * torch.sum(counts / sel.numel() * probs.mean(dim=0))
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return w, sel, lb, z


def swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def experts(p):
    """Per-expert weights as views from one unbind: indexing p["w1"][e] in the loop
    instead makes each expert's backward write a zero-filled gradient of the whole
    [E, d, f] tensor."""
    return p["w1"].unbind(0), p["w3"].unbind(0), p["w2"].unbind(0)


def moe_loop(x, p, k):
    """Hugging Face transformers' MixtralSparseMoeBlock.forward, weights as [E, in, out]."""
    E = p["w1"].shape[0]
    w, sel, lb, z = route(x, p["wr"], k)
    y = torch.zeros_like(x)
    mask = F.one_hot(sel, num_classes=E).permute(2, 1, 0)  # [E, k, T]
    W1, W3, W2 = experts(p)
    for e in range(E):
        idx, top_x = torch.where(mask[e])
        if top_x.numel() == 0:
            continue
        cur = swiglu(x[top_x], W1[e], W3[e], W2[e]) * w[top_x, idx, None]
        y.index_add_(0, top_x, cur)
    return y, lb, z


def sorted_rows(x, p, k):
    E = p["w1"].shape[0]
    w, sel, lb, z = route(x, p["wr"], k)
    flat = sel.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    return w.flatten()[order], order // k, counts, lb, z


def moe_sorted(x, p, k):
    ws, tok, counts, lb, z = sorted_rows(x, p, k)
    # split, not slicing: a slice's backward writes a zero-filled copy of all of xe
    parts = torch.split(x[tok], counts)
    W1, W3, W2 = experts(p)
    outs = [swiglu(xs, W1[e], W3[e], W2[e]) for e, xs in enumerate(parts) if counts[e]]
    ye = torch.cat(outs) * ws[:, None]
    return torch.zeros_like(x).index_add_(0, tok, ye), lb, z


def moe_padded(x, p, k):
    ws, tok, counts, lb, z = sorted_rows(x, p, k)
    E, C = p["w1"].shape[0], x.shape[1]
    cap = max(counts)
    starts = torch.tensor([0] + counts[:-1]).cumsum(0)
    eid = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    slot = eid * cap + (torch.arange(tok.numel()) - starts[eid])
    xp = x.new_zeros(E * cap, C).index_copy(0, slot, x[tok]).view(E, cap, C)
    h = F.silu(torch.bmm(xp, p["w1"])) * torch.bmm(xp, p["w3"])
    yp = torch.bmm(h, p["w2"]).view(E * cap, C)
    ye = yp[slot] * ws[:, None]
    return torch.zeros_like(x).index_add_(0, tok, ye), lb, z


def moe_dense(x, p, k):
    w, sel, lb, z = route(x, p["wr"], k)
    E = p["w1"].shape[0]
    gate = torch.zeros(x.shape[0], E, dtype=x.dtype).scatter(1, sel, w)  # [T, E], zero off the top-k
    xe = x.unsqueeze(0).expand(E, -1, -1)  # [E, T, C]
    h = F.silu(torch.bmm(xe, p["w1"])) * torch.bmm(xe, p["w3"])
    ye = torch.bmm(h, p["w2"])  # [E, T, C]
    return torch.einsum("etc,te->tc", ye, gate), lb, z


FORMS = {"loop": moe_loop, "sorted": moe_sorted, "padded": moe_padded, "dense": moe_dense}


def make_params(c, gen):
    C, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    H, Hkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    E, f = c["num_local_experts"], c["moe_intermediate_size"]
    sd = c["initializer_range"]

    def w(*shape):
        return (torch.randn(*shape, generator=gen) * sd).requires_grad_(True)

    def ones(n):
        return torch.ones(n).requires_grad_(True)

    P = {"embed": w(V, C), "norm": ones(C), "layers": []}
    if not c["tie_word_embeddings"]:
        P["head"] = w(V, C)  # [out, in] as HF
    for _ in range(L):
        P["layers"].append({"ln1": ones(C), "q": w(C, H * hd), "k": w(C, Hkv * hd), "v": w(C, Hkv * hd),
                            "o": w(H * hd, C), "ln2": ones(C), "wr": w(C, E), "w1": w(E, C, f), "w3": w(E, C, f),
                            "w2": w(E, f, C)})
    return P


def all_params(P):
    out = [P["embed"], P["norm"]] + ([P["head"]] if "head" in P else [])
    for lp in P["layers"]:
        out += list(lp.values())
    return out


def forward(P, c, moe, inp, tgt, cos, sin, mask):
    B, S = inp.shape
    eps, k = c["rms_norm_eps"], c["num_experts_per_tok"]
    x = P["embed"][inp]  # [B, S, C]
    aux = 0.0
    for lp in P["layers"]:
        x = x + attention(rmsnorm(x, lp["ln1"], eps), lp, c, cos, sin, mask)
        h = rmsnorm(x, lp["ln2"], eps).view(B * S, -1)
        y, lb, z = moe(h, lp, k)
        x = x + y.view(B, S, -1)
        aux = aux + c["router_aux_loss_coef"] * lb + c["router_z_loss_coef"] * z
    x = rmsnorm(x, P["norm"], eps)
    logits = x @ (P["head"] if "head" in P else P["embed"]).t()
    ce = F.cross_entropy(logits.view(B * S, -1), tgt.reshape(-1))
    return ce, aux


def step_flops(c, B, S):
    """GEMM FLOPs of one training step: forward 2*m*n*k per matmul, backward twice that.
    Attention counts the causal half (S(S+1)/2 score pairs per head), experts the T*k
    routed rows, the head the untied or tied V x C matrix; norms, RoPE, softmax and the
    optimizer are not counted."""
    T, C, V, L = B * S, c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    H, Hkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    E, f, k = c["num_local_experts"], c["moe_intermediate_size"], c["num_experts_per_tok"]
    per_layer = (2 * T * C * (H + 2 * Hkv) * hd + 2 * T * H * hd * C  # q, k, v, o
                 + 2 * 2 * B * H * hd * S * (S + 1) // 2  # q.k^T and p.v, causal
                 + 2 * T * C * E + 3 * 2 * T * k * C * f)  # router, SwiGLU experts
    return 3 * (L * per_layer + 2 * T * C * V)


# ---- data, schedule, one run -------------------------------------------------------------

def load_bytes(path):
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    return data[: len(data) - int(math.floor(0.1 * len(data) + 0.5))]  # the last 10% is validation


def lr_at(a, step):
    warm = min(100, a.total_steps // 10)
    if warm > 0 and step < warm:
        return a.lr * (step + 1) / warm
    if a.total_steps <= warm:
        return a.lr
    prog = min(1.0, (step - warm) / (a.total_steps - warm))
    lo = 0.1 * a.lr
    return lo + 0.5 * (1 + math.cos(math.pi * prog)) * (a.lr - lo)


def one_run(a, c, moe, data, run):
    gen = torch.Generator().manual_seed(a.seed + 1000 * run)
    P = make_params(c, gen)
    params = all_params(P)
    decay = [t for t in params if t.dim() >= 2]
    no_decay = [t for t in params if t.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    B, S = a.batch, a.seq
    cos, sin = rope_tables(S, c["head_dim"], c["rope_theta"])
    mask = torch.ones(S, S, dtype=torch.bool).triu(1)
    rows = torch.arange(S + 1)
    rates, losses = [], []
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        starts = torch.randint(0, len(data) - S, (B,), generator=gen)
        chunk = data[starts[:, None] + rows]  # [B, S+1]
        inp, tgt = chunk[:, :-1], chunk[:, 1:]
        for g in opt.param_groups:
            g["lr"] = lr_at(a, step)
        opt.zero_grad(set_to_none=True)
        ce, aux = forward(P, c, moe, inp, tgt, cos, sin, mask)
        loss = ce + aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lv = loss.item()
        dt = time.perf_counter() - t0
        if not math.isfinite(lv):
            sys.exit("train_torch.py: the loss is %g at step %d" % (lv, step + 1))
        losses.append(lv)
        if step >= a.warmup:
            rates.append(B * S / dt)
    return statistics.median(rates), losses[-1]


# ---- the same model as cmoe's: its weights, its validation loss ---------------------------

def load_cmoe_run(run_dir):
    """Parameters from a cmoe run's safetensors (F32, cmoe's names and [in, out] layout)."""
    import struct
    with open(os.path.join(run_dir, "model.safetensors"), "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
        blob = fh.read()
    c = json.loads(header["__metadata__"]["config"])

    def t(name):
        h = header[name]
        if h["dtype"] != "F32":
            sys.exit("train_torch.py: %s is %s, not F32" % (name, h["dtype"]))
        a, b = h["data_offsets"]
        return torch.frombuffer(bytearray(blob[a:b]), dtype=torch.float32).view(h["shape"]).clone()

    P = {"embed": t("model.embed_tokens.weight"), "norm": t("model.norm.weight"), "layers": []}
    if "lm_head.weight" in header:
        P["head"] = t("lm_head.weight")
    for i in range(c["num_hidden_layers"]):
        pre, moe = "model.layers.%d." % i, "model.layers.%d.block_sparse_moe." % i
        P["layers"].append({"ln1": t(pre + "input_layernorm.weight"), "q": t(pre + "self_attn.q_proj.weight"),
                            "k": t(pre + "self_attn.k_proj.weight"), "v": t(pre + "self_attn.v_proj.weight"),
                            "o": t(pre + "self_attn.o_proj.weight"), "ln2": t(pre + "post_attention_layernorm.weight"),
                            "wr": t(moe + "router.weight"), "w1": t(moe + "experts.w1"), "w3": t(moe + "experts.w3"),
                            "w2": t(moe + "experts.w2")})
    return P


def check_run(a):
    """Validation loss of a cmoe run's weights, on cmoe eval's rows: the validation split
    (the last 10% of the bytes) cut into rows of S+1 tokens advancing by S."""
    c = load_config(os.path.join(a.check_run, "config.json"))
    P = load_cmoe_run(a.check_run)
    with open(a.data, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    val = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()[len(raw) - int(math.floor(0.1 * len(raw) + 0.5)):]
    B, S = a.batch, a.seq
    rows = B * a.check_batches
    if rows * S + 1 > len(val):
        sys.exit("train_torch.py: --check-batches too many for the validation split")
    chunk = torch.stack([val[r * S: r * S + S + 1] for r in range(rows)])
    cos, sin = rope_tables(S, c["head_dim"], c["rope_theta"])
    mask = torch.ones(S, S, dtype=torch.bool).triu(1)
    with torch.no_grad():
        ce, _ = forward(P, c, moe_sorted, chunk[:, :-1], chunk[:, 1:], cos, sin, mask)
    print(json.dumps({"run": a.check_run, "tokens": rows * S, "loss": ce.item()}))
    return 0


def ceiling(a, c):
    flops = step_flops(c, a.batch, a.seq)
    n = int(round((flops / 2) ** (1.0 / 3)))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        torch.mm(x, y)
        times.append(time.perf_counter() - t0)
    gf = 2 * n ** 3 / statistics.median(times[1:]) / 1e9
    print(json.dumps({"sgemm_n": n, "sgemm_threads": a.threads, "sgemm_gflops": gf, "step_flops": flops}))
    return 0


def main():
    a = ARGS
    if a.check_run:
        return check_run(a)
    c = load_config(a.config)
    if a.ceiling:
        return ceiling(a, c)
    if a.seq > c["max_position_embeddings"]:
        sys.exit("train_torch.py: --seq %d > max_position_embeddings %d" % (a.seq, c["max_position_embeddings"]))
    data = load_bytes(a.data)
    res = {"config": a.config, "batch": a.batch, "seq": a.seq, "threads": a.threads,
           "blas_threads": a.blas_threads, "steps": a.steps,
           "warmup": a.warmup, "runs": a.runs, "torch": torch.__version__,
           "statistic": "median over runs of the median per-step batch*seq/step_time",
           "step_flops": step_flops(c, a.batch, a.seq),
           "tokens_per_s": {}, "runs_tokens_per_s": {}, "last_loss": {}}
    for name in a.formulations.split(","):
        if name not in FORMS:
            sys.exit("train_torch.py: unknown formulation '%s' (%s)" % (name, ",".join(FORMS)))
        per_run = [one_run(a, c, FORMS[name], data, r) for r in range(a.runs)]
        res["runs_tokens_per_s"][name] = [r[0] for r in per_run]
        res["tokens_per_s"][name] = statistics.median(r[0] for r in per_run)
        res["last_loss"][name] = per_run[-1][1]
    res["fastest"] = max(res["tokens_per_s"], key=res["tokens_per_s"].get)
    if a.json:
        print(json.dumps(res))
        return 0
    print("torch %s, %s, batch %d x seq %d, %d thread(s) (OpenBLAS %d), %d warmup + %d timed steps, median of %d runs"
          % (torch.__version__, os.path.basename(a.config), a.batch, a.seq, a.threads, a.blas_threads, a.warmup,
             a.steps, a.runs))
    for k, v in res["tokens_per_s"].items():
        print("  torch %-7s %9.0f tok/s  (runs: %s; loss after %d steps %.3f)%s" %
              (k, v, ", ".join("%.0f" % r for r in res["runs_tokens_per_s"][k]), a.warmup + a.steps,
               res["last_loss"][k], "   fastest" if k == res["fastest"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
