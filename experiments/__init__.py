"""Experiment grids (``unisrec experiment CONFIG``): pretraining and fine-tuning cells run as
Ray tasks under one MLflow parent run, with tables and figures of the results."""
