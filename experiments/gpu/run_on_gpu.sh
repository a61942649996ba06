#!/bin/bash
# Tests on the GPU, throughput at both precisions, configs/signs_best.py end to end.
# Expects, in the repository root, .gpu/whl/ (wheels of ml_collections, tensorboardX and
# flatbuffers, which the GPU image lacks: `pip download --no-deps --python-version 3.12 ...`) and
# .gpu/signs/ (a copy of ../shared/data/signs). $OUT is where the results go.
source "$(dirname "$0")/setup.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import jax, flax, optax, orbax.checkpoint as o, h5py; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee -a $OUT/gpu.txt
T0=$(date +%s)
# test_conv.py with the files split from it (winograd, layers); test_train.py with its (steps, evaluation,
# recalibration, config, sweep).
timeout 120 python3 -m pytest -q -p no:cacheprovider --run-slow tests/test_conv.py tests/test_winograd.py \
  tests/test_layers.py tests/test_models.py tests/test_train.py tests/test_steps.py tests/test_evaluation.py \
  tests/test_recalibration.py tests/test_config.py tests/test_sweep.py > $OUT/tests.txt 2>&1; echo "tests rc $? $(( $(date +%s)-T0 )) s" | tee -a $OUT/tests.txt; tail -12 $OUT/tests.txt
for p in highest default; do
T0=$(date +%s)
timeout 140 python3 experiments/throughput.py --only=jax --steps=60 --precision=$p --out=$OUT/throughput_gpu_$p > $OUT/throughput_stdout_$p.txt 2>&1; echo "throughput $p rc $? $(( $(date +%s)-T0 )) s"; grep -E "^\| jax" $OUT/throughput_gpu_$p.md
done
T0=$(date +%s)
timeout 80 python3 -m resnet_flax.main --config=configs/signs_best.py --workdir=/tmp/sb > $OUT/signs_best_stdout.txt 2>&1; echo "signs_best rc $? $(( $(date +%s)-T0 )) s"
cp /tmp/sb/summary.json $OUT/signs_best_summary.json 2>/dev/null
tail -4 $OUT/signs_best_stdout.txt
