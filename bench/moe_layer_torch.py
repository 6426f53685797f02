#!/usr/bin/python3
"""The PyTorch peer of `cmoe bench layer`: the same MoE layer (softmax top-k router with
renormalised weights, dropless, SwiGLU experts, optional shared experts, load-balance
loss 0.01) timed forward + backward on the CPU with the same shape and thread count, in
three formulations, and `cmoe bench layer --json` run on the same shape in the same
invocation so that the printed ratios come from one run:

  loop    Hugging Face Mixtral's MixtralSparseMoeBlock: a loop over experts, each taking
          its tokens with torch.where on a one-hot mask and adding back with index_add_;
  sorted  tokens sorted by expert once (argsort), one gather, a loop of matmuls over
          contiguous slices, one index_add_ (what Megablocks/Tutel do without kernels);
  padded  the sorted rows scattered into [E, max_count, d] and three batched bmm calls
          (GShard's padded dispatch, with capacity = the largest expert's load).

Usage: bench/moe_layer_torch.py --cmoe ./cmoe --tokens 4096 --d-model 512 --d-ff 2048
       --experts 8 --top-k 2 --threads 2   (see --help)
The peer gets the settings that ran fastest here: OMP_NUM_THREADS=threads and
OPENBLAS_NUM_THREADS=1 (set before torch is imported); torch.set_num_threads(threads).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--shared", type=int, default=0, help="shared experts, each of size d-ff")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--formulations", default="loop,sorted,padded")
    p.add_argument("--cmoe", help="path of the cmoe binary: also run `cmoe bench layer --json`")
    p.add_argument("--cmoe-iters", type=int, default=None, help="cmoe's --iters (default: --iters)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args()
    for name in ("tokens", "d_model", "d_ff", "experts", "top_k", "threads", "iters"):
        if getattr(a, name) < 1:
            p.error("--%s must be >= 1" % name.replace("_", "-"))
    if a.top_k > a.experts:
        p.error("--top-k exceeds --experts")
    return a


ARGS = parse()
os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)
os.environ["OPENBLAS_NUM_THREADS"] = os.environ.get("PEER_OPENBLAS_THREADS", "1")
import torch  # noqa: E402  (after the thread settings)
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(ARGS.threads)


def route(x, wr, k):
    """softmax -> top-k -> renormalise; the Switch/Mixtral load-balance loss (cmoe's convention)."""
    logits = x @ wr
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    w, sel = torch.topk(probs, k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    E = wr.shape[1]
    counts = torch.bincount(sel.flatten(), minlength=E).to(probs.dtype)
    lb = E * torch.sum(counts / sel.numel() * probs.mean(dim=0))
    return w, sel, lb


def swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def experts(P):
    """The per-expert weights as views from one unbind: indexing P["w1"][e] in the loop
    instead makes every expert's backward write a zero-filled gradient of the whole
    [E, d, f] tensor (E² · d · f work: minutes at E = 64)."""
    return P["w1"].unbind(0), P["w3"].unbind(0), P["w2"].unbind(0)


def moe_loop(x, P, k):
    """Hugging Face transformers' MixtralSparseMoeBlock.forward, weights as [E, in, out]."""
    T, d = x.shape
    E = P["w1"].shape[0]
    w, sel, lb = route(x, P["wr"], k)
    y = torch.zeros_like(x)
    mask = F.one_hot(sel, num_classes=E).permute(2, 1, 0)  # [E, k, T]
    W1, W3, W2 = experts(P)
    for e in range(E):
        idx, top_x = torch.where(mask[e])
        if top_x.numel() == 0:
            continue
        cur = swiglu(x[top_x], W1[e], W3[e], W2[e]) * w[top_x, idx, None]
        y.index_add_(0, top_x, cur)
    return y, lb


def sorted_rows(x, P, k):
    T, d = x.shape
    E = P["w1"].shape[0]
    w, sel, lb = route(x, P["wr"], k)
    flat = sel.flatten()
    order = torch.argsort(flat, stable=True)
    tok = order // k
    counts = torch.bincount(flat, minlength=E).tolist()
    return w.flatten()[order], tok, counts, lb


def moe_sorted(x, P, k):
    ws, tok, counts, lb = sorted_rows(x, P, k)
    # split, not slicing: a slice's backward writes a zero-filled copy of all of xe
    parts = torch.split(x[tok], counts)
    W1, W3, W2 = experts(P)
    outs = [swiglu(xs, W1[e], W3[e], W2[e]) for e, xs in enumerate(parts) if counts[e]]
    ye = torch.cat(outs) * ws[:, None]
    return torch.zeros_like(x).index_add_(0, tok, ye), lb


def moe_padded(x, P, k):
    ws, tok, counts, lb = sorted_rows(x, P, k)
    E, d = P["w1"].shape[0], x.shape[1]
    C = max(counts)
    starts = torch.tensor([0] + counts[:-1]).cumsum(0)
    eid = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    slot = eid * C + (torch.arange(tok.numel()) - starts[eid])
    xp = x.new_zeros(E * C, d).index_copy(0, slot, x[tok]).view(E, C, d)
    h = F.silu(torch.bmm(xp, P["w1"])) * torch.bmm(xp, P["w3"])
    yp = torch.bmm(h, P["w2"]).view(E * C, d)
    ye = yp[slot] * ws[:, None]
    return torch.zeros_like(x).index_add_(0, tok, ye), lb


FORMS = {"loop": moe_loop, "sorted": moe_sorted, "padded": moe_padded}


def time_form(fn, a):
    g = torch.Generator().manual_seed(0)
    T, d, f, E = a.tokens, a.d_model, a.d_ff, a.experts
    P = {
        "wr": torch.randn(d, E, generator=g) / d ** 0.5,
        "w1": torch.randn(E, d, f, generator=g) / d ** 0.5,
        "w3": torch.randn(E, d, f, generator=g) / d ** 0.5,
        "w2": torch.randn(E, f, d, generator=g) / f ** 0.5,
    }
    if a.shared:
        fs = a.shared * f
        P.update({"s1": torch.randn(d, fs, generator=g) / d ** 0.5, "s3": torch.randn(d, fs, generator=g) / d ** 0.5,
                  "s2": torch.randn(fs, d, generator=g) / fs ** 0.5})
    for t in P.values():
        t.requires_grad_(True)
    x = torch.randn(T, d, generator=g).requires_grad_(True)
    dy = torch.randn(T, d, generator=g) / T ** 0.5
    times = []
    for it in range(a.warmup + a.iters):
        for t in list(P.values()) + [x]:
            t.grad = None
        t0 = time.perf_counter()
        y, lb = fn(x, P, a.top_k)
        if a.shared:
            y = y + swiglu(x, P["s1"], P["s3"], P["s2"])
        loss = (y * dy).sum() + 0.01 * lb
        loss.backward()
        dt = time.perf_counter() - t0
        if it >= a.warmup:
            times.append(dt)
    return 1e3 * statistics.median(times)


def run_cmoe(a):
    cmd = [a.cmoe, "bench", "layer", "--json", "--tokens", str(a.tokens), "--d-model", str(a.d_model),
           "--d-ff", str(a.d_ff), "--experts", str(a.experts), "--top-k", str(a.top_k), "--shared", str(a.shared),
           "--threads", str(a.threads), "--iters", str(a.cmoe_iters or a.iters), "--warmup", str(a.warmup)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return cmd, json.loads(out)


def main():
    a = ARGS
    res = {"tokens": a.tokens, "d_model": a.d_model, "d_ff": a.d_ff, "experts": a.experts, "top_k": a.top_k,
           "shared": a.shared, "threads": a.threads, "torch": torch.__version__, "torch_ms": {}}
    for name in a.formulations.split(","):
        res["torch_ms"][name] = time_form(FORMS[name], a)
    best = min(res["torch_ms"], key=res["torch_ms"].get)
    if a.cmoe:
        cmd, cm = run_cmoe(a)
        res["cmoe_cmd"] = " ".join(cmd)
        res["cmoe"] = cm
        res["speedup"] = {k: v / cm["ms_median"] for k, v in res["torch_ms"].items()}
    if a.json:
        print(json.dumps(res))
        return
    print("T=%d d=%d f=%d E=%d k=%d shared=%d, %d thread(s), torch %s" %
          (a.tokens, a.d_model, a.d_ff, a.experts, a.top_k, a.shared, a.threads, torch.__version__))
    for k, v in res["torch_ms"].items():
        line = "  torch %-7s %10.1f ms" % (k, v)
        if a.cmoe:
            line += "   cmoe is %.2fx faster" % res["speedup"][k]
        print(line + ("   (fastest torch)" if k == best else ""))
    if a.cmoe:
        cm = res["cmoe"]
        print("  cmoe          %10.1f ms   %.1f GFLOP/s = %.0f%% of sgemm (%.1f GFLOP/s) in the same run" %
              (cm["ms_median"], cm["gflops"], 100 * cm["ceiling_fraction"], cm["sgemm_gflops"]))


if __name__ == "__main__":
    sys.exit(main())
