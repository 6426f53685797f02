# Sourced by the shell tests (not a test itself): poison FILE TENSOR VALUE writes VALUE
# (nan, inf, or max: the largest finite number) into element 0 of TENSOR (F32 or F64)
# of the safetensors FILE and re-stamps the file's CRC-32, so the file stays valid and
# only its numbers are bad.
poison() {
    _f=$1 _t=$2 _v=$3
    _n=$(od -An -t u8 -N8 "$_f" | tr -d ' ')
    _e=$(head -c $((8 + _n)) "$_f" | tail -c "$_n" | grep -ao "\"$_t\": *{[^}]*}" | head -n 1)
    [ -n "$_e" ] || { echo "poison: no tensor '$_t' in $_f" >&2; return 1; }
    _off=$(printf '%s' "$_e" | sed 's/.*"data_offsets": *\[ *\([0-9]*\) *,.*/\1/')
    case "$_e:$_v" in
    *'"F32"'*:nan) _b='\000\000\300\177' ;;
    *'"F32"'*:inf) _b='\000\000\200\177' ;;
    *'"F32"'*:max) _b='\377\377\177\177' ;;
    *'"F64"'*:nan) _b='\000\000\000\000\000\000\370\177' ;;
    *'"F64"'*:inf) _b='\000\000\000\000\000\000\360\177' ;;
    *'"F64"'*:max) _b='\377\377\377\377\377\377\357\177' ;;
    *) echo "poison: $_t is not F32/F64, or '$_v' is not nan/inf/max" >&2; return 1 ;;
    esac
    printf "$_b" | dd of="$_f" bs=1 seek=$((8 + _n + _off)) conv=notrunc 2>/dev/null || return 1
    _at=$(head -c $((8 + _n)) "$_f" | grep -abo '"crc32": *"' | head -n 1)
    [ -n "$_at" ] || return 0
    # gzip's trailer holds the CRC-32 of its input, little-endian (od reads it as such on x86 and Arm)
    _crc=$(tail -c +$((9 + _n)) "$_f" | gzip -c | tail -c 8 | head -c 4 | od -An -t x4 | tr -d ' ')
    _skip=$(printf '%s' "${_at#*:}" | wc -c) # '"crc32":"' with any spaces
    printf '%s' "$_crc" | dd of="$_f" bs=1 seek=$((${_at%%:*} + _skip)) conv=notrunc 2>/dev/null
}
