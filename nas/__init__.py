"""nas: latency-constrained neural architecture and hyperparameter search for image classifiers."""

__version__ = "0.1.0"


def load(source, tracking_uri=None):
    """Load a retrained model for prediction; see :func:`nas.inference.load`."""
    from nas.inference import load as _load

    return _load(source, tracking_uri)
