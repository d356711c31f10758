"""Training: Petastorm loaders (data.py); the ResNet-18, the training loop and tuning are not built yet."""
