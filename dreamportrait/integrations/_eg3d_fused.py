"""The fused ``run_model`` :func:`dreamportrait.integrations.eg3d.install` puts on EG3D's renderer."""

from __future__ import annotations

import functools
import numbers

import torch
from torch import Tensor, nn

from ..ops.sample_and_decode import sample_and_decode


def _linear_layer(layer, in_features: int) -> bool:
    """EG3D's equalised-learning-rate ``FullyConnectedLayer``, linear, with a bias."""
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    return (type(layer).__name__ == "FullyConnectedLayer" and getattr(layer, "activation", None) == "linear"
            and isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[1] == in_features
            and isinstance(bias, Tensor) and tuple(bias.shape) == (weight.shape[0],)
            and isinstance(getattr(layer, "weight_gain", None), numbers.Real)
            and isinstance(getattr(layer, "bias_gain", None), numbers.Real))


def _hooked(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def osg_decoder_layers(decoder, channels: int):
    """The two linear layers of an EG3D ``OSGDecoder`` (recognised by its structure: class name,
    ``Sequential(FullyConnectedLayer, Softplus(), FullyConnectedLayer)``, no hooks), else None."""
    net = getattr(decoder, "net", None)
    if type(decoder).__name__ != "OSGDecoder" or not isinstance(net, nn.Sequential) or len(net) != 3:
        return None
    first, activation, second = net
    if not (type(activation) is nn.Softplus and activation.beta == 1 and activation.threshold == 20):
        return None
    if not (_linear_layer(first, channels) and _linear_layer(second, first.weight.shape[0])
            and second.weight.shape[0] >= 2):
        return None
    if any(_hooked(module) for module in (decoder, net, first, activation, second)):
        return None
    return first, second


def effective_weights(layer, dtype):
    """A linear layer's weight and bias as used: scaled by its learning-rate gains, in ``dtype``."""
    weight = layer.weight.to(dtype) * layer.weight_gain
    bias = layer.bias.to(dtype)
    if layer.bias_gain != 1:
        bias = bias * layer.bias_gain
    return weight, bias


def fused_run_model(original):
    """EG3D's ``ImportanceRenderer.run_model`` decoding an ``OSGDecoder`` with
    :func:`~dreamportrait.ops.sample_and_decode`; any other decoder (or plane axes without a kernel)
    goes to ``original``."""
    from .eg3d import kernel_axes

    @functools.wraps(original)
    def run_model(self, planes, decoder, sample_coordinates, sample_directions, options):
        axes = kernel_axes(getattr(self, "plane_axes", None))
        layers = None
        if (axes is not None and isinstance(planes, Tensor) and planes.dim() == 5 and planes.shape[1] == 3
                and planes.dtype in (torch.float32, torch.float64) and isinstance(sample_coordinates, Tensor)
                and sample_coordinates.dtype == planes.dtype and planes.device.type in ("cpu", "cuda")):
            layers = osg_decoder_layers(decoder, planes.shape[2])
        if layers is None:
            return original(self, planes, decoder, sample_coordinates, sample_directions, options)
        (weight1, bias1), (weight2, bias2) = (effective_weights(layer, planes.dtype) for layer in layers)
        out = sample_and_decode(planes, sample_coordinates, options["box_warp"], weight1, bias1, weight2, bias2,
                                axes)
        result = {"rgb": out[..., 1:], "sigma": out[..., 0:1]}
        if options.get("density_noise", 0) > 0:
            result["sigma"] += torch.randn_like(result["sigma"]) * options["density_noise"]
        return result

    return run_model
