"""``python -m nas.latency agent``: the deployment device's own latency, for a search that runs elsewhere.

Runs on the target (a board, a laptop, an inference server) with nothing but the standard library, numpy and
the runtime it measures with: it receives an ONNX file (a format that runs no code when loaded; a pickle or a
``torch.save`` file is refused before any runtime sees it), times it in that runtime in a measuring process of
its own (:mod:`nas.latency.measuring_process`: a network that crashes the runtime does not take the agent
down), and answers the samples with the device's identity. One network is timed at a time, whoever asks, so
two searches never time networks beside each other on the device.

Every request carries ``Authorization: Bearer $NAS_AGENT_TOKEN`` (compared in constant time); the agent
listens on 127.0.0.1 unless told otherwise (reach it through ``ssh -L`` or ``adb forward``).

    GET  /v1/status    -> {"protocol", "host", "cpu", "measured"}
    POST /v1/describe  {"runtime", "options"} -> {"version", "available", "host", "cpu"}
    POST /v1/measure   {"runtime", "options", "shape", "threads", "warmup", "repeats", "max_cv", "attempts",
                        "onnx": base64} -> {"takes": [[ms, ...], ...], "measured"}
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import os
import socket
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from nas.latency.measuring_process import MeasuringFailed, RuntimeNotInstalled, measuring_process
from nas.latency.sessions import SESSIONS, cpu_name, takes_until_steady

PROTOCOL = 1
TOKEN_ENV = "NAS_AGENT_TOKEN"
DEFAULT_PORT = 8765
MAX_ATTEMPTS = 10
ONNX_FIRST_BYTE = b"\x08"  # a serialised ModelProto starts with field 1, ir_version (a varint)


class Refusal(Exception):
    """A request the agent answers with an HTTP error; the message says what was wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Agent:
    """What the HTTP handler asks: the device's identity, and one measurement at a time."""

    def __init__(self, token: str, max_model_bytes: int) -> None:
        self.token, self.max_model_bytes = token, max_model_bytes
        self.measured = 0
        self.host, self.cpu = socket.gethostname(), cpu_name()
        self._one_at_a_time = threading.Lock()

    def status(self) -> dict[str, Any]:
        return {"protocol": PROTOCOL, "host": self.host, "cpu": self.cpu, "measured": self.measured}

    @staticmethod
    def _runtime(request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        runtime, options = request.get("runtime"), request.get("options", {})
        if runtime not in SESSIONS:
            raise Refusal(400, f"this agent measures in {', '.join(SESSIONS)}, not {runtime!r}")
        if not isinstance(options, dict):
            raise Refusal(400, "options must be an object")
        return runtime, options

    def describe(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime, options = self._runtime(request)
        try:
            process = measuring_process(runtime, options)
        except RuntimeNotInstalled as exc:
            raise Refusal(400, f"{runtime} is not installed on the agent's device ({exc})") from None
        return {**process.described, "host": self.host, "cpu": self.cpu}

    def measure(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime, options = self._runtime(request)
        try:
            model = base64.b64decode(request["onnx"], validate=True)
            shape = [int(d) for d in request["shape"]]
            threads, warmup, repeats = int(request["threads"]), int(request["warmup"]), int(request["repeats"])
            max_cv, attempts = float(request["max_cv"]), min(int(request["attempts"]), MAX_ATTEMPTS)
        except (KeyError, TypeError, ValueError) as exc:
            raise Refusal(400, f"a measure request needs onnx, shape, threads, warmup, repeats, max_cv, attempts "
                               f"({type(exc).__name__}: {exc})") from None  # fmt: skip
        if not model.startswith(ONNX_FIRST_BYTE):
            raise Refusal(415, "the model is not an ONNX file (the agent loads ONNX only, never a pickle)")
        if len(model) > self.max_model_bytes:
            raise Refusal(413, f"the model is {len(model)} bytes, over this agent's limit of {self.max_model_bytes}")
        describe = self.describe(request)  # the runtime's process, started (or refused) before the queue
        with self._one_at_a_time, tempfile.TemporaryDirectory(prefix="nas-agent-") as tmp:
            path = Path(tmp) / "model.onnx"  # the suffix makes OpenVINO read it with its ONNX front end
            path.write_bytes(model)
            try:
                take = measuring_process(runtime, options).sampler(path, tuple(shape), threads, warmup, repeats)
                takes = takes_until_steady(take, max_cv, max(1, attempts))
            except MeasuringFailed as exc:
                raise Refusal(422, str(exc)) from None
            self.measured += 1
            return {"takes": takes, "measured": self.measured, "version": describe["version"]}


def _handler(agent: Agent) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 60  # a client that stops sending mid-request frees its thread

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write(f"agent: {self.address_string()} {format % args}\n")

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            given = self.headers.get("Authorization", "").removeprefix("Bearer ").encode()
            if hmac.compare_digest(given, agent.token.encode()):
                return True
            self.close_connection = True
            self._send(401, {"error": f"missing or wrong token (Authorization: Bearer ${TOKEN_ENV})"})
            return False

        def do_GET(self) -> None:
            if not self._authorised():
                return
            if self.path == "/v1/status":
                self._send(200, agent.status())
            else:
                self._send(404, {"error": f"no such endpoint {self.path}"})

        def do_POST(self) -> None:
            if not self._authorised():
                return
            length = int(self.headers.get("Content-Length") or 0)
            limit = agent.max_model_bytes * 4 // 3 + 65536  # the model in base64, and the settings
            if length > limit:
                self.close_connection = True  # the body is never read
                self._send(413, {"error": f"request of {length} bytes is over this agent's limit of {limit}"})
                return
            routes = {"/v1/describe": agent.describe, "/v1/measure": agent.measure}
            try:
                if self.path not in routes:
                    raise Refusal(404, f"no such endpoint {self.path}")
                try:
                    request = json.loads(self.rfile.read(length))
                except ValueError as exc:
                    raise Refusal(400, f"the request is not JSON ({exc})") from None
                if not isinstance(request, dict):
                    raise Refusal(400, "the request must be a JSON object")
                self._send(200, routes[self.path](request))
            except Refusal as exc:
                self._send(exc.status, {"error": str(exc)})
            except Exception as exc:  # a fault of the agent's own: answered, and the agent goes on
                self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

    return Handler


def serve(host: str, port: int, token: str, max_model_mb: float) -> None:
    agent = Agent(token, int(max_model_mb * 2**20))
    server = ThreadingHTTPServer((host, port), _handler(agent))
    server.daemon_threads = True
    print(f"nas latency agent on http://{host}:{server.server_address[1]} (device {agent.host}, {agent.cpu}); "
          f"token from ${TOKEN_ENV}; Ctrl-C stops it", flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("agent stopped", flush=True)
    finally:
        server.server_close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m nas.latency agent", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any)")
    parser.add_argument("--max-model-mb", type=float, default=64.0, help="largest ONNX file accepted (64)")
    args = parser.parse_args(argv)
    token = os.environ.get(TOKEN_ENV, "")
    if len(token) < 16:
        print(f"error: set {TOKEN_ENV} to a secret of 16 characters or more, the same on the search machine, "
              f"e.g. export {TOKEN_ENV}=$(python -c 'import secrets; print(secrets.token_hex(16))')",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        serve(args.host, args.port, token, args.max_model_mb)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port} ({exc.strerror}); choose another --port",
              file=sys.stderr)  # fmt: skip
        return 2
    return 0
