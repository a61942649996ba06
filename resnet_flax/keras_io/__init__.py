"""Keras interoperability: the assignment's Keras h5 weights in and out (see ``weights``), and the
command ``python -m resnet_flax.keras_io import|export`` (see ``__main__``)."""

from resnet_flax.keras_io.weights import (
    KERAS_WEIGHTS,
    expected_variables,
    keras_layer_order,
    layer_kind,
    load_keras_weights,
    save_keras_weights,
)

__all__ = ["KERAS_WEIGHTS", "expected_variables", "keras_layer_order", "layer_kind", "load_keras_weights",
           "save_keras_weights"]
