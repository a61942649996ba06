#!/bin/bash
# Fifth GPU check (session 4): the max-pool with its own gradient (resnet_flax/pooling.py) and the
# training chunks that run a traced number of steps, on the GPU; then SIGNS end to end and the
# training throughput of the chunks (check_on_gpu.sh).
exec bash "$(dirname "$0")/check_on_gpu.sh" tests/test_pooling.py tests/test_models.py tests/test_train.py \
  tests/test_program_cache.py
