#!/bin/sh
# cmoe export / cmoe import end to end: a trained Mixtral-shaped run exported as a
# Hugging Face checkpoint (config.json keys, HF tensor names) and imported back with
# the same parameters bit for bit (the safetensors compare tool with tolerance 0) and
# the same evaluation; an HF Qwen2-MoE checkpoint made outside cmoe (the fixture of
# tests/hf_reference.py) imported, evaluated, sampled and fine-tuned (--init-from);
# refusals and usage errors. Run by automake with top_srcdir and top_builddir exported.
: "${top_srcdir:=.}" "${top_builddir:=.}"
cmoe="$top_builddir/cmoe"
[ -x "$cmoe" ] || { echo "hf.sh: $cmoe is not built"; exit 99; }
compare="$top_builddir/tests/test_safetensors"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cmoe-hf.XXXXXX") || exit 99
trap 'rm -rf "$tmp"' EXIT INT TERM
fails=0
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

fail() {
    echo "FAIL: $*"
    fails=$((fails + 1))
}

run() {
    want=$1 pat=$2
    shift 2
    "$cmoe" "$@" >"$tmp/stdout" 2>"$tmp/stderr"
    rc=$?
    if [ "$rc" -ne "$want" ]; then
        fail "cmoe $*: exit $rc, want $want"
        tail -n 5 "$tmp/stdout" "$tmp/stderr" | sed 's/^/    /'
        return 1
    fi
    if [ -n "$pat" ] && ! grep -q -- "$pat" "$tmp/stderr"; then
        fail "cmoe $*: stderr lacks '$pat':"
        sed 's/^/    /' "$tmp/stderr"
        return 1
    fi
    echo "ok: exit $rc: cmoe $*"
}

# ---- a Mixtral-shaped run: export, import, same bits -----------------------------------------
cat >"$tmp/mixtral.json" <<'EOF'
{"vocab_size": 32, "hidden_size": 16, "intermediate_size": 24, "moe_intermediate_size": 24,
 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
 "max_position_embeddings": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
 "router_z_loss_coef": 0.001, "seed": 7}
EOF
R="$tmp/run" E="$tmp/hf" I="$tmp/back"
run 0 "" train --config "$tmp/mixtral.json" --data synth --steps 6 --batch 2 --seq 16 --eval-every 0 --out "$R"
run 0 "" export --format hf "$R" "$E"
grep -q MixtralForCausalLM "$tmp/stdout" || fail "export did not say MixtralForCausalLM"
for key in '"architectures": \[' '"MixtralForCausalLM"' '"model_type": "mixtral"' '"num_local_experts": 4' \
    '"num_experts_per_tok": 2' '"intermediate_size": 24' '"hidden_act": "silu"' '"torch_dtype": "float32"' \
    '"num_key_value_heads": 2' '"tie_word_embeddings": false'; do
    grep -q "$key" "$E/config.json" || fail "HF config.json lacks $key"
done
grep -q 'model.layers.1.block_sparse_moe.experts.3.w2.weight' "$E/model.safetensors" ||
    fail "HF weights lack the per-expert names"
grep -q 'block_sparse_moe.experts.w1"' "$E/model.safetensors" && fail "HF weights hold cmoe's stacked expert tensors"
run 0 "" import --format hf "$E" "$I"
if [ -x "$compare" ]; then
    if "$compare" --compare "$R/model.safetensors" "$I/model.safetensors" 0 >"$tmp/cmp" 2>&1; then
        echo "ok: export -> import gives back every parameter bit for bit, and the same config"
    else
        fail "export -> import changed the parameters:"
        sed 's/^/    /' "$tmp/cmp" | head -n 5
    fi
else
    echo "skip: $compare is not built: no bitwise comparison"
fi
run 0 "" eval "$R" --data synth --seq 16 --batch 2 --max-batches 2 --json
sed 's/"run":[^,]*,//' "$tmp/stdout" >"$tmp/eval-run"
run 0 "" eval "$I" --data synth --seq 16 --batch 2 --max-batches 2 --json
sed 's/"run":[^,]*,//' "$tmp/stdout" >"$tmp/eval-back"
grep -o '"loss":[^,]*' "$tmp/eval-run" >"$tmp/l1"
grep -o '"loss":[^,]*' "$tmp/eval-back" >"$tmp/l2"
if [ -s "$tmp/l1" ] && cmp -s "$tmp/l1" "$tmp/l2"; then
    echo "ok: the imported model evaluates to the same loss: $(cat "$tmp/l1")"
else
    fail "eval after the round trip: $(cat "$tmp/l1") vs $(cat "$tmp/l2")"
fi
run 0 "" export --format hf --dtype bf16 "$R" "$tmp/hf16"
grep -q '"torch_dtype": "bfloat16"' "$tmp/hf16/config.json" || fail "bf16 export: torch_dtype"
grep -q '"BF16"' "$tmp/hf16/model.safetensors" || fail "bf16 export: tensors are not BF16"
[ "$(wc -c <"$tmp/hf16/model.safetensors")" -lt "$(wc -c <"$E/model.safetensors")" ] || fail "bf16 file not smaller"
run 0 "" import --format hf "$tmp/hf16" "$tmp/back16"
run 1 "already holds a run" import --format hf "$E" "$I"
run 0 "" import --format hf --force "$E" "$I"

# ---- refusals and usage ------------------------------------------------------------------------
T="$tmp/tiny"
run 0 "" train --preset tiny --data synth --steps 2 --batch 2 --seq 8 --eval-every 0 --out "$T"
run 1 "no Hugging Face equivalent" export --format hf "$T" "$tmp/nope"
grep -q "dense layers" "$tmp/stderr" || fail "the refusal does not name the dense layers"
grep -q "qkv_bias" "$tmp/stderr" || fail "the refusal does not name qkv_bias"
grep -q "pyramid" "$tmp/stderr" || fail "the refusal does not name the pyramid"
[ -e "$tmp/nope" ] && fail "a refused export created its directory"
run 2 "--format hf is required" export "$R" "$tmp/x"
run 2 "the only format is hf" export --format gguf "$R" "$tmp/x"
run 2 "use f32, bf16 or f16" export --format hf --dtype f8 "$R" "$tmp/x"
run 2 "need two directories" import --format hf "$E"
run 1 "model_type 'llama'" import --format hf "$(mkdir -p "$tmp/llama" && cp "$E/model.safetensors" "$tmp/llama/" &&
    sed 's/"model_type": "mixtral"/"model_type": "llama"/' "$E/config.json" >"$tmp/llama/config.json" && echo "$tmp/llama")" \
    "$tmp/llama-run"
run 1 "config.json" import --format hf "$tmp/nothere" "$tmp/x2"

# ---- an HF checkpoint cmoe did not write: Qwen2-MoE ---------------------------------------------
Q="$top_srcdir/tests/fixtures/hf-qwen2moe" QR="$tmp/qwen"
run 0 "" import --format hf "$Q" "$QR"
grep -q Qwen2MoeForCausalLM "$tmp/stdout" || fail "import did not say Qwen2MoeForCausalLM"
grep -q '"n_shared_experts": 1' "$QR/config.json" || fail "imported config lacks the shared expert"
grep -q '"first_k_dense_replace": 1' "$QR/config.json" || fail "mlp_only_layers [0] is not first_k_dense_replace 1"
grep -q '"qkv_bias": true' "$QR/config.json" || fail "imported config lacks qkv_bias"
run 0 "" eval "$QR" --data synth:vocab=40 --seq 16 --batch 2 --max-batches 2
run 0 "context 32 (max_position_embeddings)" sample "$QR" --prompt "1 2 3" --tokens 5 --temperature 0
run 0 "" train --init-from "$QR" --data synth:vocab=40 --steps 3 --batch 2 --seq 16 --eval-every 0 --out "$tmp/ft"
grep -q '"init_from"' "$tmp/ft/train.json" || fail "train.json of the fine-tune does not name init_from"
cmp -s "$QR/config.json" "$tmp/ft/config.json" || fail "the fine-tune does not keep the imported config"
run 2 "takes the model config from DIR" train --init-from "$QR" --preset tiny
run 0 "" export --format hf "$QR" "$tmp/qwen-again"
grep -q '"model_type": "qwen2_moe"' "$tmp/qwen-again/config.json" || fail "re-export is not qwen2_moe"
grep -q '"shared_expert_intermediate_size": 20' "$tmp/qwen-again/config.json" || fail "re-export: shared width"

# ---- transformers 5's config.json (rope_parameters, dtype, head_dim null) ------------------------
H5="$top_srcdir/tests/fixtures/hf5/hf5-mixtral"
run 0 "" import --format hf "$H5" "$tmp/h5"
grep -q '"rope_theta": 500' "$tmp/h5/config.json" || fail "rope_parameters.rope_theta 500 was not imported"
grep -q "note" "$tmp/stderr" && fail "a complete transformers 5 config gave a note"
mkdir -p "$tmp/h5-linear" "$tmp/h5-bare" && cp "$H5/model.safetensors" "$tmp/h5-linear/" &&
    cp "$H5/model.safetensors" "$tmp/h5-bare/"
sed 's/"rope_type": "default"/"rope_type": "linear", "factor": 2.0/' "$H5/config.json" >"$tmp/h5-linear/config.json"
run 1 "rope_type 'linear'" import --format hf "$tmp/h5-linear" "$tmp/h5-linear-run"
# neither rope form: the class default, said on stderr
sed '/"rope_parameters"/,/}/d' "$H5/config.json" >"$tmp/h5-bare/config.json"
run 0 "note: .*no rope_theta.*MixtralConfig's default 1e+06" import --format hf "$tmp/h5-bare" "$tmp/h5-bare-run"

# ---- NaN or Inf weights are refused, naming the tensor and element ------------------------------
. "$top_srcdir/tests/poison.sh"
mkdir -p "$tmp/inf" && cp "$Q/config.json" "$Q/model.safetensors" "$tmp/inf/" &&
    poison "$tmp/inf/model.safetensors" model.layers.1.mlp.experts.2.up_proj.weight inf || fail "poison"
run 1 "tensor 'model.layers.1.mlp.experts.2.up_proj.weight' is not finite: element 0 (of 192) is inf" \
    import --format hf "$tmp/inf" "$tmp/inf-run"
[ -e "$tmp/inf-run/model.safetensors" ] && fail "a refused import wrote a run"
# and on export: a run whose weights hold a NaN writes no Hugging Face checkpoint
cp -r "$R" "$tmp/nan-run" && poison "$tmp/nan-run/model.safetensors" model.layers.1.block_sparse_moe.experts.w1 nan ||
    fail "poison"
run 1 "parameter 'model.layers.1.block_sparse_moe.experts.w1' is not finite: element 0 (of [0-9]*) is nan" \
    export --format hf "$tmp/nan-run" "$tmp/nan-hf"
[ -e "$tmp/nan-hf/model.safetensors" ] && fail "a refused export wrote weights"

# ---- optional: the exported Mixtral through the plain-PyTorch reference -------------------------
if /usr/bin/python3 -c 'import torch, numpy' 2>/dev/null; then
    ref="$top_srcdir/tests/hf_reference.py"
    if /usr/bin/python3 "$ref" logits "$E" 1,5,9,2,31,0,7 "$tmp/ref-logits.safetensors" 2>"$tmp/py.err"; then
        echo "ok: the PyTorch reference reads the exported checkpoint"
    else
        fail "tests/hf_reference.py could not read the export:"
        sed 's/^/    /' "$tmp/py.err" | tail -n 5
    fi
else
    echo "skip: no python3 with torch: the exported files are not read by the PyTorch reference"
fi

if [ "$fails" -ne 0 ]; then
    echo "hf.sh: $fails failure(s)"
    exit 1
fi
echo "hf.sh: all passed"
