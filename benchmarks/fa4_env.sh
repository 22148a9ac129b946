# FlashAttention-4 (the `fa4` backend) on a GPU machine without network, the same way every run.
#
# Here, with network, once:   bash benchmarks/fa4_env.sh pack
#   downloads the pinned wheels of pyproject's `fa4` extra (flash-attn-4 and its CuTe-DSL stack,
#   nvidia-cutlass-dsl[cu13]), unpacks them (wheels are plain zips: unpacked = installed with
#   --target), drops the aarch64/QNX stubs and packs the tree with xz into .whl_fa4/ as parts of
#   at most $FA4_PART_MIB MiB (default 18) plus SHA256SUMS. The 92 MB cu13 wheel packs to 65 MiB,
#   and one device call carries 64 MiB with the working tree (43 MiB since the long model ships):
#   four parts, one per call, the last beside .whl (7 MiB); to re-split without downloading,
#   cat the parts and split -b 18M again (the sum is the whole archive's).
# There, in every call, after benchmarks/gpu_env.sh:   . benchmarks/fa4_env.sh
#   stashes the parts this call carries (carry .whl_fa4) in /tmp/fa4_parts, which a warm machine
#   keeps ~30 s between calls; once all parts are there it checks the sum, unpacks into /tmp/site
#   and puts cutlass' dsl_packages on PYTHONPATH (the .pth a pip install would process). With
#   parts missing or a broken install, ditplan runs flex and logs why (runtime/kernels/fa4.py).
set -o pipefail
FA4_PINS="flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1
apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5"

if [ "${1:-}" = pack ]; then
    set -e
    work=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 -d "$work/wheels" $FA4_PINS
    mkdir -p "$work/site" .whl_fa4
    for wheel in "$work"/wheels/*.whl; do unzip -q -o "$wheel" -d "$work/site"; done
    rm -rf "$work"/site/nvidia_cutlass_dsl/cu13/lib/stubs "$work/site/build_backend.py"
    tar -C "$work/site" -cf - . | xz -9e -T0 > "$work/fa4_site.tar.xz"
    rm -f .whl_fa4/fa4_site.tar.xz.part*
    split -b "${FA4_PART_MIB:-18}M" "$work/fa4_site.tar.xz" .whl_fa4/fa4_site.tar.xz.part
    (cd "$work" && sha256sum fa4_site.tar.xz) > .whl_fa4/SHA256SUMS
    ls -l .whl_fa4 && rm -rf "$work"
    exit 0
fi

mkdir -p /tmp/fa4_parts /tmp/site
cp -n .whl_fa4/fa4_site.tar.xz.part* /tmp/fa4_parts/ 2>/dev/null
fa4_have=$(cat /tmp/fa4_parts/fa4_site.tar.xz.part* 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ -f /tmp/fa4_parts/installed ]; then
    echo "fa4: installed earlier on this machine"
elif [ "$fa4_have" != "$(cut -d' ' -f1 .whl_fa4/SHA256SUMS)" ]; then
    echo "fa4: parts here: $(cd /tmp/fa4_parts && echo fa4_site*) - not all yet (ditplan runs flex)"
else
    cat /tmp/fa4_parts/fa4_site.tar.xz.part* | python3 -c "import sys, tarfile
tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('/tmp/site', filter='tar')" \
        && touch /tmp/fa4_parts/installed && echo "fa4: unpacked into /tmp/site"
fi
unset fa4_have
if [ -f /tmp/fa4_parts/installed ]; then
    export PYTHONPATH=/tmp/site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-/tmp/site}
    python3 -c "import flash_attn.cute, cutlass; from importlib.metadata import version as v
print('fa4: flash-attn-4', v('flash-attn-4'), '| nvidia-cutlass-dsl', v('nvidia-cutlass-dsl'))" \
        || echo "fa4: flash_attn.cute does not import (ditplan runs flex)"
fi
