"""Storage and tracking URLs as they may be shown: the password replaced, everything else kept."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def mask_url(url: str) -> str:
    """``postgresql://nas:s3cret@db/optuna`` -> ``postgresql://nas:***@db/optuna`` (any scheme, e.g. an
    MLflow server ``http://user:pw@host:5000``), for output, logs, files and MLflow params."""
    if "@" not in url:
        return url
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    except ValueError:  # not a URL after all: hide everything after the scheme
        return url.split("://", 1)[0] + "://***"
