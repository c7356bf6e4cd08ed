"""Data: datasets on disk, the synthetic world, the prepared image cache, augmentation, the input pipeline."""
