#!/bin/bash
# The body chunks_on_gpu.sh and batchnorm_on_gpu.sh share: the test files given as arguments, then
# SIGNS end to end (configs/signs.py) and the training throughput of the 'xla' config. Set-up in
# setup.sh; $OUT for results.
source "$(dirname "$0")/setup.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1 | tee -a $OUT/gpu.txt
T0=$(date +%s)
timeout 200 python3 -m pytest -q -p no:cacheprovider --run-slow "$@" -rs > $OUT/tests.txt 2>&1
echo "tests rc $? $(( $(date +%s)-T0 )) s" | tee -a $OUT/tests.txt; tail -6 $OUT/tests.txt
T0=$(date +%s)
timeout 100 python3 -m resnet_flax.main --config=configs/signs.py --workdir=/tmp/signs > $OUT/signs.txt 2>&1
echo "signs rc $? $(( $(date +%s)-T0 )) s" | tee -a $OUT/signs.txt; grep -E "^Epoch|^Test" $OUT/signs.txt
T0=$(date +%s)
timeout 120 python3 experiments/throughput.py --only=jax-xla --steps=68 --out=$OUT/throughput_xla > $OUT/throughput_stdout.txt 2>&1
echo "throughput rc $? $(( $(date +%s)-T0 )) s"; grep -E "^\| jax" $OUT/throughput_xla.md
