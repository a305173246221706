"""Locust user for OpenAI-compatible streaming generation: TTFT, ITL, TPOT and E2E per request.

Usually run by `vllm-adaptive-loadtest` (`make loadtest`), which also writes the summary; or
directly:

    locust -f loadtest/locustfile.py --headless -u 4 -r 4 -t 30s --stop-timeout 30 \
        --host http://127.0.0.1:8000 --scenario mirostat_v2 --max-tokens 32 --fixed-output

(`--stop-timeout` lets requests in flight at the end finish instead of being cut off.)

Every user sends one streaming request after another (closed loop, no think time) and reads the
server-sent events as they arrive. Measures go into locust's own statistics through
`events.request`, so its tables, percentiles, CSVs and HTML report show them, as request types:
"POST" (whole requests: E2E latency, failures), "TTFT", "ITL" (one entry per inter-chunk gap)
and "TPOT". With --records-file each request is also written as one JSON line (the summary's
exact percentiles come from those). Definitions: vllm_adaptive/loadtest/measures.py.

Locust loads this file by path, so it imports its siblings through the installed package.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import gevent
import requests
from locust import User, constant, events, task
from locust.env import Environment
from locust.exception import StopUser

from vllm_adaptive.loadtest.measures import RequestRecord, StreamMeasurer
from vllm_adaptive.loadtest.prompts import prompt_stream
from vllm_adaptive.loadtest.request_body import RequestSettings, build_body
from vllm_adaptive.loadtest.scenarios import DEFAULT_SCENARIO, SCENARIOS, Scenario
from vllm_adaptive.loadtest.sse import Api, SSEDecoder, StreamProtocolError, parse_payload

CONNECT_TIMEOUT_S = 10.0


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("vllm-adaptive streaming generation")
    group.add_argument("--scenario", choices=list(SCENARIOS), default=DEFAULT_SCENARIO,
                       help="request scenario (vllm_adaptive/loadtest/scenarios.py)")
    group.add_argument("--api", choices=[a.value for a in Api], default=Api.COMPLETIONS.value,
                       help="completions: /v1/completions; chat: /v1/chat/completions")
    group.add_argument("--model", default="",
                       help="model name to send (default: the first one in /v1/models)")
    group.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request")
    group.add_argument("--fixed-output", action="store_true",
                       help="every request writes exactly --max-tokens (ignore_eos, min_tokens)")
    group.add_argument("--no-token-ids", action="store_true",
                       help="do not ask vLLM for return_token_ids (other OpenAI servers)")
    group.add_argument("--prompts-file", default="",
                       help="one prompt per line, or .jsonl with a \"prompt\" per line")
    group.add_argument("--prompt-seed", type=int, default=0,
                       help="seed of the synthetic prompts")
    group.add_argument("--prompt-words", type=int, default=64,
                       help="length of synthetic prompts, in words, without --prompts-file")
    group.add_argument("--max-requests", type=int, default=0,
                       help="stop the run after this many requests (0: no limit)")
    group.add_argument("--request-timeout", type=float, default=300.0,
                       help="seconds without data before a request fails")
    group.add_argument("--records-file", default="",
                       help="append one JSON line per request here")


@dataclass
class RunState:
    """What every user of this process shares during one run."""

    settings: RequestSettings
    scenario: Scenario
    prompts: Iterator[str]
    max_requests: int
    request_timeout_s: float
    records: IO[str] | None
    claimed: int = 0
    finished: int = 0
    quitting: bool = field(default=False)

    def claim(self) -> bool:
        if self.max_requests and self.claimed >= self.max_requests:
            return False
        self.claimed += 1
        return True


_state: RunState | None = None


def discover_model(base_url: str) -> str:
    response = requests.get(base_url.rstrip("/") + "/v1/models", timeout=CONNECT_TIMEOUT_S)
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model")
    return str(models[0]["id"])


@events.test_start.add_listener
def start_run(environment: Environment, **_: Any) -> None:
    global _state
    options = environment.parsed_options
    host = environment.host or ""
    settings = RequestSettings(
        api=Api(options.api),
        model=options.model or discover_model(host),
        max_tokens=options.max_tokens,
        fixed_output=options.fixed_output,
        token_ids=not options.no_token_ids,
    )
    records = None
    if options.records_file:
        # open for the whole run; closed by stop_run
        records = open(options.records_file, "a", encoding="utf-8")  # noqa: SIM115
    _state = RunState(
        settings=settings,
        scenario=SCENARIOS[options.scenario],
        prompts=prompt_stream(options.prompts_file, options.prompt_words, options.prompt_seed),
        max_requests=options.max_requests,
        request_timeout_s=options.request_timeout,
        records=records,
    )


@events.test_stop.add_listener
def stop_run(**_: Any) -> None:
    if _state is not None and _state.records is not None:
        _state.records.close()
        _state.records = None


class StreamingGenerationUser(User):
    """Sends streaming generation requests back to back and measures each from its SSE stream."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.session = requests.Session()

    def on_stop(self) -> None:
        self.session.close()

    @task
    def generate(self) -> None:
        state = _state
        if state is None or not state.claim():
            raise StopUser()
        settings = state.settings
        body = build_body(settings, state.scenario, next(state.prompts))
        expected = settings.max_tokens if settings.fixed_output else None
        record, received = self._send(body, state, expected)
        state.finished += 1
        if state.records is not None:
            state.records.write(record.to_json() + "\n")
            state.records.flush()
        report(self.environment, settings.api, record, received)
        if state.max_requests and state.finished >= state.max_requests and not state.quitting:
            state.quitting = True
            runner = self.environment.runner
            if runner is not None:
                gevent.spawn(runner.quit)  # not from this greenlet: stopping kills users

    def _send(
        self, body: dict[str, Any], state: RunState, expected: int | None
    ) -> tuple[RequestRecord, int]:
        url = (self.host or "").rstrip("/") + state.settings.api.path
        api = state.settings.api
        started_at = time.time()
        t0 = time.perf_counter()
        measurer = StreamMeasurer(started_at, expected)
        received = 0
        failure: str | None = None
        try:
            with self.session.post(
                url, json=body, stream=True,
                timeout=(CONNECT_TIMEOUT_S, state.request_timeout_s),
            ) as response:
                if response.status_code != 200:
                    failure = http_failure(response)
                else:
                    decoder = SSEDecoder()
                    # chunk_size=None: hand over each network read as it arrives
                    for raw in response.iter_content(chunk_size=None):
                        at = time.perf_counter() - t0
                        received += len(raw)
                        for payload in decoder.feed(raw):
                            measurer.observe(at, parse_payload(payload, api))
        except requests.RequestException as err:
            failure = f"{type(err).__name__}: {err}"
        except StreamProtocolError as err:
            failure = f"bad stream: {err}"
        return measurer.finish(time.perf_counter() - t0, failure), received



def http_failure(response: requests.Response) -> str:
    message = response.text[:300]
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and error.get("message"):
            message = str(error["message"])
    except (ValueError, AttributeError):
        pass
    return f"HTTP {response.status_code}: {message}"


def report(environment: Environment, api: Api, record: RequestRecord, received: int) -> None:
    """Give locust the request and, when it completed, its TTFT, ITL gaps and TPOT (ms)."""
    fire = environment.events.request.fire
    name = api.path
    fire(
        request_type="POST", name=name, response_time=record.e2e * 1000.0,
        response_length=received, exception=None if record.ok else RuntimeError(record.error),
        context={},
    )
    if not record.ok:
        return
    if record.ttft is not None:
        fire(request_type="TTFT", name=name, response_time=record.ttft * 1000.0,
             response_length=0, exception=None, context={})
    for gap in record.itl:
        fire(request_type="ITL", name=name, response_time=gap * 1000.0,
             response_length=0, exception=None, context={})
    if record.tpot is not None:
        fire(request_type="TPOT", name=name, response_time=record.tpot * 1000.0,
             response_length=record.output_tokens, exception=None, context={})
