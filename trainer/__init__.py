"""Training: loaders (data.py), augmentation (augment.py), ResNet-18 and its heads (model.py), the model bundle
(bundle.py), schedules, the loop (train.py), Optuna tuning (tune.py), MLflow tracking (tracking.py)."""
