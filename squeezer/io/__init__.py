"""Reading and writing: user models and weights, calibration files, checkpoints."""
