"""The one StyleGAN2 layer EG3D's tri-plane decoder uses: an equalised-learning-rate linear layer.

Weights are stored as ``randn / lr_multiplier`` and scaled at run time by ``lr_multiplier /
sqrt(in_features)``; the bias (scaled by ``lr_multiplier``) is added by ``addmm`` for a linear
layer. A persistent class in EG3D.
"""

import math

import torch
from torch_utils import persistence


@persistence.persistent_class
class FullyConnectedLayer(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, activation="linear", lr_multiplier=1, bias_init=0):
        super().__init__()
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = torch.nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x):
        weight = self.weight.to(x.dtype) * self.weight_gain
        bias = self.bias
        if bias is not None:
            bias = bias.to(x.dtype)
            if self.bias_gain != 1:
                bias = bias * self.bias_gain
        if self.activation != "linear":
            raise NotImplementedError("the tri-plane decoder only uses linear layers")
        if bias is None:
            return x.matmul(weight.t())
        return torch.addmm(bias.unsqueeze(0), x, weight.t())
