# Source on the lent GPU machine: installs carried wheels (.whl/) and exposes this checkout
# as the ditplan.* packages without building it (the device image has no build tools).
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
mkdir -p /tmp/shim/ditplan
for part in runtime reference policy profiler artifacts; do ln -sfn "$PWD/$part" "/tmp/shim/ditplan/$part"; done
export PYTHONPATH=/tmp/site:/tmp/shim:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
