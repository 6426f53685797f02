#!/bin/sh
# cmoe report and cmoe info from the command line: a report from the fixture run
# (tests/fixtures/report: metrics.jsonl in cmoe train's format, config.json, train.json)
# is produced, well-formed and has every section; bad inputs exit 1 naming the problem
# (and the line); cmoe info's JSON and its usage errors; cmoe bench layer --preset. The fixture's metrics.jsonl was
# generated to train.c's format (2 MoE layers of 4 and 6 experts, 150 steps, evaluations
# every 25, capacity drops, an expert that starts hot and one that starts starved).
# Run by automake with top_srcdir and top_builddir exported.
: "${top_srcdir:=.}" "${top_builddir:=.}"
# absolute: the cmoe info checks run from another directory
top_srcdir=$(cd "$top_srcdir" && pwd) && top_builddir=$(cd "$top_builddir" && pwd) || exit 99
cmoe="$top_builddir/cmoe"
[ -x "$cmoe" ] || { echo "report.sh: $cmoe is not built"; exit 99; }
fixture="$top_srcdir/tests/fixtures/report"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cmoe-report.XXXXXX") || exit 99
trap 'rm -rf "$tmp"' EXIT INT TERM
fails=0

fail() {
    echo "FAIL: $*"
    fails=$((fails + 1))
}

# expect RC STDERR-PATTERN COMMAND ARGS...: exit status RC and stderr matching the pattern
expect() {
    want=$1 pat=$2
    shift 2
    "$cmoe" "$@" >"$tmp/stdout" 2>"$tmp/stderr"
    rc=$?
    if [ "$rc" -ne "$want" ]; then
        fail "cmoe $*: exit $rc, want $want"
        sed 's/^/    stdout: /' "$tmp/stdout" | tail -n 5
        sed 's/^/    stderr: /' "$tmp/stderr" | tail -n 5
    elif [ -n "$pat" ] && ! grep -q -- "$pat" "$tmp/stderr"; then
        fail "cmoe $*: stderr lacks '$pat':"
        sed 's/^/    /' "$tmp/stderr"
    else
        echo "ok: exit $rc: cmoe $*"
    fi
}

# ---- a report from the fixture -------------------------------------------------------
run="$tmp/run"
mkdir "$run" && cp "$fixture/metrics.jsonl" "$fixture/config.json" "$fixture/train.json" "$run/" || exit 99
expect 0 "" report "$run"
html="$run/report.html"
if [ ! -s "$html" ]; then
    fail "no $html"
else
    ! ls "$(dirname "$html")" | grep -q "\.tmp" || fail "a temporary file was left beside $html"
    # well-formed: the page is also well-formed XML, which xmllint checks strictly
    if command -v xmllint >/dev/null 2>&1; then
        if xmllint --noout "$html" 2>"$tmp/xml"; then
            echo "ok: xmllint: report.html is well-formed"
        else
            fail "xmllint: report.html is not well-formed:"
            head -n 10 "$tmp/xml"
        fi
    else
        echo "xmllint not found: checking the structure with grep only"
    fi
    # structure: one document, balanced svg and figure elements
    for tag in html head body main; do
        [ "$(grep -o "<$tag[ >]" "$html" | wc -l)" -eq 1 ] || fail "report.html: not exactly one <$tag>"
        [ "$(grep -o "</$tag>" "$html" | wc -l)" -eq 1 ] || fail "report.html: not exactly one </$tag>"
    done
    [ "$(grep -o '<svg' "$html" | wc -l)" -eq "$(grep -o '</svg>' "$html" | wc -l)" ] || fail "unbalanced <svg>"
    [ "$(grep -o '<figure' "$html" | wc -l)" -eq "$(grep -o '</figure>' "$html" | wc -l)" ] || fail "unbalanced <figure>"
    # self-contained: no scripts, nothing fetched
    if grep -qiE '<script|<link|src="|href="http|@import|url\(http' "$html"; then
        fail "report.html loads something or has a script"
    fi
    # every section and chart the issue asks for
    for want in 'Loss vs steps' 'Loss vs tokens' 'Learning rate' 'Throughput' 'Layer 1 · 4 experts' \
        'Layer 2 · 6 experts' 'Dropped tokens' 'Load-balancing loss' 'Router z-loss' 'Importance loss' \
        'Training (train.json)' 'Model (config.json)' 'validation'; do
        grep -q "$want" "$html" || fail "report.html lacks '$want'"
    done
    # heatmaps: 150 steps of 4 + 6 experts, one rect per (time bucket, expert)
    cells=$(grep -o '<rect x="[0-9.]*" y="[0-9.]*" width="[0-9.]*" height="[0-9.]*" fill="#' "$html" | wc -l)
    [ "$cells" -eq $((150 * 10)) ] || fail "heatmap cells: $cells, want 1500"
    # the starved expert shows as the darkest blue early on, the hot one as red
    grep -q 'fill="#2166ac"><title>expert 3, steps 1' "$html" || fail "layer 1's starved expert 3 is not dark blue at step 1"
    # validation points: 6 evaluations in each of the two loss charts
    [ "$(grep -o '<circle' "$html" | wc -l)" -eq 12 ] || fail "want 12 validation markers"
    # a second run overwrites it
    expect 0 "" report "$run" --out "$tmp/other.html"
    cmp -s "$html" "$tmp/other.html" || echo "note: two reports differ (the time they were written)"
fi

# ---- bad input: exit 1 with a message that says what and where -----------------------
expect 2 "which run" report
expect 2 "unknown option" report --frobnicate "$run"
expect 2 "one RUN_DIR" report "$run" "$run"
expect 1 "no run directory" report "$tmp/absent"
mkdir "$tmp/empty_dir"
expect 1 "metrics.jsonl" report "$tmp/empty_dir"
mkdir "$tmp/empty"
: >"$tmp/empty/metrics.jsonl"
expect 1 "empty" report "$tmp/empty"
[ ! -e "$tmp/empty/report.html" ] || fail "a report was written for an empty run"
mkdir "$tmp/blank"
printf '\n  \n' >"$tmp/blank/metrics.jsonl"
expect 1 "empty" report "$tmp/blank"
mkdir "$tmp/bad"
head -n 3 "$fixture/metrics.jsonl" >"$tmp/bad/metrics.jsonl"
echo '{"step": 4, "loss": 1.0,' >>"$tmp/bad/metrics.jsonl"
expect 1 "line 4: invalid JSON" report "$tmp/bad"
[ ! -e "$tmp/bad/report.html" ] && ! ls "$tmp/bad" | grep -q "report.html.tmp" || fail "a report was written for a malformed run"
head -n 2 "$fixture/metrics.jsonl" >"$tmp/bad/metrics.jsonl"
echo '[1, 2]' >>"$tmp/bad/metrics.jsonl"
expect 1 "line 3: not a JSON object" report "$tmp/bad"
echo '{"loss": 1.0}' >"$tmp/bad/metrics.jsonl"
expect 1 "line 1: no \"step\"" report "$tmp/bad"
echo '{"step": 1, "loss": "low"}' >"$tmp/bad/metrics.jsonl"
expect 1 "line 1: \"loss\" must be a number" report "$tmp/bad"
head -n 1 "$fixture/metrics.jsonl" >"$tmp/bad/metrics.jsonl"
echo '{"step": 2, "loss": 1.0, "layers": []}' >>"$tmp/bad/metrics.jsonl"
expect 1 "line 2: \"layers\"" report "$tmp/bad"
head -n 1 "$fixture/metrics.jsonl" >"$tmp/bad/metrics.jsonl"
head -n 2 "$fixture/metrics.jsonl" | tail -n 1 | sed 's/"load":\[[0-9,]*\]/"load":[1,2]/' >>"$tmp/bad/metrics.jsonl"
expect 1 "line 2: layers\[0\] must be layer 1 with a \"load\" array of 4" report "$tmp/bad"
printf '{"step": 1}\n\n{"step": 2, "lr": 0.1}\n' >"$tmp/bad/metrics.jsonl"
expect 0 "" report "$tmp/bad"
grep -q 'Learning rate' "$tmp/bad/report.html" || fail "a minimal metrics.jsonl gives no report"
grep -q 'No MoE layers' "$tmp/bad/report.html" || fail "a run without MoE layers does not say so"

# ---- cmoe info -----------------------------------------------------------------------
export CMOE_CONFIGS="$top_srcdir/configs"
cd "$tmp" || exit 99
expect 0 "" info --preset mixtral-8x7b --json
grep -q '"total_params": 46702792704,' "$tmp/stdout" || fail "info --json: mixtral-8x7b total_params"
for key in active_params flops_per_token_fwd flops_per_token_fwdbwd; do
    grep -q "\"$key\": " "$tmp/stdout" || fail "info --json lacks $key"
done
expect 0 "" info --preset qwen1.5-moe-a2.7b --seq 4096
grep -q '14,315,784,192' "$tmp/stdout" || fail "info: qwen1.5-moe-a2.7b total"
expect 0 "" info --config "$top_srcdir/configs/deepseek-moe-16b.json"
expect 0 "" info --list
grep -q 'arctic' "$tmp/stdout" || fail "info --list does not list arctic"
expect 0 "" info --preset tiny
expect 1 "no preset 'nope'" info --preset nope
expect 1 "cannot open" info --config "$tmp/absent.json"
echo '{"hidden_size": 8, "frobs": 1}' >"$tmp/bad.json"
expect 1 "frobs" info --config "$tmp/bad.json"
expect 2 "--preset NAME or --config FILE" info
expect 2 "not both" info --preset tiny --config "$tmp/bad.json"
expect 2 "max_position_embeddings" info --preset tiny --seq 100000
expect 2 "--seq" info --preset tiny --seq 0
expect 2 "unknown option" info --preset tiny --frob

# ---- cmoe bench layer with a preset's layer shape --------------------------------------
expect 0 "" bench layer --preset tiny --layer 2 --tokens 16 --iters 1 --warmup 0 --threads 1 --json
grep -q '"d_model": 16, "d_ff": 16, "experts": 6,' "$tmp/stdout" || fail "bench --preset tiny --layer 2: not its shape"
expect 0 "" bench layer --preset tiny --tokens 16 --iters 1 --warmup 0 --threads 1 --json
grep -q '"experts": 4,' "$tmp/stdout" || fail "bench --preset tiny: not the first MoE layer (4 experts)"
expect 2 "dense layer" bench layer --preset tiny --layer 0
expect 2 "has 3 layers" bench layer --preset tiny --layer 3
expect 2 "needs --preset" bench layer --layer 1
expect 1 "no preset" bench layer --preset nope

if [ "$fails" -ne 0 ]; then
    echo "report.sh: $fails failure(s)"
    exit 1
fi
echo "report.sh: all passed"
