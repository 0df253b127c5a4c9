"""The original SurgicalSAM's training and inference operations, on this bundle's weights: the reference of
the benchmark (:mod:`scripts.measurement.benchmark`), fed and computed as the original code does.

- The data loader hands the decoder's input as the cache stores it, channels-last: (B, h, w, d) per batch
  (each ``.npy`` is (h, w, d)); the prompt encoder reads it flattened to (B, h*w, d) (a view) and the mask
  decoder gets the permuted view (1, d, h, w) of one sample per call.
- The masks arrive as 0/255 uint8 (B, H, W) and are divided by 255 inside the step.
- The prompt encoder stacks the features once per class and clones the class-activated tensor for the
  sparse path; the decoder runs once per sample, each followed by its own postprocess.
- Dice is MMSegmentation's V-Net form (sigmoid, then per-sample sums); the contrastive loss is
  pytorch-metric-learning's ``NTXentLoss`` as that library computes it: cosine similarities of every
  (prototype, sample) pair, the positive pairs against a (positive pairs x negative pairs) table of
  negatives that share the anchor, a per-pair maximum subtracted, a tiny value added inside the log, the
  mean over positive pairs.
"""

from __future__ import annotations

import torch

from ..sam.geometry import resize_by_interpolation
from ..surgical_sam.network import SurgicalSAM

__all__ = [
    "original_batch",
    "original_dice_loss",
    "original_forward",
    "original_inference",
    "original_merge",
    "original_ntxent_loss",
    "original_prompt_encoder",
    "original_training_step",
]


def original_batch(embeddings: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as the original's data loader hands it to the step (data preparation, not timed).

    Args:
        embeddings: (B, d, h, w) image embeddings; masks: (B, 1, H, W) in {0, 1}.

    Returns:
        channels-last embeddings (B, h, w, d), contiguous, and the masks (B, H, W) as 0/255 uint8.
    """
    return embeddings.permute(0, 2, 3, 1).contiguous(), (masks[:, 0] * 255).to(torch.uint8)


def original_prompt_encoder(encoder, features: torch.Tensor, prototypes: torch.Tensor, class_ids: torch.Tensor):
    """The original SurgicalSAM's prototype-based prompt encoder, operation for operation, on this bundle's
    weights (``PrototypePromptEncoder``): the features stacked once per class, the class-activated tensor
    (B, C, h*w, d) and its clone for the sparse path, the prompted class picked with a one-hot mask.

    Args:
        encoder: a ``PrototypePromptEncoder`` (its weights only are used).
        features: (B, h*w, d) flattened image embeddings; prototypes: (C, d); class_ids: (B,) in 1..C.

    Returns:
        dense (B, d, h, w) and sparse (B, C*n, d) prompt embeddings.
    """
    height, width = encoder.grid_size
    num_classes = encoder.num_classes
    class_prompts = torch.stack([prototypes.unsqueeze(-1) for _ in range(features.shape[0])], dim=0)  # (B, C, d, 1)
    features = torch.stack([features for _ in range(num_classes)], dim=1)  # (B, C, h*w, d)
    similarity = torch.matmul(features, class_prompts)  # (B, C, h*w, 1)
    features = features + features * similarity
    features_sparse = features.clone()
    one_hot = torch.nn.functional.one_hot(class_ids - 1, num_classes)
    prompted = features[one_hot == 1]  # (B, h*w, d)
    prompted = prompted.reshape(-1, height, width, prompted.shape[-1]).permute(0, 3, 1, 2)
    dense = encoder.dense_fc_2(encoder.relu(encoder.dense_fc_1(prompted)))
    features_sparse = features_sparse.reshape(-1, height * width, features_sparse.shape[-1])
    sparse = encoder.sparse_fc_2(encoder.relu(encoder.sparse_fc_1(features_sparse)))
    sparse = sparse.reshape(-1, num_classes, *sparse.shape[1:])
    positive = encoder.pn_cls_embeddings[1].weight.unsqueeze(0).unsqueeze(0) * one_hot.unsqueeze(-1).unsqueeze(-1)
    negative = encoder.pn_cls_embeddings[0].weight.unsqueeze(0).unsqueeze(0) * (1 - one_hot).unsqueeze(-1).unsqueeze(-1)
    sparse = sparse + positive.detach() + negative.detach()
    return dense, sparse.reshape(sparse.shape[0], -1, sparse.shape[-1])


def original_forward(model: SurgicalSAM, embeddings: torch.Tensor, class_ids: torch.Tensor) -> tuple:
    """The original's forward: prompts for the batch, then per sample one decoder call and one postprocess.

    Args:
        embeddings: channels-last (B, h, w, d), as the original's data loader hands them.
        class_ids: (B,) in 1..C.

    Returns:
        logits (B, H, W) at frame size, the quality (B,) and the prototypes (C, d).
    """
    prototypes = model.prototypes()
    batch, height, width, channels = embeddings.shape
    features = embeddings.reshape(batch, height * width, channels)  # b h w c -> b (h w) c: a view
    dense, sparse = original_prompt_encoder(model.class_prompt_encoder, features, prototypes, class_ids)
    channels_first = features.reshape(batch, height, width, channels).permute(0, 3, 1, 2)  # a strided view
    logits, quality = [], []
    for dense_one, sparse_one, features_one in zip(dense.unsqueeze(1), sparse.unsqueeze(1), channels_first):
        low_res, quality_one = model.mask_decoder(
            image_embeddings=features_one.unsqueeze(0),
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse_one,
            dense_prompt_embeddings=dense_one,
            multimask_output=False,
        )
        logits.append(resize_by_interpolation(low_res, model.image_size, model.frame_size))
        quality.append(quality_one)
    return torch.cat(logits).squeeze(1), torch.cat(quality).squeeze(1), prototypes


def original_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """The original's Dice (MMSegmentation's V-Net form): p = sigmoid(logits), per sample
    d = 2 sum(p t) / ((sum p^2 + eps) + (sum t^2 + eps)); 1 - d, mean over the batch.

    Args:
        logits: (B, H, W); target: (B, H, W) in [0, 1].
    """
    prediction = logits.sigmoid().flatten(1)
    target = target.flatten(1).float()
    overlap = torch.sum(prediction * target, 1)
    prediction_power = torch.sum(prediction * prediction, 1) + eps
    target_power = torch.sum(target * target, 1) + eps
    return (1 - (2 * overlap) / (prediction_power + target_power)).mean()


def original_ntxent_loss(
    prototypes: torch.Tensor, class_embeddings: torch.Tensor, class_ids: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """The original's contrastive loss as pytorch-metric-learning's ``NTXentLoss`` computes it, with the
    prototypes (labels 1..C) as anchors and the samples' class embeddings (labels ``class_ids``) as
    references: for each positive (prototype c, sample b of class c) pair,
    -log(exp(s/t) / (exp(s/t) + sum over samples b' of another class of exp(s(c, b')/t)) + tiny),
    mean over the positive pairs; 0 (in the graph) when there is no positive or no negative pair.

    Args:
        prototypes: (C, d); class_embeddings: (B, d); class_ids: (B,) in 1..C.
    """
    similarity = (
        torch.nn.functional.normalize(prototypes, dim=1) @ torch.nn.functional.normalize(class_embeddings, dim=1).t()
    )  # (C, B)
    anchor_labels = torch.arange(1, prototypes.shape[0] + 1, device=prototypes.device)
    same = anchor_labels[:, None] == class_ids[None, :]
    positive_anchor, positive_ref = torch.where(same)
    negative_anchor, negative_ref = torch.where(~same)
    if len(positive_anchor) == 0 or len(negative_anchor) == 0:
        return similarity.sum() * 0
    dtype = similarity.dtype
    positive = similarity[positive_anchor, positive_ref].unsqueeze(1) / temperature  # (P, 1)
    negative = similarity[negative_anchor, negative_ref] / temperature  # (N,)
    shares_anchor = (negative_anchor.unsqueeze(0) == positive_anchor.unsqueeze(1)).to(dtype)  # (P, N)
    negative = negative * shares_anchor
    negative[shares_anchor == 0] = torch.finfo(dtype).min
    largest = torch.max(positive, torch.max(negative, dim=1, keepdim=True)[0]).detach()
    numerator = torch.exp(positive - largest).squeeze(1)
    denominator = torch.sum(torch.exp(negative - largest), dim=1) + numerator
    return (-torch.log(numerator / denominator + torch.finfo(dtype).tiny)).mean()


def original_training_step(model, optimizer, embeddings, masks, class_ids, class_embeddings) -> float:
    """One training step of the original, in its order: forward, NTXent, Dice of the masks / 255, their sum,
    zero_grad, backward, Adam step; -> the loss.

    Args:
        embeddings: channels-last (B, h, w, d); masks: 0/255 uint8 (B, H, W) (:func:`original_batch`);
        class_ids: (B,) in 1..C; class_embeddings: (B, d), loaded with the samples as the original does.
    """
    logits, _quality, prototypes = original_forward(model, embeddings, class_ids)
    contrastive = original_ntxent_loss(prototypes, class_embeddings, class_ids)
    loss = original_dice_loss(logits, masks / 255) + contrastive
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def original_merge(masks: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """The original's label map of one frame: each prompted class's mask (logit > 0) painted in class order."""
    label_map = torch.zeros(masks.shape[-2:], dtype=torch.long, device=masks.device)
    for mask, class_id in zip(masks, class_ids):
        label_map[mask] = class_id
    return label_map


def original_inference(model: SurgicalSAM, embeddings: torch.Tensor, pairs_per_batch: int) -> torch.Tensor:
    """The original's automatic inference: every (frame, class) pair through :func:`original_forward`
    in batches, then the label map of each frame.

    Args:
        embeddings: channels-last (B, h, w, d).

    Returns:
        (B, H, W) long.
    """
    frames, classes = torch.meshgrid(
        torch.arange(embeddings.shape[0]), torch.arange(1, model.num_classes + 1), indexing="ij"
    )
    frames, classes = frames.reshape(-1), classes.reshape(-1)
    masks = []
    for start in range(0, frames.numel(), pairs_per_batch):
        batch = slice(start, start + pairs_per_batch)
        logits, _quality, _ = original_forward(model, embeddings[frames[batch]], classes[batch].to(embeddings.device))
        masks.append(logits > 0)
    masks = torch.cat(masks).reshape(embeddings.shape[0], model.num_classes, *masks[0].shape[-2:])
    class_ids = torch.arange(1, model.num_classes + 1)
    return torch.stack([original_merge(frame_masks, class_ids) for frame_masks in masks])
