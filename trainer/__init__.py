"""Training: Petastorm loaders, the ResNet-18, the training loop and tuning (not built yet)."""
