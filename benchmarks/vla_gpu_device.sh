#!/bin/bash
# benchmarks/vla_gpu.py on the device machine (torch/transformers/peft there, no LeRobot, no network).
#
#   benchmarks/vla_gpu_device.sh download     # here: fetch the wheels the device lacks into .whl/ (~16 MB)
#   device run (carry .whl):  set -o pipefail; OUT=$OUT benchmarks/vla_gpu_device.sh run --time_limit_s=240
#
# Not carried on purpose: `datasets` (without it LeRobot skips LeRobotDataset, hence PyAV, ~110 MB).
# tokenizers 0.22.2: transformers 5.5.4 refuses the device's 0.23.2 at import.
# PY / SITE / EXTRA_PYTHONPATH / OUT can be overridden to dry-run "run" elsewhere.
set -o pipefail
WHEELS="lerobot==0.6.1 transformers==5.5.4 tokenizers==0.22.2 draccus==0.11.6 mergedeep==1.3.4 toml==0.10.2
termcolor==3.3.0 gymnasium==1.4.0 farama-notifications==0.0.6"
if [ "$1" = download ]; then
    for wheel in $WHEELS; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$wheel" || exit 1
    done
    exit 0
fi
[ "$1" = run ] && shift
OUT=${OUT:-/tmp/vla_gpu_out}
SITE=${SITE:-/tmp/site}
PY=${PY:-python3}
mkdir -p "$OUT" "$SITE"
start=$(date +%s)
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD/src${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
echo "wheels installed in $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, lerobot; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'cuda', torch.cuda.is_available())" || exit 1
timeout 370 $PY benchmarks/vla_gpu.py --output="$OUT/vla_gpu.json" "$@" 2>&1 | tee "$OUT/log"
status=$?
echo "total $(( $(date +%s) - start )) s, exit $status"
exit $status
