"""nmm: a Kubernetes-native MLOps platform for native multimodal models."""

__version__ = "0.1.0"
