"""Small end-to-end example tasks (data, model, training, metrics) for exercising compression."""
