"""EG3D's tri-plane feature decoder (a plain, non-persistent module in EG3D).

The three sampled features of a point are averaged, then FC(C, 64), softplus, FC(64, 1 + D):
output 0 is the raw density, outputs 1.. the colour features through MipNeRF's widened sigmoid
``sigmoid(x) * 1.002 - 0.001``. The ray directions are accepted and unused.
"""

import torch
from training.networks_stylegan2 import FullyConnectedLayer


class OSGDecoder(torch.nn.Module):
    def __init__(self, n_features, options):
        super().__init__()
        self.hidden_dim = 64
        lr_mul = options["decoder_lr_mul"]
        self.net = torch.nn.Sequential(
            FullyConnectedLayer(n_features, self.hidden_dim, lr_multiplier=lr_mul),
            torch.nn.Softplus(),
            FullyConnectedLayer(self.hidden_dim, 1 + options["decoder_output_dim"], lr_multiplier=lr_mul),
        )

    def forward(self, sampled_features, ray_directions):
        features = sampled_features.mean(1)  # (N, n_planes, M, C) -> (N, M, C)
        batch, points, channels = features.shape
        out = self.net(features.view(batch * points, channels)).view(batch, points, -1)
        return {"rgb": torch.sigmoid(out[..., 1:]) * (1 + 2 * 0.001) - 0.001, "sigma": out[..., 0:1]}
