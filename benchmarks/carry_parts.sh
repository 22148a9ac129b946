# Carry a git-ignored folder that does not fit one device call (e.g. a 20 MB training checkpoint
# beside the 48 MB working tree and the 7 MB of wheels) in parts, one part a call.
#
# Here:   bash benchmarks/carry_parts.sh pack FOLDER [PART_MIB]    (default 10 MiB parts)
#   packs FOLDER into .carry/NAME/ (NAME: FOLDER with / turned into _): part.aa, part.ab, ...,
#   SHA256SUMS and the folder's path; .carry/ must be ignored (.git/info/exclude).
# There, in every call that carries .carry/NAME/SHA256SUMS, .carry/NAME/PATH and one part:
#   . benchmarks/carry_parts.sh unpack NAME
#   stashes the part in /tmp/carry/NAME, which a warm machine keeps ~30 s between calls; once
#   every part is there and the sum matches, it unpacks the folder at its path in the checkout
#   (kept there for later calls on the same warm machine) and says so.
set -o pipefail

if [ "${1:-}" = pack ]; then
    folder=${2:?usage: carry_parts.sh pack FOLDER [PART_MIB]}
    name=$(echo "${folder%/}" | tr / _)
    rm -rf ".carry/$name" && mkdir -p ".carry/$name" || exit 1
    tar -cf - "${folder%/}" | split -b "${3:-10}M" - ".carry/$name/part."
    cat ".carry/$name"/part.* | sha256sum | cut -d' ' -f1 > ".carry/$name/SHA256SUMS"
    echo "${folder%/}" > ".carry/$name/PATH"
    ls -l ".carry/$name"
    return 0 2>/dev/null || exit 0
fi

if [ "${1:-}" = unpack ]; then
    carry_name=${2:?usage: . carry_parts.sh unpack NAME}
    mkdir -p "/tmp/carry/$carry_name"
    cp -n ".carry/$carry_name"/part.* "/tmp/carry/$carry_name/" 2>/dev/null
    carry_path=$(cat ".carry/$carry_name/PATH")
    if [ -e "$carry_path" ] && [ -f "/tmp/carry/$carry_name/unpacked" ]; then
        echo "carry: $carry_path unpacked earlier on this machine"
    elif [ "$(cat "/tmp/carry/$carry_name"/part.* | sha256sum | cut -d' ' -f1)" \
            != "$(cat ".carry/$carry_name/SHA256SUMS")" ]; then
        echo "carry: $carry_name parts here: $(cd "/tmp/carry/$carry_name" && echo part.*)" \
             "- not all yet"
    else
        cat "/tmp/carry/$carry_name"/part.* | tar -xf - && touch "/tmp/carry/$carry_name/unpacked" \
            && echo "carry: $carry_path unpacked"
    fi
    unset carry_name carry_path
    return 0 2>/dev/null || exit 0
fi
echo "usage: bash benchmarks/carry_parts.sh pack FOLDER [PART_MIB] | . benchmarks/carry_parts.sh unpack NAME"
