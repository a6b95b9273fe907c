"""The SigLIP vision tower and Gemma 3's projector, in plain eager PyTorch.

An image of image_size^2 pixels becomes tokens_per_image soft tokens in the text model's width:

- a patch_size x patch_size, stride patch_size convolution (with bias) cuts it into patches,
  read in row-major order, plus a learned position table: no CLS token;
- pre-LayerNorm encoder layers (bidirectional attention with biases, an MLP with tanh GELU),
  then a final LayerNorm; no pooling head;
- the projector lays the patches back out as a grid, average-pools it (64x64 -> 16x16 for
  Gemma 3), normalises with Gemma's RMSNorm (float32, 1 + weight) and multiplies by
  `mm_input_projection_weight`, stored [vision_hidden, text_hidden]: a plain matmul.

The features replace the embeddings of the image tokens after the text embedding's
sqrt(hidden) scale; they are not scaled themselves. Parameter names follow the checkpoints'
(`tower.` for `vision_tower.`, `projector.` for `multi_modal_projector.`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model import RMSNorm
from .config import VisionConfig


class Embeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, config.hidden_size, config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Embedding(config.patches_per_side**2, config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [N, patches, hidden]
        return patches + self.position_embedding.weight


class Attention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        hidden = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, P, _ = x.shape
        # [N, P, heads * head_dim] -> [N, heads, P, head_dim]
        q, k, v = (proj(x).view(N, P, self.num_heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch
        return self.out_proj(out.transpose(1, 2).reshape(N, P, -1))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch features [N, patches, vision_hidden] of images [N, 3, image_size, image_size]."""
        return self.post_layernorm(self.encoder(self.embeddings(pixels)))


class Projector(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(config.hidden_size, config.text_hidden_size))
        self.mm_soft_emb_norm = RMSNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        N, _, hidden = patches.shape
        side = self.config.patches_per_side
        grid = patches.transpose(1, 2).reshape(N, hidden, side, side)  # row-major patches as a grid
        pooled = F.avg_pool2d(grid, self.config.pool).flatten(2).transpose(1, 2)  # [N, tokens, hidden]
        return (self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight).type_as(patches)


class ImageEncoder(nn.Module):
    """Pixels [N, 3, S, S] -> soft tokens [N, tokens_per_image, text_hidden]."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.tower = SiglipTower(config)
        self.projector = Projector(config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        like = self.projector.mm_input_projection_weight
        return self.projector(self.tower(pixels.to(like.device, like.dtype)))
