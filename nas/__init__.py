"""nas: latency-constrained neural architecture and hyperparameter search for image classifiers."""

__version__ = "0.1.0"
