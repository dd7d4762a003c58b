"""A `pymoi serve` subprocess on a loopback port and raw HTTP helpers, for the server tests."""

from __future__ import annotations

import http.client
import json
import pathlib
import re
import subprocess
import sys
import time
from typing import Any, Iterator, Optional

PYMOI = pathlib.Path(sys.executable).with_name("pymoi")
API_KEY = "sk-test-4b1d"
SERVING = re.compile(r"serving '([^']+)' at (http://[^\s]+)/v1")


class Server:
    def __init__(self, process: subprocess.Popen, out: pathlib.Path, err: pathlib.Path) -> None:
        self.process, self.out, self.err = process, out, err
        deadline = time.monotonic() + 120
        while (match := SERVING.search(out.read_text())) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"pymoi serve did not start:\n{out.read_text()}\n{err.read_text()}")
            time.sleep(0.1)
        self.alias, self.url = match.group(1), match.group(2)
        self.host, port = self.url.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def start_server(tmp_path: pathlib.Path, *args: str, env: Optional[dict[str, str]] = None) -> Server:
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen([str(PYMOI), "serve", *args], stdout=stdout, stderr=stderr, env=env)
    return Server(process, out, err)


def post(server: Server, path: str, body: Any, *, key: Optional[str] = API_KEY) -> tuple[int, Any]:
    """A raw HTTP POST; returns the status and the decoded JSON body."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=120)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    connection.request("POST", path, body=body if isinstance(body, str) else json.dumps(body), headers=headers)
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    return response.status, payload


def stream_events(server: Server, path: str, body: dict[str, Any]) -> list[Any]:
    """A raw streaming POST: every `data:` payload, checked to be JSON or the final [DONE]."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=120)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    connection.request("POST", path, body=json.dumps({**body, "stream": True}), headers=headers)
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("content-type", "").startswith("text/event-stream")
    events: list[Any] = []
    for raw in response.read().decode().splitlines():
        if raw.startswith("data: "):
            data = raw.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert raw == "" or raw.startswith(":"), f"not a server-sent event line: {raw!r}"
    connection.close()
    return events


def health(server: Server) -> dict[str, Any]:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    connection.request("GET", "/health")
    payload = json.loads(connection.getresponse().read())
    connection.close()
    return payload


def wait_until_settled(server: Server) -> dict[str, Any]:
    """Waits until the server has settled every finished reply (see Engine); returns its health."""
    deadline = time.monotonic() + 60
    while (state := health(server))["settling"]:
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    return state


def served(folder: pathlib.Path, model: str, ctx: int, parallel: int) -> Iterator[Server]:
    """A server of `model` with the test key, for a fixture to yield from; stopped afterwards."""
    running = start_server(
        folder, model, "--port", "0", "--ctx", str(ctx), "--parallel", str(parallel), "--threads", "2", "--api-key", API_KEY
    )
    yield running
    running.stop()
