"""nmm: a Kubernetes-native MLOps platform for native multimodal models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nmm-platform")  # the one place it is written: pyproject.toml
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"
