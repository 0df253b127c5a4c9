"""SurgicalSAM's prototype bank and prototype-based class prompt encoder (SPEC 3, steps 1-4).

Notation: B batch, C classes, d embedding channels (256), h x w embedding grid, n tokens per class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class PrototypeBank(nn.Module):
    """One learnable prototype (d,) per class, ``nn.Embedding`` initialised N(0, 1).

    ``class_embeddings.weight`` (C, d) keeps the original checkpoint's key name.
    """

    def __init__(self, num_classes: int, embed_dim: int = 256) -> None:
        super().__init__()
        self.class_embeddings = nn.Embedding(num_classes, embed_dim)

    def forward(self) -> torch.Tensor:
        """-> prototypes (C, d)."""
        return self.class_embeddings.weight


class PrototypePromptEncoder(nn.Module):
    """Class prompt -> SAM prompt embeddings, from the similarity of image and class prototypes.

    1. S_k = F @ P_k, raw dot product, (B, C, h*w, 1).
    2. F_k = F + F * S_k, (B, C, h*w, d).
    3. Dense prompt: F_c of the prompted class, (B, d, h, w) -> 1x1 conv d->128, ReLU, 1x1 conv 128->d.
    4. Sparse prompt: per class a two-layer MLP over the spatial axis (h*w -> 128 -> n), n tokens of
       size d; add the frozen positive embedding to the prompted class's tokens and the frozen
       negative embedding to the others; (B, C*n, d).

    ``pn_cls_embeddings[0]`` is negative and ``[1]`` positive (the original's key names), each an
    ``nn.Embedding(n, d)``, frozen; :meth:`init_from_sam_points` copies SAM's point embeddings in.
    """

    def __init__(
        self,
        num_classes: int,
        num_tokens: int,
        grid_size: Sequence[int],
        embed_dim: int = 256,
        dense_hidden_dim: int = 128,
        sparse_hidden_dim: int = 128,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_tokens = num_tokens
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.embed_dim = embed_dim
        num_positions = self.grid_size[0] * self.grid_size[1]
        self.dense_fc_1 = nn.Conv2d(embed_dim, dense_hidden_dim, kernel_size=1)
        self.dense_fc_2 = nn.Conv2d(dense_hidden_dim, embed_dim, kernel_size=1)
        self.sparse_fc_1 = nn.Conv1d(num_positions, sparse_hidden_dim, kernel_size=1)
        self.sparse_fc_2 = nn.Conv1d(sparse_hidden_dim, num_tokens, kernel_size=1)
        self.relu = nn.ReLU()
        self.pn_cls_embeddings = nn.ModuleList([nn.Embedding(num_tokens, embed_dim) for _ in range(2)])
        self.pn_cls_embeddings.requires_grad_(False)

    @torch.no_grad()
    def init_from_sam_points(self, point_embeddings: nn.ModuleList) -> None:
        """Copy SAM's ``prompt_encoder.point_embeddings`` [0] (negative) and [1] (positive), repeated n times."""
        for index in (0, 1):
            weight = point_embeddings[index].weight  # (1, d)
            self.pn_cls_embeddings[index].weight.copy_(weight.expand(self.num_tokens, -1))

    def forward(
        self, image_embeddings: torch.Tensor, prototypes: torch.Tensor, class_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embeddings: (B, d, h, w) SAM image embeddings.
            prototypes: (C, d) class prototypes.
            class_ids: (B,) prompted class of each sample, 1..C.

        Returns:
            dense prompt embeddings (B, d, h, w) and sparse prompt embeddings (B, C*n, d).
        """
        batch, dim, height, width = image_embeddings.shape
        if (height, width) != self.grid_size:
            raise ValueError(
                f"image embeddings on a {height}x{width} grid, but the prompt encoder was built for "
                f"{self.grid_size[0]}x{self.grid_size[1]} (grid_size in the config)"
            )
        features = image_embeddings.flatten(2).transpose(1, 2)  # (B, h*w, d)
        similarity = torch.einsum("bpd,cd->bcp", features, prototypes).unsqueeze(-1)  # (B, C, h*w, 1)
        activated = features.unsqueeze(1) * (1.0 + similarity)  # F + F * S_k, (B, C, h*w, d)

        class_index = class_ids.long() - 1
        prompted = activated[torch.arange(batch, device=activated.device), class_index]  # (B, h*w, d)
        dense = prompted.transpose(1, 2).reshape(batch, dim, height, width)
        dense = self.dense_fc_2(self.relu(self.dense_fc_1(dense)))

        tokens = activated.reshape(batch * self.num_classes, height * width, dim)
        tokens = self.sparse_fc_2(self.relu(self.sparse_fc_1(tokens)))  # (B*C, n, d)
        tokens = tokens.reshape(batch, self.num_classes, self.num_tokens, dim)
        is_prompted = nn.functional.one_hot(class_index, self.num_classes).to(tokens.dtype)[..., None, None]
        positive = self.pn_cls_embeddings[1].weight.detach()
        negative = self.pn_cls_embeddings[0].weight.detach()
        tokens = tokens + is_prompted * positive + (1.0 - is_prompted) * negative
        return dense, tokens.reshape(batch, self.num_classes * self.num_tokens, dim)
