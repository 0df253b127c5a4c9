"""A per-pixel classifier: one 1x1 convolution over the frame's colours."""

import torch


class PixelClassifier(torch.nn.Module):
    """Scores every pixel of an RGB frame for ``num_classes`` classes from its colour alone.

    Args:
        num_classes: output channels (background included).
    """

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, num_classes, kernel_size=1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, X, Y) colours in 0..255 -> (B, num_classes, X, Y) logits."""
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"PixelClassifier takes (B, 3, X, Y) RGB frames, not {tuple(frames.shape)}")
        return self.conv(frames.float() / 255.0)
