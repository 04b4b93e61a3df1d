"""Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers
for Image Recognition at Scale", ICLR 2021): ViT-Ti/16, ViT-S/16 (the DeiT widths,
Touvron et al. 2021) and ViT-B/16.

Module names follow torchvision's ``torchvision.models.vision_transformer``
(``conv_proj``, ``class_token``, ``encoder.pos_embedding``,
``encoder.layers.encoder_layer_<i>.{ln_1, self_attention, ln_2, mlp.0, mlp.3}``,
``encoder.ln``, ``heads.head``), so its state_dicts (``vit_b_16``) load with
``strict=True``. The tiny/small/base counts (5,717,416 / 22,050,664 / 86,567,656) equal
timm's ``vit_*_patch16_224``: both layouts hold the same tensors (timm's fused ``qkv`` is
torchvision's ``in_proj``); :func:`timm_to_vhist` maps a timm state_dict onto ours.

The patch embedding is a 16×16/16 conv on the vhist conv op. Attention uses
``nn.MultiheadAttention``'s parameters (``in_proj_weight``/``in_proj_bias``,
``out_proj``) but runs as one packed projection and
``vhist.nn.functional.scaled_dot_product_attention`` (FlashAttention-2 on the triton
backend, reading q, k and v in place from the projection). The LayerNorms are
``vhist.nn.LayerNorm`` (same parameters), the second of each block fused with the
attention branch's residual add (``add_forward``), and the MLP's first linear layer runs
without its bias, which ``vhist.nn.functional.bias_gelu`` adds with the GELU in one
kernel; the GEMMs stay on cuBLAS. Launches of one block on the triton backend, training
(``vhist models --verbose`` counts them): forward LN, attention, add + LN, bias + GELU
(4); backward GELU (2: dz, bias-gradient sum), LN with the residual gradient (2),
attention (3), LN (2). The classifier head is initialized with a truncated
normal (std 0.02, as timm) instead of torchvision's zeros, so that every parameter gets a
gradient from the first step.

Small inputs: the position embedding always has ``(image_size / patch)^2 + 1`` entries.
For ``image_size < 64`` the default patch is 4×4 instead of 16×16 (32 px → 8×8 = 64
tokens, the usual CIFAR ViT setting); ``conv_proj`` then has 3·4·4 inputs per output.
Pass ``patch_size`` to choose it explicitly.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vhist import nn as vnn
from vhist.nn import functional as VF
from vhist.models._common import DropPath, check_image_size, drop_path_rates, scaled
from vhist.models._registry import register_model
from vhist.models.initialization import check_init, generic_init, torch_defaults_

SMALL_BELOW = 64
IMAGE_SIZE = 224


class SelfAttention(nn.MultiheadAttention):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameters, computed
    through ``vhist.nn.functional.scaled_dot_product_attention`` (batch-first inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, n, d = x.shape
        h = self.num_heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        out = VF.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2],
                                              dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class MLPBlock(nn.Sequential):
    """Linear → GELU → Dropout → Linear → Dropout (torchvision's indices 0..4); the first
    linear layer's bias is added by the bias + GELU kernel."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float):
        super().__init__(nn.Linear(dim, mlp_dim), vnn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim),
                         nn.Dropout(dropout))
        for m in (self[0], self[3]):
            nn.init.xavier_uniform_(m.weight)
            nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, gelu, drop1, fc2, drop2 = self
        h = VF.bias_gelu(F.linear(x, fc1.weight), fc1.bias, gelu.approximate)
        return drop2(fc2(drop1(h)))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + MSA(LN(x)), then + MLP(LN(.)) (Eqs. 2-3), each
    branch through stochastic depth (DeiT, Touvron et al. 2021)."""

    def __init__(self, num_heads: int, dim: int, mlp_dim: int, dropout: float, attention_dropout: float,
                 drop_path: float = 0.0):
        super().__init__()
        self.ln_1 = vnn.LayerNorm(dim, eps=1e-6)
        self.self_attention = SelfAttention(dim, num_heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = vnn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, mlp_dim, dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x + attention branch and ln_2 of that sum in one pass (Eq. 2 and Eq. 3's norm).
        x, h = self.ln_2.add_forward(self.drop_path(self.dropout(self.self_attention(self.ln_1(x)))), x)
        return x + self.drop_path(self.mlp(h))


class Encoder(nn.Module):
    def __init__(self, seq_length: int, num_layers: int, num_heads: int, dim: int, mlp_dim: int,
                 dropout: float, attention_dropout: float, drop_path_rate: float = 0.0):
        super().__init__()
        rates = drop_path_rates(drop_path_rate, num_layers)
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, dim, mlp_dim, dropout, attention_dropout, rates[i]))
            for i in range(num_layers)))
        self.ln = vnn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """ViT with torchvision's layout.

    Args:
        image_size: input resolution (224 by default).
        patch_size: patch side; default 16, or 4 for ``image_size < 64``.
        num_layers, num_heads, hidden_dim, mlp_dim: the encoder's shape.
        num_classes: classifier outputs.
        dropout, attention_dropout: dropout rates (0 by default).
        drop_path_rate: stochastic depth, rising linearly from 0 in the first block to
            this in the last (DeiT uses 0.1).
        channel_divisor: test-only, not a paper knob: divides hidden_dim and mlp_dim.
    """

    def __init__(self, image_size: int, patch_size: Optional[int], num_layers: int, num_heads: int,
                 hidden_dim: int, mlp_dim: int, num_classes: int = 1000, dropout: float = 0.0,
                 attention_dropout: float = 0.0, drop_path_rate: float = 0.0, channel_divisor: int = 1):
        super().__init__()
        check_image_size("vit", image_size, 8)
        if patch_size is None:
            patch_size = 4 if image_size < SMALL_BELOW else 16
        if image_size % patch_size:
            raise ValueError(f"vit: image_size {image_size} is not a multiple of patch_size {patch_size}")
        hidden_dim, mlp_dim = scaled(hidden_dim, channel_divisor), scaled(mlp_dim, channel_divisor)
        if hidden_dim % num_heads:
            raise ValueError(f"vit: hidden_dim {hidden_dim} is not a multiple of num_heads {num_heads}")
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, hidden_dim
        self.conv_proj = vnn.Conv2d(3, hidden_dim, patch_size, patch_size)
        fan_in = 3 * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        seq_length = (image_size // patch_size) ** 2 + 1
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout,
                               drop_path_rate)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))
        nn.init.trunc_normal_(self.heads.head.weight, std=0.02)
        nn.init.zeros_(self.heads.head.bias)

    def init_weights(self, scheme: str) -> None:
        """``paper``: the ViT reference code (google-research/vision_transformer, which
        torchvision's ``vision_transformer.py`` follows): patch conv truncated normal with
        std sqrt(1 / fan_in) (LeCun), MLP Xavier-uniform with N(0, 1e-6) biases, position
        embedding N(0, 0.02), class token 0, zero-initialized head, attention and norms at
        PyTorch's defaults. ``modern``: timm's ``init_weights_vit_timm``: every linear
        layer (the packed attention projection included) truncated normal std 0.02 with
        zero biases, position embedding truncated normal 0.02, class token N(0, 1e-6),
        norms (1, 0), the patch conv at PyTorch's default. ``torch``: the layer defaults.
        The default is ``paper`` with timm's truncated-normal head (module doc)."""
        check_init(scheme)
        enc = self.encoder
        if scheme == "torch":
            generic_init(self, scheme)
            return
        torch_defaults_(self)
        if scheme == "paper":
            fan_in = self.conv_proj.weight[0].numel()
            nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
            nn.init.zeros_(self.conv_proj.bias)
            for m in self.modules():
                if isinstance(m, MLPBlock):
                    for lin in (m[0], m[3]):
                        nn.init.xavier_uniform_(lin.weight)
                        nn.init.normal_(lin.bias, std=1e-6)
            nn.init.normal_(enc.pos_embedding, std=0.02)
            nn.init.zeros_(self.class_token)
            nn.init.zeros_(self.heads.head.weight)
            nn.init.zeros_(self.heads.head.bias)
        else:
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.MultiheadAttention):
                    nn.init.trunc_normal_(m.in_proj_weight, std=0.02)
                    nn.init.zeros_(m.in_proj_bias)
            nn.init.trunc_normal_(enc.pos_embedding, std=0.02)
            nn.init.normal_(self.class_token, std=1e-6)

    pretrained_keys = dict(first_conv="conv_proj", classifier="heads.head")

    def feature_modules(self) -> list[str]:
        """Every encoder block, as timm's ViT ``feature_info`` (all at the patch's reduction)."""
        return [f"encoder.layers.{name}" for name, _ in self.encoder.layers.named_children()]

    def tokens_to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """A block's tokens (B, 1 + HW, D) as a (B, D, H, W) map, the class token dropped
        (timm's ``forward_intermediates`` layout)."""
        side = self.image_size // self.patch_size
        return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, side, side)

    def filter_state_dict(self, state_dict: dict) -> dict:
        """A timm ViT state_dict mapped onto these keys (:func:`timm_to_vhist`); others unchanged."""
        return timm_to_vhist(state_dict) if "cls_token" in state_dict else state_dict

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's normalized tokens, (B, 1 + HW, D), class token first."""
        x = self.conv_proj(x)  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.encoder(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features (``pre_logits``) or logits from :meth:`forward_features`' tokens (class-token pooling)."""
        x = x[:, 0]
        return x if pre_logits else self.heads(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def timm_to_vhist(state_dict: dict) -> dict:
    """Maps a timm ``VisionTransformer`` state_dict (``vit_*_patch16_224``: ``cls_token``,
    ``pos_embed``, ``patch_embed.proj``, ``blocks.<i>.{norm1, attn.qkv, attn.proj, norm2,
    mlp.fc1, mlp.fc2}``, ``norm``, ``head``) onto this module's keys."""
    out = {}
    for key, value in state_dict.items():
        new = (key.replace("cls_token", "class_token").replace("pos_embed", "encoder.pos_embedding")
               .replace("patch_embed.proj", "conv_proj").replace("attn.qkv.weight", "self_attention.in_proj_weight")
               .replace("attn.qkv.bias", "self_attention.in_proj_bias").replace("attn.proj", "self_attention.out_proj")
               .replace("norm1", "ln_1").replace("norm2", "ln_2").replace("mlp.fc1", "mlp.0")
               .replace("mlp.fc2", "mlp.3"))
        if new.startswith("blocks."):
            _, i, rest = new.split(".", 2)
            new = f"encoder.layers.encoder_layer_{i}.{rest}"
        elif new.startswith("norm."):
            new = "encoder.ln." + new[len("norm."):]
        elif new.startswith("head."):
            new = "heads." + new
        out[new] = value
    return out


def _vit(num_classes, image_size, num_layers, num_heads, hidden_dim, mlp_dim, patch_size=None, depth=None,
         **kwargs) -> VisionTransformer:
    """``depth`` overrides the number of encoder layers (12): fewer only to make tests fast."""
    return VisionTransformer(image_size or IMAGE_SIZE, patch_size, depth or num_layers, num_heads, hidden_dim, mlp_dim,
                             num_classes=num_classes, **kwargs)


@register_model(image_size=IMAGE_SIZE, small_below=SMALL_BELOW)
def vit_tiny_patch16(num_classes: int = 1000, image_size: Optional[int] = None, **kwargs) -> VisionTransformer:
    """ViT-Ti/16 (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021; widths of DeiT-Ti)."""
    return _vit(num_classes, image_size, 12, 3, 192, 768, **kwargs)


@register_model(image_size=IMAGE_SIZE, small_below=SMALL_BELOW)
def vit_small_patch16(num_classes: int = 1000, image_size: Optional[int] = None, **kwargs) -> VisionTransformer:
    """ViT-S/16 (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021; widths of DeiT-S)."""
    return _vit(num_classes, image_size, 12, 6, 384, 1536, **kwargs)


@register_model(image_size=IMAGE_SIZE, small_below=SMALL_BELOW)
def vit_base_patch16(num_classes: int = 1000, image_size: Optional[int] = None, **kwargs) -> VisionTransformer:
    """ViT-B/16 (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021)."""
    return _vit(num_classes, image_size, 12, 12, 768, 3072, **kwargs)
