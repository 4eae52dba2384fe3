"""DreamPortrait's text conditioning of the tri-plane generator.

Two paths, both exactly inactive at initialisation so the pretrained generator is unchanged at
step 0:

- **Hierarchical condition adapters**: the pooled text embedding -> an offset to w for each group
  of synthesis layers (coarse, middle, fine) and for the super-resolution, by small MLPs whose last
  layer is zero.
- **3D-aware gated cross-attention**: after chosen synthesis blocks, every tri-plane texel attends
  to the text tokens. Its query sees the texel's own features, its plane, its 2D position and what
  the other two planes hold along the texel's 3D line; the result is added to the tri-plane image
  and to the block's features through ``tanh(alpha)`` with ``alpha = 0`` (``gated_cross_attention``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..models.renderer import TRIPLANE_AXES
from ..models.triplane_generator import PLANE_CHANNELS, TriPlaneGenerator
from ..ops import gated_cross_attention
from ..weights import load_weights
from .encoder import TextEncoder, TextFeatures

ADAPTER_GROUPS = ("coarse", "middle", "fine", "superresolution")


def zero_output_mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    """in -> hidden -> lrelu -> out, the last layer zero: outputs exactly 0 until trained."""
    mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, out_features))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


class ConditionAdapters(nn.Module):
    """Pooled text ``(N, D)`` -> offsets: ``ws_offset`` ``(N, num_ws, w_dim)`` for the synthesis
    layers (one offset per group, repeated over the group's ws) and ``sr_offset`` ``(N, 1, w_dim)``.

    ``group_of_ws[i]`` names the group of w index ``i``.
    """

    def __init__(self, text_dim: int, w_dim: int, group_of_ws: Sequence[str], hidden: int | None = None):
        super().__init__()
        unknown = sorted(set(group_of_ws) - set(ADAPTER_GROUPS[:3]))
        if unknown:
            raise ValueError(f"ConditionAdapters: unknown groups {unknown}; use {ADAPTER_GROUPS[:3]}")
        hidden = hidden or w_dim
        self.groups = nn.ModuleDict({name: zero_output_mlp(text_dim, hidden, w_dim) for name in ADAPTER_GROUPS})
        index = {name: i for i, name in enumerate(ADAPTER_GROUPS[:3])}
        self.register_buffer("ws_group", torch.tensor([index[name] for name in group_of_ws]), persistent=False)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        per_group = torch.stack([self.groups[name](pooled) for name in ADAPTER_GROUPS[:3]], dim=1)  # (N, 3, w_dim)
        return per_group[:, self.ws_group], self.groups["superresolution"](pooled).unsqueeze(1)


def line_features(planes: Tensor, axes: Sequence[int]) -> Tensor:
    """For each texel of each plane, the features the other two planes hold along its 3D line.

    planes ``(N, 3, C, R, R)``, plane ``p`` spanning world axes ``(axes[2p]`` along W, ``axes[2p+1]``
    along H). The line through a texel runs along the axis its plane lacks. On another plane it
    either projects to a line (that plane holds the missing axis: averaged along it) or to a point
    (that plane holds the same two axes: read there). Returns ``(N, 3, 2C, R, R)``.
    """
    u, v = axes[0::2], axes[1::2]
    out = []
    for p in range(3):
        missing = 3 - u[p] - v[p]
        gathered = []
        for q in (q for q in range(3) if q != p):
            plane = planes[:, q]  # (N, C, H=v_q, W=u_q)
            if missing in (u[q], v[q]):
                kept = v[q] if u[q] == missing else u[q]
                profile = plane.mean(dim=3 if u[q] == missing else 2)  # (N, C, R) along axis `kept`
                gathered.append(profile.unsqueeze(2 if kept == u[p] else 3).expand_as(plane))
            else:
                gathered.append(plane if (u[q], v[q]) == (u[p], v[p]) else plane.transpose(2, 3))
        out.append(torch.cat(gathered, dim=1))
    return torch.stack(out, dim=1)


def fourier_positions(resolution: int, frequencies: int, device, dtype) -> Tensor:
    """``(4 * frequencies, R, R)`` sines and cosines of the texel centres' (u, v) in [-1, 1]."""
    centres = (torch.arange(resolution, device=device, dtype=dtype) + 0.5) / resolution * 2 - 1
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    scales = (2.0 ** torch.arange(frequencies, device=device, dtype=dtype)) * math.pi
    angles = torch.cat([u[None] * scales[:, None, None], v[None] * scales[:, None, None]])
    return torch.cat([angles.sin(), angles.cos()])


class TriplaneCrossAttention(nn.Module):
    """3D-aware gated cross-attention from tri-plane texels to text tokens at one resolution.

    Called with the synthesis block's features x ``(N, C, R, R)`` and tri-plane image img ``(N,
    96, R, R)``, text tokens ``(N, L, D)`` and mask ``(N, L)``; returns both with the gated
    attention output added (projected to the 3 x 32 plane channels and to C). ``gate`` ``(heads,)``
    starts at 0: the block then adds exactly nothing.
    """

    def __init__(self, feature_channels: int, text_dim: int, axes: Sequence[int], heads: int = 4,
                 head_dim: int = 32, identity_dim: int = 16, frequencies: int = 4):
        super().__init__()
        self.axes, self.heads, self.head_dim, self.frequencies = tuple(axes), heads, head_dim, frequencies
        query_in = 3 * PLANE_CHANNELS + identity_dim + 4 * frequencies
        self.plane_identity = nn.Parameter(torch.randn(3, identity_dim) * 0.02)
        self.query_norm = nn.LayerNorm(query_in)
        self.to_q = nn.Linear(query_in, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(text_dim, 2 * heads * head_dim, bias=False)
        self.gate = nn.Parameter(torch.zeros(heads))
        # No biases after the attention: a closed gate must leave the generator exactly unchanged.
        self.to_planes = nn.Linear(heads * head_dim, PLANE_CHANNELS, bias=False)
        self.to_features = nn.Linear(3 * heads * head_dim, feature_channels, bias=False)

    def forward(self, x: Tensor, img: Tensor, text: TextFeatures) -> tuple[Tensor, Tensor]:
        batch, _, resolution, _ = img.shape
        planes = img.view(batch, 3, PLANE_CHANNELS, resolution, resolution)
        identity = self.plane_identity[None, :, :, None, None].expand(batch, -1, -1, resolution, resolution)
        position = fourier_positions(resolution, self.frequencies, img.device, img.dtype)
        position = position[None, None].expand(batch, 3, -1, -1, -1)
        query_in = torch.cat([planes, line_features(planes, self.axes), identity.to(img.dtype), position], dim=2)
        query_in = query_in.permute(0, 1, 3, 4, 2).reshape(batch, 3 * resolution * resolution, -1)
        q = self.to_q(self.query_norm(query_in)).view(batch, -1, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(text.tokens.to(img.dtype)).view(batch, -1, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attended = gated_cross_attention(q, k, v, self.gate.to(img.dtype), text.mask)  # (N, H, 3RR, Dh)
        attended = attended.transpose(1, 2).reshape(batch, 3, resolution, resolution, self.heads * self.head_dim)
        plane_update = self.to_planes(attended).permute(0, 1, 4, 2, 3).reshape_as(img)
        feature_update = self.to_features(attended.permute(0, 2, 3, 1, 4).reshape(batch, resolution, resolution, -1))
        return x + feature_update.permute(0, 3, 1, 2).to(x.dtype), img + plane_update


def ws_groups(generator: TriPlaneGenerator, middle_from: int, fine_from: int) -> list[str]:
    """The adapter group of each of the backbone's ws: blocks below resolution ``middle_from`` are
    coarse, below ``fine_from`` middle, the rest fine (the last w, only a ToRGB's, is fine)."""
    groups = []
    for res in generator.backbone.synthesis.block_resolutions:
        block = getattr(generator.backbone.synthesis, f"b{res}")
        groups += ["coarse" if res < middle_from else "middle" if res < fine_from else "fine"] * block.num_conv
    return groups + ["fine"] * (generator.num_ws - len(groups))


class _Shared:
    """Holds a reference that copies of the module share (``copy.deepcopy`` of a generator, e.g.
    its EMA, must not duplicate the frozen text encoder)."""

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


class TextConditionedGenerator(nn.Module):
    """``G(z, c, prompts)``: a :class:`TriPlaneGenerator` (``base``) conditioned on text.

    Args:
        base: the (pretrained) generator; its parameter names stay under ``base.``.
        text_dim: width of the text features (``TextEncoder.dim``).
        text_encoder: encodes prompts given to :meth:`forward`; kept out of this module's
            parameters and state dict (pass precomputed :class:`TextFeatures` instead to skip it).
        adapter_boundaries: ``(middle_from, fine_from)`` synthesis resolutions splitting the ws
            into coarse / middle / fine adapter groups (default: 16 and 64).
        attention_resolutions: synthesis resolutions after whose block the cross-attention runs.
        attention_heads, attention_head_dim: its shape.
        use_adapters, use_cross_attention: switch either path off (ablations).
    """

    def __init__(self, base: TriPlaneGenerator, text_dim: int, text_encoder: TextEncoder | None = None,
                 adapter_boundaries: tuple[int, int] = (16, 64), adapter_hidden: int | None = None,
                 attention_resolutions: Sequence[int] = (32, 64), attention_heads: int = 4,
                 attention_head_dim: int = 32, use_adapters: bool = True, use_cross_attention: bool = True):
        super().__init__()
        self.init_kwargs = dict(text_dim=text_dim, adapter_boundaries=list(adapter_boundaries),
                                adapter_hidden=adapter_hidden, attention_resolutions=list(attention_resolutions),
                                attention_heads=attention_heads, attention_head_dim=attention_head_dim,
                                use_adapters=use_adapters, use_cross_attention=use_cross_attention)
        """The constructor's arguments besides base and text_encoder: what a checkpoint records."""
        self.base = base
        self._text_encoder = _Shared(text_encoder)  # not a submodule: its weights are not ours
        self.text_dim = text_dim
        synthesis = base.backbone.synthesis
        self.adapters = None
        if use_adapters:
            self.adapters = ConditionAdapters(text_dim, base.w_dim, ws_groups(base, *adapter_boundaries), adapter_hidden)
        self.cross_attention = nn.ModuleDict()
        if use_cross_attention:
            axes = TRIPLANE_AXES[base.rendering_kwargs.get("triplane_axes", "eg3d")]
            for res in attention_resolutions:
                if res not in synthesis.block_resolutions:
                    raise ValueError(f"attention_resolutions: {res} is not a synthesis resolution "
                                     f"{synthesis.block_resolutions}")
                channels = getattr(synthesis, f"b{res}").conv1.out_channels
                self.cross_attention[str(res)] = TriplaneCrossAttention(channels, text_dim, axes, attention_heads,
                                                                        attention_head_dim)

    @property
    def text_encoder(self) -> TextEncoder | None:
        return self._text_encoder.value

    def encode(self, prompts: Sequence[str]) -> TextFeatures:
        if self.text_encoder is None:
            raise ValueError("prompts given but the generator has no text_encoder; pass text=TextFeatures instead")
        return self.text_encoder(prompts).to(next(self.parameters()).device)

    def _text(self, prompts, text, batch: int) -> TextFeatures:
        if (prompts is None) == (text is None):
            raise ValueError("give exactly one of prompts (list of strings) and text (TextFeatures)")
        text = self.encode(prompts) if text is None else text
        if len(text) != batch:
            raise ValueError(f"{len(text)} prompts/text features for a batch of {batch} samples")
        if text.tokens.shape[-1] != self.text_dim:
            raise ValueError(f"text features have width {text.tokens.shape[-1]}, the generator expects {self.text_dim}")
        return text

    def mapping(self, z: Tensor, c: Tensor, text: TextFeatures, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, update_emas: bool = False) -> tuple[Tensor, Tensor]:
        """ws ``(N, num_ws, w_dim)`` and the super-resolution's ws ``(N, 1, w_dim)``, offset by the
        adapters (after truncation: truncation pulls the base ws towards their mean, not the text)."""
        ws = self.base.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                               update_emas=update_emas)
        sr_ws = ws[:, -1:]
        if self.adapters is not None:
            ws_offset, sr_offset = self.adapters(text.pooled.to(ws.dtype))
            ws, sr_ws = ws + ws_offset, sr_ws + sr_offset
        return ws, sr_ws

    def block_hook(self, text: TextFeatures):
        """The synthesis hook running the cross-attention blocks (None without any)."""
        if not len(self.cross_attention):
            return None

        def hook(res: int, x: Tensor, img: Tensor) -> tuple[Tensor, Tensor]:
            block = self.cross_attention[str(res)] if str(res) in self.cross_attention else None
            return (x, img) if block is None else block(x, img, text)

        return hook

    def forward(self, z: Tensor, c: Tensor, prompts: Sequence[str] | None = None, text: TextFeatures | None = None,
                truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                neural_rendering_resolution: int | None = None, update_emas: bool = False,
                noise_mode: str = "random", deterministic_sampling: bool | None = None,
                conditioning: Tensor | None = None) -> dict[str, Tensor]:
        """z ``(N, z_dim)``, cameras c ``(N, 25)`` and N prompts (or their ``text`` features) ->
        the base generator's outputs (``image``, ``image_raw``, ``image_depth``, ``planes``).
        ``conditioning`` ``(N, 25)``: the cameras the mapping is conditioned on (default: c)."""
        text = self._text(prompts, text, z.shape[0])
        ws, sr_ws = self.mapping(z, c if conditioning is None else conditioning, text, truncation_psi,
                                 truncation_cutoff, update_emas)
        return self.synthesis(ws, c, text, sr_ws, neural_rendering_resolution=neural_rendering_resolution,
                              noise_mode=noise_mode, deterministic_sampling=deterministic_sampling)

    def synthesis(self, ws: Tensor, c: Tensor, text: TextFeatures, sr_ws: Tensor | None = None,
                  **kwargs) -> dict[str, Tensor]:
        """Render conditioned ws (see :meth:`TriPlaneGenerator.synthesis` for kwargs)."""
        return self.base.synthesis(ws, c, block_hook=self.block_hook(text), sr_ws=sr_ws, **kwargs)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by role, for per-group learning rates: ``adapters``, ``cross_attention``, ``base``."""
        return {
            "adapters": list(self.adapters.parameters()) if self.adapters is not None else [],
            "cross_attention": list(self.cross_attention.parameters()),
            "base": list(self.base.parameters()),
        }

    def load_base_state_dict(self, state_dict) -> None:
        """Load an EG3D (``TriPlaneGenerator``) state dict into the base, strictly."""
        load_weights(self.base, state_dict, "base state dict")
