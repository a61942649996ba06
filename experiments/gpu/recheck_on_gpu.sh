#!/bin/bash
# The conv, model and training tests on the GPU (the running-mean tolerance, the determinism test
# with --xla_gpu_deterministic_ops alone), and throughput at the project's default precision
# 'highest' for each conv implementation (what 'auto' should pick).
# Set-up in setup.sh (.gpu/whl/ wheels, .gpu/signs/ data copy); $OUT for results.
source "$(dirname "$0")/setup.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1 | tee -a $OUT/gpu.txt
T0=$(date +%s)
# test_conv.py with the files split from it (winograd, layers); test_train.py with its (steps, evaluation,
# recalibration, config, sweep).
timeout 150 python3 -m pytest -q -p no:cacheprovider --run-slow tests/test_conv.py tests/test_winograd.py \
  tests/test_layers.py tests/test_models.py tests/test_train.py tests/test_steps.py tests/test_evaluation.py \
  tests/test_recalibration.py tests/test_config.py tests/test_sweep.py -rs > $OUT/tests.txt 2>&1
echo "tests rc $? $(( $(date +%s)-T0 )) s" | tee -a $OUT/tests.txt; tail -6 $OUT/tests.txt
T0=$(date +%s)
XLA_FLAGS=--xla_gpu_deterministic_ops=true timeout 80 python3 -m pytest -q -p no:cacheprovider --run-slow \
  tests/test_train.py -k identical_metrics -rs > $OUT/tests_deterministic.txt 2>&1
echo "deterministic-ops test rc $? $(( $(date +%s)-T0 )) s" | tee -a $OUT/tests_deterministic.txt; tail -3 $OUT/tests_deterministic.txt
for impl in gemm xla; do
T0=$(date +%s)
timeout 120 python3 experiments/throughput.py --only=jax-$impl --steps=40 --precision=highest --out=$OUT/throughput_highest_$impl > $OUT/throughput_stdout_$impl.txt 2>&1
echo "throughput $impl rc $? $(( $(date +%s)-T0 )) s"; grep -E "^\| jax" $OUT/throughput_highest_$impl.md
done
