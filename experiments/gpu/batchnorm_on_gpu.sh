#!/bin/bash
# Sixth GPU check (session 5): the BatchNorm with its own gradient (resnet_flax/batchnorm.py, conv
# bias taken in, ReLU folded in) on the GPU: its tests against flax's layer, the model and training
# tests, SIGNS end to end, and the training throughput (check_on_gpu.sh).
exec bash "$(dirname "$0")/check_on_gpu.sh" tests/test_batchnorm.py tests/test_models.py tests/test_train.py \
  tests/test_pooling.py
