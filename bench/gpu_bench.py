#!/usr/bin/python3
"""cmoe's cuda backend against PyTorch on one GPU, in one invocation, in bf16:

  ceiling  a cuBLAS dense GEMM (torch.matmul, bf16, a cube) of each benchmark's FLOPs;
  layer    the MoE layer forward + backward (softmax top-k router with renormalised
           weights, load-balance loss 0.01, dropless, SwiGLU experts [+ shared]):
             cmoe   `cmoe bench layer --backend cuda --dtype bf16 --json`
             loop   Hugging Face transformers' MixtralSparseMoeBlock: a loop over experts
                    (torch.where on the routing mask, index_add_ back)
             gmm    tokens sorted by expert and torch._grouped_mm for the three GEMMs
             gmm+compile  the same function under torch.compile
           on (a) Mixtral  T=16384 d=4096 f=14336 E=8 k=2
              (b) DeepSeekMoE T=16384 d=2048 f=1408 E=64 k=6, and (b+) with its 2 shared
                  experts (one FFN of 2·1408);
  train    tokens/s of `cmoe train --preset P --backend cuda --dtype bf16` against the same
           model in PyTorch (parameters fp32, bf16 autocast, _grouped_mm experts, fused
           AdamW, torch.compile), the same batch and sequence, on random tokens; MFU =
           (cmoe info's forward+backward FLOPs per token) · tokens/s / the bf16 GEMM rate
           measured here.
Every figure is a median of CUDA-event timed iterations after warm-up; ratios print last.

Usage (from a --with-cuda build directory holding ./cmoe, the source tree's configs/):
  python3 bench/gpu_bench.py --cmoe ./cmoe [--shapes a,b,b+] [--train gpu-100m] [--iters 10]
"""
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

os.environ.setdefault("PYTHONUNBUFFERED", "1")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {
    "a": dict(T=16384, d=4096, f=14336, E=8, k=2, shared=0),
    "b": dict(T=16384, d=2048, f=1408, E=64, k=6, shared=0),
    "b+": dict(T=16384, d=2048, f=1408, E=64, k=6, shared=2),
}


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cmoe", default="./cmoe")
    p.add_argument("--shapes", default="a,b,b+")
    p.add_argument("--forms", default="cmoe,loop,gmm,compiled")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--train", default="gpu-100m", help="presets to train, comma-separated ('' for none)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--train-steps", type=int, default=25, help="timed training steps (after --warmup)")
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    return p.parse_args()


A = parse()
DEV = torch.device("cuda")
RESULTS = {}


def log(*a):
    print(*a, flush=True)


def timed(fn, iters, warmup):
    """median ms of fn() over iters, CUDA events, after warmup calls"""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1))
    return statistics.median(ts)


def gemm_ceiling(flops):
    """TFLOP/s of one bf16 cuBLAS GEMM of about `flops` (a cube, random data)"""
    m = int(round((flops / 2) ** (1 / 3) / 256)) * 256
    m = max(1024, min(m, 16384))
    a = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    ms = timed(lambda: a @ b, 10, 3)
    return 2 * m ** 3 / (ms * 1e-3) / 1e12, m


# ---- the MoE layer in PyTorch ----------------------------------------------------------------

def make_layer(s):
    g = torch.Generator(device=DEV).manual_seed(1)
    d, f, E = s["d"], s["f"], s["E"]
    P = {
        "wr": (torch.randn(d, E, device=DEV, generator=g) / math.sqrt(d)).requires_grad_(),  # fp32 router
        # [E, out, in]: _grouped_mm wants its second operand column-major, i.e. a transposed view
        "w1": (torch.randn(E, f, d, device=DEV, generator=g) / math.sqrt(d)).bfloat16().requires_grad_(),
        "w3": (torch.randn(E, f, d, device=DEV, generator=g) / math.sqrt(d)).bfloat16().requires_grad_(),
        "w2": (torch.randn(E, d, f, device=DEV, generator=g) / math.sqrt(f)).bfloat16().requires_grad_(),
    }
    if s["shared"]:
        fs = s["shared"] * f
        P["s1"] = (torch.randn(fs, d, device=DEV, generator=g) / math.sqrt(d)).bfloat16().requires_grad_()
        P["s3"] = (torch.randn(fs, d, device=DEV, generator=g) / math.sqrt(d)).bfloat16().requires_grad_()
        P["s2"] = (torch.randn(d, fs, device=DEV, generator=g) / math.sqrt(fs)).bfloat16().requires_grad_()
    # x needs its gradient, as a layer inside a model does and as cmoe bench layer computes it:
    # without it autograd skips the two GEMMs of dx (2 of the experts' 9) and the dispatch backward
    x = torch.randn(s["T"], d, device=DEV, generator=g).bfloat16().requires_grad_()
    dy = (torch.randn(s["T"], d, device=DEV, generator=g) / math.sqrt(s["T"])).bfloat16()
    return P, x, dy


def route(x, wr, k):
    logits = x.float() @ wr
    probs = logits.softmax(-1)
    w, sel = probs.topk(k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    E = wr.shape[1]
    counts = torch.bincount(sel.flatten(), minlength=E)
    lb = E * torch.sum(counts.float() / sel.numel() * probs.mean(0))
    return w, sel, counts, lb


def shared(x, P):
    if "s1" not in P:
        return 0
    return (F.silu(x @ P["s1"].t()) * (x @ P["s3"].t())) @ P["s2"].t()


def moe_loop(x, P, k):
    """transformers' MixtralSparseMoeBlock.forward"""
    E = P["w1"].shape[0]
    w, sel, _, lb = route(x, P["wr"], k)
    w = w.to(x.dtype)
    y = torch.zeros_like(x)
    mask = F.one_hot(sel, num_classes=E).permute(2, 1, 0)
    # per-expert views from one unbind (an nn.Linear per expert, as transformers has it;
    # indexing w1[e] instead would make each expert's backward write a whole [E, f, d] gradient)
    W1, W3, W2 = P["w1"].unbind(0), P["w3"].unbind(0), P["w2"].unbind(0)
    for e in range(E):
        idx, top = torch.where(mask[e])
        xe = x[top]
        he = (F.silu(xe @ W1[e].t()) * (xe @ W3[e].t())) @ W2[e].t()
        y.index_add_(0, top, he * w[top, idx, None])
    return y + shared(x, P), lb


def moe_gmm(x, P, k):
    """sorted by expert, three torch._grouped_mm"""
    T = x.shape[0]
    w, sel, counts, lb = route(x, P["wr"], k)
    flat = sel.flatten()
    order = torch.argsort(flat, stable=True)
    tok = order // k
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x[tok]
    h1 = torch._grouped_mm(xs, P["w1"].transpose(-2, -1), offs=offs)
    h3 = torch._grouped_mm(xs, P["w3"].transpose(-2, -1), offs=offs)
    ye = torch._grouped_mm(F.silu(h1) * h3, P["w2"].transpose(-2, -1), offs=offs)
    ye = ye * w.flatten()[order].to(x.dtype)[:, None]
    y = torch.zeros(T, x.shape[1], device=x.device, dtype=x.dtype).index_add_(0, tok, ye)
    return y + shared(x, P), lb


def bench_layer_torch(s, form):
    P, x, dy = make_layer(s)
    fn = {"loop": moe_loop, "gmm": moe_gmm, "compiled": torch.compile(moe_gmm)}[form]

    def step():
        for p in list(P.values()) + [x]:
            p.grad = None
        y, lb = fn(x, P, s["k"])
        (torch.sum(y.float() * dy.float()) + 0.01 * lb).backward()

    ms = timed(step, A.iters, A.warmup + (2 if form == "compiled" else 0))
    del P, x, dy
    torch.cuda.empty_cache()
    return ms


def bench_layer_cmoe(s):
    cmd = [A.cmoe, "bench", "layer", "--backend", "cuda", "--dtype", "bf16", "--tokens", str(s["T"]), "--d-model",
           str(s["d"]), "--d-ff", str(s["f"]), "--experts", str(s["E"]), "--top-k", str(s["k"]), "--shared",
           str(s["shared"]), "--iters", str(A.iters), "--warmup", str(A.warmup), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError("cmoe bench layer failed: " + out.stderr.strip()[-400:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def layer_flops(s):
    """forward 2mnk per GEMM (router, 3 expert GEMMs over T·k rows, shared), backward twice"""
    T, d, f, E, k = s["T"], s["d"], s["f"], s["E"], s["k"]
    fwd = 2 * T * d * E + 3 * 2 * T * k * d * f + 3 * 2 * T * d * f * s["shared"]
    return 3 * fwd


# ---- training ---------------------------------------------------------------------------------

def load_preset(name):
    here = os.path.dirname(os.path.abspath(__file__))
    for d in ("configs", os.path.join(here, "..", "configs")):
        p = os.path.join(d, name + ".json")
        if os.path.exists(p):
            with open(p) as fh:
                return json.load(fh)
    raise FileNotFoundError(name)


class Model(torch.nn.Module):
    """cmoe's model (src/model/model.h) with Mixtral layers: RMSNorm, RoPE GQA attention,
    RMSNorm, softmax top-k MoE with renormalised weights and SwiGLU experts, tied or untied
    head; loss = CE + lb_coef·lb + z_coef·z per layer."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        C, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
        H, Hkv = c["num_attention_heads"], c["num_key_value_heads"]
        hd = c.get("head_dim") or C // H
        E, f = c["num_local_experts"], c["moe_intermediate_size"]
        self.H, self.Hkv, self.hd, self.E, self.k = H, Hkv, hd, E, c["num_experts_per_tok"]
        std = c.get("initializer_range", 0.02)

        def P(*shape):
            return torch.nn.Parameter(torch.randn(*shape) * std)

        self.wte = P(V, C)
        self.lm = None if c.get("tie_word_embeddings") else P(V, C)
        self.blocks = torch.nn.ModuleList()
        for _ in range(L):
            b = torch.nn.Module()
            b.ln1, b.ln2 = torch.nn.Parameter(torch.ones(C)), torch.nn.Parameter(torch.ones(C))
            b.wq, b.wk, b.wv, b.wo = P(H * hd, C), P(Hkv * hd, C), P(Hkv * hd, C), P(C, H * hd)
            b.wr = P(C, E)
            b.w1, b.w3, b.w2 = P(E, f, C), P(E, f, C), P(E, C, f)
            self.blocks.append(b)
        self.normf = torch.nn.Parameter(torch.ones(C))
        inv = c.get("rope_theta", 1e4) ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = torch.arange(c["max_position_embeddings"], dtype=torch.float64)[:, None] * inv[None, :]
        ang = torch.cat([ang, ang], -1)
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def forward(self, idx, tgt):
        c, B, S = self.c, idx.shape[0], idx.shape[1]
        eps = c.get("rms_norm_eps", 1e-5)
        x = F.embedding(idx, self.wte)
        cos, sin = self.cos[:S], self.sin[:S]
        aux = 0.0
        for b in self.blocks:
            h = F.rms_norm(x, (x.shape[-1],), b.ln1, eps)
            q = F.linear(h, b.wq).view(B, S, self.H, self.hd).transpose(1, 2)
            k = F.linear(h, b.wk).view(B, S, self.Hkv, self.hd).transpose(1, 2)
            v = F.linear(h, b.wv).view(B, S, self.Hkv, self.hd).transpose(1, 2)
            q = q * cos + torch.cat([-q[..., self.hd // 2:], q[..., :self.hd // 2]], -1) * sin
            k = k * cos + torch.cat([-k[..., self.hd // 2:], k[..., :self.hd // 2]], -1) * sin
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.Hkv != self.H)
            x = x + F.linear(a.transpose(1, 2).reshape(B, S, -1), b.wo)
            h = F.rms_norm(x, (x.shape[-1],), b.ln2, eps).reshape(B * S, -1)
            with torch.autocast("cuda", enabled=False):  # the router in fp32, as cmoe's
                logits = h.float() @ b.wr.float()
            probs = logits.softmax(-1)
            w, sel = probs.topk(self.k, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            counts = torch.bincount(sel.flatten(), minlength=self.E)
            aux = aux + c.get("router_aux_loss_coef", 0.01) * self.E * torch.sum(
                counts.float() / sel.numel() * probs.mean(0))
            aux = aux + c.get("router_z_loss_coef", 0.0) * torch.logsumexp(logits, -1).pow(2).mean()
            order = torch.argsort(sel.flatten(), stable=True)
            tok = order // self.k
            offs = torch.cumsum(counts, 0).to(torch.int32)
            hs = h[tok].to(torch.bfloat16)
            w1, w3, w2 = (t.to(torch.bfloat16).transpose(-2, -1) for t in (b.w1, b.w3, b.w2))
            g = torch._grouped_mm(hs, w1, offs=offs)
            u = torch._grouped_mm(hs, w3, offs=offs)
            ye = torch._grouped_mm(F.silu(g) * u, w2, offs=offs)
            ye = ye * w.flatten()[order].to(ye.dtype)[:, None]
            y = torch.zeros(B * S, x.shape[-1], device=x.device, dtype=ye.dtype).index_add_(0, tok, ye)
            x = x + y.reshape(B, S, -1).to(x.dtype)
        x = F.rms_norm(x, (x.shape[-1],), self.normf, eps)
        logits = F.linear(x, self.lm if self.lm is not None else self.wte)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1)) + aux


def bench_train_torch(c):
    torch.manual_seed(0)
    m = Model(c).to(DEV)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    fwd = torch.compile(m)
    V, B, S = c["vocab_size"], A.batch, A.seq
    idx = torch.randint(0, V, (B, S + 1), device=DEV)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(idx[:, :-1], idx[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()

    ms = timed(step, A.train_steps, A.warmup + 2)
    del m, opt
    torch.cuda.empty_cache()
    return B * S / (ms * 1e-3)


def bench_train_cmoe(name, outdir):
    c = load_preset(name)
    cmd = [A.cmoe, "train", "--preset", name, "--backend", "cuda", "--dtype", "bf16", "--data",
           "synth:vocab=%d" % c["vocab_size"], "--batch", str(A.batch), "--seq", str(A.seq), "--steps",
           str(A.train_steps + A.warmup), "--eval-every", "0", "--eval-batches", "1", "--log-every", "1000",
           "--out", outdir, "--force"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError("cmoe train failed: " + (out.stderr or out.stdout).strip()[-600:])
    tps = []
    with open(os.path.join(outdir, "metrics.jsonl")) as fh:
        for line in fh:
            j = json.loads(line)
            if j["step"] > A.warmup:
                tps.append(j["tokens_per_s"])
    info = subprocess.run([A.cmoe, "info", "--preset", name, "--seq", str(A.seq), "--json"], capture_output=True,
                          text=True)
    flops = json.loads(info.stdout)["flops_per_token_fwdbwd"]
    return statistics.median(tps), flops


# ---- main ------------------------------------------------------------------------------------

def main():
    log("gpu_bench: %s, torch %s, %s" % (torch.cuda.get_device_name(), torch.__version__,
                                          subprocess.run([A.cmoe, "--version"], capture_output=True,
                                                         text=True).stdout.splitlines()[0]))
    forms = [f for f in A.forms.split(",") if f]
    table = []
    for name in [s for s in A.shapes.split(",") if s]:
        s = SHAPES[name]
        fl = layer_flops(s)
        peak, side = gemm_ceiling(fl)
        row = {"shape": name, "gflop": fl / 1e9, "ceiling_tflops": peak, "ceiling_side": side}
        log("(%s) T=%d d=%d f=%d E=%d k=%d shared=%d: %.1f GFLOP per fwd+bwd; cuBLAS bf16 %d^3: %.0f TFLOP/s "
            "-> floor %.2f ms" % (name, s["T"], s["d"], s["f"], s["E"], s["k"], s["shared"], fl / 1e9, side, peak,
                                  fl / (peak * 1e12) * 1e3))
        for form in forms:
            try:
                if form == "cmoe":
                    j = bench_layer_cmoe(s)
                    ms = j["ms_median"]
                    row["cmoe_phases_ms"] = j["phases_ms"]
                else:
                    ms = bench_layer_torch(s, form)
                row[form + "_ms"] = ms
                log("  %-9s %9.2f ms  %6.0f TFLOP/s  %5.1f%% of the GEMM ceiling" % (
                    form, ms, fl / (ms * 1e-3) / 1e12, 100 * fl / (ms * 1e-3) / 1e12 / peak))
            except Exception as e:  # report and go on: one peer failing must not hide the others
                log("  %-9s failed: %s" % (form, str(e)[:300]))
                torch.cuda.empty_cache()
        table.append(row)
    trains = []
    for name in [t for t in A.train.split(",") if t]:
        try:
            c = load_preset(name)
            tc, flops = bench_train_cmoe(name, "/tmp/gpu_bench_" + name)
            peak, _ = gemm_ceiling(flops * A.batch * A.seq)
            r = {"preset": name, "cmoe_tokens_s": tc, "flops_per_token": flops, "ceiling_tflops": peak,
                 "cmoe_mfu": flops * tc / (peak * 1e12)}
            log("train %s: cmoe %.0f tokens/s, MFU %.1f%% (%.1f MFLOP/token, bf16 GEMM %.0f TFLOP/s)" % (
                name, tc, 100 * r["cmoe_mfu"], flops / 1e6, peak))
            try:
                tt = bench_train_torch(c)
                r["torch_tokens_s"], r["torch_mfu"] = tt, flops * tt / (peak * 1e12)
                log("train %s: torch %.0f tokens/s, MFU %.1f%%" % (name, tt, 100 * r["torch_mfu"]))
            except Exception as e:
                log("train %s: torch failed: %s" % (name, str(e)[:300]))
            trains.append(r)
        except Exception as e:
            log("train %s: failed: %s" % (name, str(e)[:400]))
    log("\nratios (PyTorch's time / cmoe's: > 1 means cmoe is faster)")
    for r in table:
        if "cmoe_ms" not in r:
            continue
        parts = ["%s %.2fx" % (f, r[f + "_ms"] / r["cmoe_ms"]) for f in forms if f != "cmoe" and f + "_ms" in r]
        log("  (%s) cmoe %.2f ms, %.0f%% of cuBLAS: %s" % (r["shape"], r["cmoe_ms"], 100 * r["gflop"] / (
            r["cmoe_ms"] * 1e-3) / 1e3 / r["ceiling_tflops"], ", ".join(parts)))
    for r in trains:
        if "torch_tokens_s" in r:
            log("  train %s: cmoe / torch tokens/s %.2fx; MFU cmoe %.1f%%, torch %.1f%%" % (
                r["preset"], r["cmoe_tokens_s"] / r["torch_tokens_s"], 100 * r["cmoe_mfu"], 100 * r["torch_mfu"]))
    if A.json:
        with open(A.json, "w") as fh:
            json.dump({"layers": table, "train": trains}, fh, indent=1)


if __name__ == "__main__":
    main()
