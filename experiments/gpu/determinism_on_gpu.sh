#!/bin/bash
# Which XLA flags make two identical training runs on the GPU agree
# (tests/test_train.py::test_same_config_and_seed_give_identical_metrics), and the gemm
# convolution's throughput at precision 'highest' with a longer limit than recheck_on_gpu.sh gives it.
source "$(dirname "$0")/setup.sh"
for flags in "--xla_gpu_deterministic_ops=true --xla_gpu_autotune_level=0" \
             "--xla_gpu_exclude_nondeterministic_ops=true --xla_gpu_autotune_level=0" \
             "--xla_gpu_autotune_level=0"; do
  T0=$(date +%s)
  XLA_FLAGS="$flags" timeout 60 python3 -m pytest -q -p no:cacheprovider --run-slow tests/test_train.py \
    -k identical_metrics > $OUT/det.txt 2>&1
  echo "XLA_FLAGS='$flags': rc $? in $(( $(date +%s)-T0 )) s: $(tail -1 $OUT/det.txt)" | tee -a $OUT/determinism.txt
  grep -E "^E .*!=" $OUT/det.txt | head -3 | tee -a $OUT/determinism.txt
done
T0=$(date +%s)
timeout 200 python3 experiments/throughput.py --only=jax-gemm --steps=20 --precision=highest --out=$OUT/throughput_highest_gemm > $OUT/throughput_stdout_gemm.txt 2>&1
echo "throughput gemm rc $? $(( $(date +%s)-T0 )) s"; grep -E "^\| jax" $OUT/throughput_highest_gemm.md
