# Source on the lent GPU machine: installs carried wheels (.whl/) and exposes this checkout
# as the ditplan.* packages without building it (the device image has no build tools).
# The wheels (the image lacks diffusers and jsonschema), fetched here once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata \
#     'huggingface_hub>=1.32,<2' 'safetensors>=0.8' jsonschema jsonschema-specifications \
#     referencing rpds-py
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
mkdir -p /tmp/shim/ditplan
for part in runtime reference policy profiler artifacts; do ln -sfn "$PWD/$part" "/tmp/shim/ditplan/$part"; done
export PYTHONPATH=/tmp/site:/tmp/shim:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -c "import diffusers, jsonschema" \
    || { echo "gpu_env: a carried wheel is missing (see this script's header)"; return 1; }
