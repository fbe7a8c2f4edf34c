"""The search machine's side of ``latency.target=http://host:port``: ONNX files sent to a latency agent on the
deployment device (:mod:`nas.latency.agent`), with the same interface as a local measuring process."""

from __future__ import annotations

import base64
import http.client
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nas.errors import NasError
from nas.latency.agent import TOKEN_ENV
from nas.latency.measuring_process import MeasuringFailed

TRIES = 4  # an agent that does not answer is asked again after 0.5, 1 and 2 s
BACKOFF_S = 0.5
CONNECT_S = 10.0
TIMEOUT_S = 900.0  # one answer: the agent may be timing another search's network first


def check_target(target: str) -> str:
    """``latency.target``: local, or the agent's http(s)://host:port."""
    parts = urlsplit(target)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise NasError(f"latency.target={target!r} is not local or http://HOST:PORT (a latency agent's address)")
    return target.rstrip("/")


class RemoteMeasurer:
    """An agent asked for one runtime configuration: ``described`` and :meth:`sampler`, as MeasuringProcess."""

    def __init__(self, url: str, runtime: str, options: dict[str, Any]) -> None:
        self.url, self.runtime, self.options = check_target(url), runtime, options
        self._token = os.environ.get(TOKEN_ENV, "")
        if not self._token:
            raise NasError(f"latency.target={self.url} needs {TOKEN_ENV} set to the agent's token")
        try:
            self.described = self._call("/v1/describe", {"runtime": runtime, "options": options})
        except MeasuringFailed as exc:
            raise NasError(f"latency.target: {exc}") from None

    def _once(self, path: str, data: bytes | None) -> tuple[int, bytes]:
        parts = urlsplit(self.url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = kind(parts.hostname, parts.port, timeout=CONNECT_S)  # a host that drops packets: fail soon
        try:
            connection.connect()
            connection.sock.settimeout(TIMEOUT_S)  # then wait for the agent, which may be timing another network
            connection.request("GET" if data is None else "POST", path, body=data,
                               headers={"Authorization": f"Bearer {self._token}",
                                        "Content-Type": "application/json"})  # fmt: skip
            answer = connection.getresponse()
            return answer.status, answer.read()
        finally:
            connection.close()

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        reason = ""
        for attempt in range(TRIES):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                status, text = self._once(path, data)
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out: it may be back
                reason = str(exc) or type(exc).__name__
                continue
            if status != 200:
                raise MeasuringFailed(self._refusal(status, text))
            return json.loads(text)
        raise MeasuringFailed(
            f"the latency agent at {self.url} does not answer ({reason}, {TRIES} tries); start it on the device "
            "with python -m nas.latency agent, or check the tunnel"
        )

    def _refusal(self, status: int, text: bytes) -> str:
        try:
            error = json.loads(text).get("error", "")
        except (ValueError, AttributeError):
            error = text[:200].decode(errors="replace")
        if status == 401:
            return f"the latency agent at {self.url} refused the token: set {TOKEN_ENV} to the agent's token"
        if status == 422:  # the runtime's own refusal of this network
            return str(error)
        return f"the latency agent at {self.url} answered {status}: {error}"

    def status(self) -> dict[str, Any]:
        return self._call("/v1/status")

    def sampler(self, path: Path, input_shape: tuple[int, ...], threads: int, warmup: int, repeats: int,
                max_cv: float = 0.0, attempts: int = 1) -> Callable[[], list[float]]:  # fmt: skip
        """One request measures the file until steady on the device; the takes are handed out one a call."""
        body = {"runtime": self.runtime, "options": self.options, "shape": list(input_shape), "threads": threads,
                "warmup": warmup, "repeats": repeats, "max_cv": max_cv, "attempts": attempts,
                "onnx": base64.b64encode(Path(path).read_bytes()).decode()}  # fmt: skip
        pending = list(self._call("/v1/measure", body)["takes"])  # the file is measured now, while it exists

        def take() -> list[float]:
            if not pending:
                pending.extend(self._call("/v1/measure", {**body, "attempts": 1})["takes"])
            return pending.pop(0)

        return take
