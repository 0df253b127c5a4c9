"""Data: dataset layout, demo data, augmentation versions, the embedding cache."""
