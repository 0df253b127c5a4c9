"""Distillation-SAM: the frozen SAM with a PVT adapter and a class head, taught by SAM's own prompts; its loss,
inferer, batches, frame and tap-cache datasets and input checks."""
