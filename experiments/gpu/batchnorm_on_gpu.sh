#!/bin/bash
# The hand-written BatchNorm (resnet_flax/ops/batchnorm.py: conv bias taken in, ReLU folded in) on
# the GPU: its tests against flax's layer, the model, training and pooling tests, SIGNS end to end,
# and the training throughput (check_on_gpu.sh).
# The training tests are test_train.py and the files split from it (steps, evaluation,
# recalibration, config, sweep).
exec bash "$(dirname "$0")/check_on_gpu.sh" tests/test_batchnorm.py tests/test_models.py tests/test_train.py \
  tests/test_steps.py tests/test_evaluation.py tests/test_recalibration.py tests/test_config.py tests/test_sweep.py \
  tests/test_pooling.py
