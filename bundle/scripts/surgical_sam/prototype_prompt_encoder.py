"""SurgicalSAM's prototype bank and prototype-based class prompt encoder.

Steps 1-4 of the SurgicalSAM paper's Methodology, as the original code computes them.

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

    def class_activation(self, image_embeddings: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Steps 1-2's per-position scale: F_k = F + F * S_k = F * (1 + S_k).

        Args:
            image_embeddings: (B, d, h, w) SAM image embeddings.
            prototypes: (C, d) class prototypes.

        Returns:
            scale (B, C, h*w): 1 + S_k at every position.
        """
        batch, _dim, height, width = image_embeddings.shape
        if (height, width) != self.grid_size:
            raise ValueError(
                f"image embeddings on a {height}x{width} grid, but the prompt encoder was built for "
                f"{self.grid_size[0]}x{self.grid_size[1]} (grid_size in the config)"
            )
        features = image_embeddings.flatten(2)  # (B, d, h*w)
        return 1.0 + torch.einsum("bdp,cd->bcp", features, prototypes)

    def dense_prompt(self, image_embeddings: torch.Tensor, prompted_scale: torch.Tensor) -> torch.Tensor:
        """Step 3 from the prompted class's scale: F_c = F * (1 + S_c), (B, d, h, w) -> dense (B, d, h, w).

        Args:
            image_embeddings: (B, d, h, w).
            prompted_scale: (B, h*w), 1 + S_c of each sample's prompted class.
        """
        activated = image_embeddings * prompted_scale.view(prompted_scale.shape[0], 1, *self.grid_size)
        return self.dense_fc_2(self.relu(self.dense_fc_1(activated)))

    def class_tokens(self, image_embeddings: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Step 4 before the positive/negative embeddings: the n tokens of every class, (B, C, n, d).

        ``sparse_fc_1`` is linear over the h*w positions, so on F_k = diag(1 + S_k) F it equals
        ``(W1 * (1 + S_k)) @ F + b1`` (:class:`ScaledPositionMix`): the (B, C, h*w, d) class-activated
        tensor is never formed. The frame's tokens are the same for every class prompted on it.

        Args:
            image_embeddings: (B, d, h, w).
            scale: (B, C, h*w) from :meth:`class_activation`.
        """
        batch, dim = image_embeddings.shape[:2]
        features = image_embeddings.flatten(2).transpose(1, 2)  # (B, h*w, d)
        weight = self.sparse_fc_1.weight[:, :, 0]  # (hidden, h*w)
        if torch.jit.is_tracing():  # TorchScript export cannot hold an autograd.Function: the same products, batched
            mixed = weight.unsqueeze(0).unsqueeze(0) * scale.unsqueeze(2)  # (B, C, hidden, h*w)
            hidden = mixed @ features.unsqueeze(1) + self.sparse_fc_1.bias.view(1, 1, -1, 1)
        else:
            hidden = ScaledPositionMix.apply(features, scale, weight, self.sparse_fc_1.bias)  # (B, C, hidden, d)
        hidden = self.relu(hidden).reshape(batch * self.num_classes, -1, dim)
        tokens = self.sparse_fc_2(hidden)  # (B*C, n, d)
        return tokens.reshape(batch, self.num_classes, self.num_tokens, dim)

    def add_class_embeddings(self, tokens: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
        """Step 4's end: positive embedding on the prompted class's tokens, negative on the others.

        Args:
            tokens: (B, C, n, d) from :meth:`class_tokens`.
            class_index: (B,) prompted class, 0-based.

        Returns:
            sparse prompt embeddings (B, C*n, d).
        """
        batch, _classes, _n, dim = tokens.shape
        is_prompted = nn.functional.one_hot(class_index, self.num_classes).to(tokens.dtype)[..., None, None]
        positive = self.pn_cls_embeddings[1].weight.detach()
        negative = self.pn_cls_embeddings[0].weight.detach()
        tokens = tokens + is_prompted * positive + (1.0 - is_prompted) * negative
        return tokens.reshape(batch, self.num_classes * self.num_tokens, dim)

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
        scale = self.class_activation(image_embeddings, prototypes)  # (B, C, h*w)
        class_index = class_ids.long() - 1
        prompted_scale = scale.gather(1, class_index.view(-1, 1, 1).expand(-1, 1, scale.shape[2]))[:, 0]
        dense = self.dense_prompt(image_embeddings, prompted_scale)
        sparse = self.add_class_embeddings(self.class_tokens(image_embeddings, scale), class_index)
        return dense, sparse

    def frame_prompts(
        self, image_embeddings: torch.Tensor, prototypes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What every class prompted on a frame shares: the scales (B, C, h*w) and class tokens (B, C, n, d).

        :meth:`pair_prompts` then makes the prompts of any (frame, class) pairs from them; together
        they give :meth:`forward`'s numbers with the sparse MLP run once per frame, not once per pair.
        """
        scale = self.class_activation(image_embeddings, prototypes)
        return scale, self.class_tokens(image_embeddings, scale)

    def pair_prompts(
        self, image_embeddings: torch.Tensor, scale: torch.Tensor, tokens: torch.Tensor, class_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts of P (frame, class) pairs from :meth:`frame_prompts` already gathered per pair.

        Args:
            image_embeddings: (P, d, h, w), each pair's frame.
            scale: (P, C, h*w) and tokens: (P, C, n, d), each pair's frame's.
            class_index: (P,) prompted class, 0-based.

        Returns:
            dense (P, d, h, w) and sparse (P, C*n, d) prompt embeddings.
        """
        prompted_scale = scale.gather(1, class_index.view(-1, 1, 1).expand(-1, 1, scale.shape[2]))[:, 0]
        return self.dense_prompt(image_embeddings, prompted_scale), self.add_class_embeddings(tokens, class_index)


class ScaledPositionMix(torch.autograd.Function):
    """``sparse_fc_1`` on the class-activated features without forming them.

    For each sample b and class k: ``out[b, k] = W @ diag(s[b, k]) @ F[b] + bias = (W * s[b, k]) @ F[b] + bias``
    with W (O, P) the Conv1d's weight over the P = h*w positions, s = 1 + S_k (B, C, P) and F (B, P, d).
    This is the Conv1d (kernel 1) on F_k (B*C, P, d), summed in another order. Forward and backward go
    sample by sample and recompute ``W * s[b]`` (C, O, P) in the backward, so nothing of size
    B x C x P x d or B x C x O x P is kept; the saved tensors are the inputs. Once-differentiable.

    Inputs: features (B, P, d), scale (B, C, P), weight (O, P), bias (O,) or None. Output (B, C, O, d).
    """

    @staticmethod
    def forward(ctx, features, scale, weight, bias):
        # under autocast the products run in its dtype (the Function's inside is not autocast)
        device_type = features.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else features.dtype
        ctx.dtypes = (features.dtype, scale.dtype, weight.dtype, None if bias is None else bias.dtype)
        # contiguous: a permuted scale (an einsum's output) would make every W * s[b] a strided copy
        # plain tensors: a tensor subclass (MONAI's MetaTensor) has its own new_empty/out= rules
        features, scale, weight = (
            t.as_subclass(torch.Tensor).to(dtype).contiguous() for t in (features, scale, weight)
        )
        bias = None if bias is None else bias.as_subclass(torch.Tensor).to(dtype)
        with torch.autocast(device_type, enabled=False):
            return ScaledPositionMix._forward(ctx, features, scale, weight, bias)

    @staticmethod
    def _forward(ctx, features, scale, weight, bias):
        batch, positions, dim = features.shape
        classes, hidden = scale.shape[1], weight.shape[0]
        out = torch.empty((batch, classes * hidden, dim), dtype=features.dtype, device=features.device)
        for b in range(batch):
            mixed = (weight.unsqueeze(0) * scale[b].unsqueeze(1)).reshape(classes * hidden, positions)
            torch.matmul(mixed, features[b], out=out[b])
        out = out.view(batch, classes, hidden, dim)
        if bias is not None:
            out += bias.view(1, 1, hidden, 1)
        ctx.save_for_backward(features, scale, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            grads = ScaledPositionMix._backward(ctx, grad_out)
        return tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))

    @staticmethod
    def _backward(ctx, grad_out):
        features, scale, weight = ctx.saved_tensors
        grad_out = grad_out.to(features.dtype)
        batch, positions, dim = features.shape
        classes, hidden = scale.shape[1], weight.shape[0]
        need_features, need_scale, need_weight, need_bias = ctx.needs_input_grad
        grad_out = grad_out.reshape(batch, classes * hidden, dim)
        grad_features = torch.empty_like(features) if need_features else None
        grad_scale = torch.empty_like(scale) if need_scale else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        for b in range(batch):
            if need_features:
                mixed = (weight.unsqueeze(0) * scale[b].unsqueeze(1)).reshape(classes * hidden, positions)
                torch.matmul(mixed.t(), grad_out[b], out=grad_features[b])
            if need_scale or need_weight:
                grad_mixed = (grad_out[b] @ features[b].t()).view(classes, hidden, positions)  # (C, O, P)
                # elementwise products and sums (an einsum here becomes h*w tiny batched products)
                if need_scale:
                    torch.sum(grad_mixed * weight.unsqueeze(0), dim=1, out=grad_scale[b])
                if need_weight:
                    grad_weight += (grad_mixed * scale[b].unsqueeze(1)).sum(0)
        grad_bias = grad_out.sum(dim=(0, 2)).view(classes, hidden).sum(0) if (need_bias and ctx.has_bias) else None
        return grad_features, grad_scale, grad_weight, grad_bias
