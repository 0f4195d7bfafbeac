"""Serving: load a trained model folder and caption or draw with it (MLflow pyfunc flavor)."""
