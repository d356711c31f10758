"""Training: loaders (data.py), ResNet-18 + model bundle (model.py), schedules, the loop (train.py); tuning next."""
