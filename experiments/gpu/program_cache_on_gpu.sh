#!/bin/bash
# The exported-program cache (resnet_flax/program_cache.py) and the two-thread start on a GPU: its
# tests and the smoke training runs, the second of which starts from the programs the first saved. Set-up in setup.sh (with a
# flatbuffers wheel in .gpu/whl: jax.export's serialization needs it).
source "$(dirname "$0")/setup.sh"
T0=$(date +%s)
XLA_FLAGS='--xla_gpu_deterministic_ops=true --xla_gpu_autotune_level=0' timeout 150 python3 -m pytest -q \
  -p no:cacheprovider --run-slow tests/test_program_cache.py tests/test_train.py -k "program or warm or smoke or identical" -rs \
  > $OUT/tests_program_cache.txt 2>&1
echo "tests rc $? $(( $(date +%s)-T0 )) s" | tee -a $OUT/tests_program_cache.txt; tail -4 $OUT/tests_program_cache.txt
ls ~/.cache/resnet_flax/jax_compilation_cache/exported_programs | sed 's/-.*//' | sort | uniq -c
