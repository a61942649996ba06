#!/bin/bash
# The max-pool with its own gradient (resnet_flax/ops/pooling.py) and the training chunks that run
# a traced number of steps, on the GPU; then SIGNS end to end and the training throughput of the
# chunks (check_on_gpu.sh).
# The chunk tests are in test_steps.py, the other training tests in test_train.py and the files
# split from it (evaluation, recalibration, config, sweep).
exec bash "$(dirname "$0")/check_on_gpu.sh" tests/test_pooling.py tests/test_models.py tests/test_train.py \
  tests/test_steps.py tests/test_evaluation.py tests/test_recalibration.py tests/test_config.py tests/test_sweep.py \
  tests/test_program_cache.py
