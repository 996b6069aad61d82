"""dissect_dist: the training package (config, data, model, selection, loss, trainer)."""
