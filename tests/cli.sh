#!/bin/sh
# The cmoe tool's frame: --version, help, dispatch, and the documented exit
# codes (0 ok, 1 failure, 2 usage). Run by make check; top_builddir is set by
# AM_TESTS_ENVIRONMENT (tests/local.mk).
top_builddir=${top_builddir:-.}
cmoe="$top_builddir/cmoe"
tmp=${TMPDIR:-/tmp}/cmoe-cli-test.$$
mkdir -p "$tmp" || exit 99
trap 'rm -rf "$tmp"' EXIT

pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok   - $1"; }
bad() { fail=$((fail + 1)); echo "FAIL - $1"; }

# run NAME WANT_RC ARGS...: runs cmoe, keeps stdout/stderr, checks the exit code.
run() {
    name=$1 want=$2
    shift 2
    "$cmoe" "$@" >"$tmp/out" 2>"$tmp/err"
    got=$?
    if [ "$got" -eq "$want" ]; then
        ok "$name (exit $got)"
    else
        bad "$name: exit $got, want $want"
        sed 's/^/    stdout: /' "$tmp/out"
        sed 's/^/    stderr: /' "$tmp/err"
    fi
}
# has FILE TEXT NAME: FILE contains TEXT (fixed string).
has() {
    if grep -qF -- "$2" "$tmp/$1"; then ok "$3"; else
        bad "$3: '$2' not in $1"
        sed 's/^/    | /' "$tmp/$1"
    fi
}

if [ ! -x "$cmoe" ]; then
    echo "cli.sh: $cmoe is not built"
    exit 99
fi

version=$(sed -n 's/^#define PACKAGE_VERSION "\(.*\)"$/\1/p' "$top_builddir/config.h")
[ -n "$version" ] || { echo "cli.sh: no PACKAGE_VERSION in $top_builddir/config.h"; exit 99; }

run "cmoe --version" 0 --version
has out "cmoe $version" "--version names version $version"
has out "BLAS:" "--version reports BLAS"
has out "OpenMP:" "--version reports OpenMP"
has out "MPI:" "--version reports MPI"
has out "CUDA" "--version reports CUDA"
run "cmoe -V" 0 -V
has out "cmoe $version" "-V names the version"
run "cmoe version" 0 version
has out "cmoe $version" "cmoe version names the version"

run "cmoe help" 0 help
has out "oracle" "help lists the oracle command"
has out "help" "help lists the help command"
has out "Exit status" "help documents the exit codes"
run "cmoe --help" 0 --help
has out "Commands:" "--help lists the commands"
run "cmoe help oracle" 0 help oracle
has out "oracle" "help oracle shows the oracle usage"
run "cmoe oracle --help" 0 oracle --help
has out "oracle" "oracle --help shows the oracle usage"
run "cmoe help help" 0 help help

run "unknown command" 2 no-such-command
has err "unknown command 'no-such-command'" "unknown command is named"
has err "cmoe help" "unknown command points to cmoe help"
run "unknown option" 2 --no-such-option
has err "--no-such-option" "unknown option is named"
has err "cmoe help" "unknown option points to cmoe help"
run "unknown short option" 2 -Z
has err "-Z" "unknown short option is named"
run "no command" 2
has err "usage" "no command prints the usage"
run "help of an unknown command" 2 help no-such-command
has err "no-such-command" "help names the unknown command"
run "version with an argument" 2 version extra

echo "cli.sh: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
