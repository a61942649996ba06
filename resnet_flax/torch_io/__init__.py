"""PyTorch interoperability: torchvision and timm ResNet ``state_dict``s in and out (see
``state_dict``), and the command ``python -m resnet_flax.torch_io import|export`` (see ``__main__``)."""

from resnet_flax.torch_io.state_dict import (
    read_state_dict,
    state_dict_from_variables,
    torch_names,
    variables_from_state_dict,
    write_state_dict,
)

__all__ = ["read_state_dict", "state_dict_from_variables", "torch_names", "variables_from_state_dict",
           "write_state_dict"]
