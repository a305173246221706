"""Robustness of `vllm serve --plugin adaptive` against what clients get wrong.

A seeded generator builds well over a thousand requests with invalid, mistyped, out-of-range,
missing and conflicting adaptive arguments (`adaptive_sampler` and every parameter key of every
sampler, from the registry) and malformed bodies, plus valid requests mixed in. They go to the
real server concurrently. Every invalid one must get a 4xx whose body names the offending key
(where there is one), every valid one a 200; no 5xx, no dropped connection; and the server's
greedy answer to a fixed prompt must be the same before and after.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from vllm_adaptive.sampling.param_spec import NumberParam
from vllm_adaptive.sampling.params import SAMPLER_KEY
from vllm_adaptive.sampling.registry import PARAMS_BY_KEY, SAMPLERS
from vllm_processes import Server

pytestmark = pytest.mark.server

SEED = 19
N_REQUESTS = 1200
THREADS = 8
GREEDY_PROMPT = "The server answered the request with"
GREEDY_TOKENS = 16
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
JSON = "application/json"


@dataclasses.dataclass(frozen=True)
class Probe:
    kind: str  # what the request gets wrong ("valid" for none), for the summary
    path: str
    body: bytes
    content_type: str = JSON
    ok: bool = False  # True: must be served (200); False: must be refused with a 4xx
    # Keys that the refusal must name (any one of them); empty where no key is at fault.
    keys: tuple[str, ...] = ()
    # The refusal comes from the plugin's parser: error.param is the key, and for a bad value
    # the message gives the range and the value.
    ours: bool = False


# ---- values ------------------------------------------------------------------------------

NaN = float("nan")
Inf = float("inf")
# Strings that are not plain decimal numbers (some look like one to a lenient parser).
NOT_NUMBER_STRINGS = [
    "", " ", "true", "false", "null", "none", "nan", "NaN", "-nan", "inf", "-inf", "Infinity",
    "1e400", "-1e400", "1_0", " 0.5", "0.5 ", "0x1", "0b1", "1/2", "½", "\u0663", "0.5.1", "1e",
    "e1", "--1", "+-1", "1,5", "five", "0.5f", "[0.5]", "{}",
]
# Values that are neither a string, a number nor a flat list of those.
NOT_XARGS_VALUES: list[object] = [None, {}, {"value": 0.5}, [[0.5]], [None], [{"a": 1}], [[]]]


def out_of_range(param: NumberParam) -> list[object]:
    values: list[object] = [param.low - 1.0, -1e300, 1e300, 10**30, -(10**30), 10**400]
    if param.high < Inf:
        values += [param.high + 1.0, param.high * 10 + 1, str(param.high + 1.0)]
    if param.low_open:
        values += [param.low, str(param.low), int(param.low)]
    if param.high_open:
        values += [param.high, str(param.high)]
    values += [str(param.low - 1.0), -0.5 if param.low >= 0 else param.low - 0.5]
    return [v for v in values if not _inside(param, v)]


def _inside(param: NumberParam, value: object) -> bool:
    try:
        return param.contains(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return False


def bad_value(rng: random.Random, param: NumberParam) -> object:
    """A value `param` must refuse."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.choice([True, False])
    if kind == 1:
        return rng.choice(NOT_NUMBER_STRINGS)
    if kind == 2:
        return rng.choice([NaN, Inf, -Inf])
    if kind == 3:
        return rng.choice([[], [param.default], [True], [str(param.default)], [1, 2]])
    if kind == 4:
        return rng.choice(NOT_XARGS_VALUES)
    return rng.choice(out_of_range(param))


def good_value(rng: random.Random, param: NumberParam) -> object:
    """A value inside the range, sometimes spelled as a decimal string."""
    high = min(param.high, 1e6)
    for _ in range(100):
        value = rng.choice([param.low, high, rng.uniform(param.low, high), param.default])
        if isinstance(value, float) and param.contains(value):
            break
    else:  # pragma: no cover - every range has its default inside
        value = param.default
    if param.key == "mirostat_m" and rng.random() < 0.5:
        return int(value)  # type: ignore[arg-type]
    return repr(value) if rng.random() < 0.2 else value


def unknown_sampler_name(rng: random.Random) -> object:
    """A value for adaptive_sampler that names no sampler."""
    name = rng.choice(list(SAMPLERS))
    return rng.choice([
        name.upper(), name + " ", " " + name, name + "_v9", "", "none", "greedy", "mirostat",
        "top_k", "".join(rng.choice(string.ascii_lowercase + "_") for _ in range(rng.randint(1, 12))),
        rng.choice([0, 1, 3, -1, 2.5, 1e300, 10**400]), rng.choice([True, False]), [name], [],
        NaN, None, {"name": name}, [[name]],
    ])


# ---- requests ------------------------------------------------------------------------------


def base_body(rng: random.Random, model: str) -> tuple[str, dict[str, object]]:
    temperature = rng.choice([0.0, 0.7, 1.0, 1.3])
    if rng.random() < 0.25:
        messages = [{"role": "user", "content": rng.choice(["hi", "Hello", "2 + 2 ="])}]
        return CHAT, {"model": model, "messages": messages, "max_tokens": 1, "temperature": temperature}
    return COMPLETIONS, {"model": model, "prompt": rng.choice(["Hello", "Q:", "one two"]),
                         "max_tokens": 1, "temperature": temperature}


def encode(body: object) -> bytes:
    return json.dumps(body).encode()  # NaN and Infinity as JS literals, which vLLM parses


def probe(rng: random.Random, model: str) -> Probe:
    path, body = base_body(rng, model)
    samplers = list(SAMPLERS)
    name = rng.choice(samplers)
    own = list(SAMPLERS[name].keys())
    foreign = sorted(set(PARAMS_BY_KEY) - set(own))
    kind = rng.choices(
        ["bad_value", "foreign_key", "no_sampler", "unknown_sampler", "conflicting",
         "xargs_not_object", "malformed_body", "valid"],
        weights=[30, 10, 8, 12, 8, 5, 7, 20],
    )[0]
    xargs: dict[str, object]
    if kind == "bad_value":
        key = rng.choice(own)
        xargs = {SAMPLER_KEY: name, key: bad_value(rng, PARAMS_BY_KEY[key])}
        for other in own:  # the sampler's other parameters, valid or absent
            if other != key and rng.random() < 0.5:
                xargs[other] = good_value(rng, PARAMS_BY_KEY[other])
        return Probe(kind, path, encode({**body, "vllm_xargs": xargs}), keys=(key,), ours=True)
    if kind == "foreign_key":
        key = rng.choice(foreign)
        xargs = {SAMPLER_KEY: name, key: good_value(rng, PARAMS_BY_KEY[key])}
        return Probe(kind, path, encode({**body, "vllm_xargs": xargs}), keys=(key,), ours=True)
    if kind == "no_sampler":
        keys = rng.sample(sorted(PARAMS_BY_KEY), rng.randint(1, 3))
        xargs = {key: good_value(rng, PARAMS_BY_KEY[key]) for key in keys}
        if rng.random() < 0.3:
            xargs["some_other_processor_key"] = 1
        return Probe(kind, path, encode({**body, "vllm_xargs": xargs}), keys=tuple(keys), ours=True)
    if kind == "unknown_sampler":
        xargs = {SAMPLER_KEY: unknown_sampler_name(rng)}
        if rng.random() < 0.5:
            key = rng.choice(sorted(PARAMS_BY_KEY))
            xargs[key] = good_value(rng, PARAMS_BY_KEY[key])
        return Probe(kind, path, encode({**body, "vllm_xargs": xargs}), keys=(SAMPLER_KEY,), ours=True)
    if kind == "conflicting":
        # Several things wrong at once; the refusal names one of them.
        key = rng.choice(own)
        other = rng.choice(foreign)
        xargs = {SAMPLER_KEY: name, key: bad_value(rng, PARAMS_BY_KEY[key]),
                 other: rng.choice([True, "x", -1.0, 1e9, None])}
        return Probe(kind, path, encode({**body, "vllm_xargs": xargs}), keys=(key, other), ours=True)
    if kind == "xargs_not_object":
        value = rng.choice([[SAMPLER_KEY, name], [{SAMPLER_KEY: name}], name, 3, True, 0.5,
                            f'{{"{SAMPLER_KEY}": "{name}"}}'])
        return Probe(kind, path, encode({**body, "vllm_xargs": value}), keys=("vllm_xargs",))
    if kind == "malformed_body":
        return malformed(rng, path, body, name)
    # valid: a registered sampler with in-range values, or no adaptive arguments at all
    choice = rng.random()
    if choice < 0.15:
        return Probe("valid", path, encode({**body, "vllm_xargs": rng.choice([None, {}, {"other_key": "x"}])}), ok=True)
    xargs = {SAMPLER_KEY: name}
    for key in own:
        if rng.random() < 0.7:
            xargs[key] = good_value(rng, PARAMS_BY_KEY[key])
    return Probe("valid", path, encode({**body, "vllm_xargs": xargs}), ok=True)


def malformed(rng: random.Random, path: str, body: dict[str, object], name: str) -> Probe:
    full = encode({**body, "vllm_xargs": {SAMPLER_KEY: name}})
    kind = rng.randrange(8)
    if kind == 7:  # a number with more digits than Python's JSON parser reads
        xargs = f'{{"{SAMPLER_KEY}": "{name}", "typical_p": {"9" * 5000}}}'.encode()
        return Probe("malformed_body", path, full.replace(encode({SAMPLER_KEY: name}), xargs, 1))
    if kind == 0:  # cut short
        return Probe("malformed_body", path, full[: rng.randint(1, len(full) - 2)])
    if kind == 1:  # not JSON at all, or JSON with a syntax error inside
        return Probe("malformed_body", path, rng.choice([b"hello", b"{'model': 'x'}", b"{,}",
                                                         full.replace(b":", b"=", 1), full + b"}"]))
    if kind == 2:  # wrong content type for a valid body
        content_type = rng.choice(["text/plain", "application/x-www-form-urlencoded", "text/json"])
        return Probe("malformed_body", path, full, content_type=content_type)
    if kind == 3:  # a JSON value that is not an object
        return Probe("malformed_body", path, rng.choice([b"[]", b"null", b"3", b'"text"', b"[" + full + b"]"]))
    if kind == 4:  # empty body
        return Probe("malformed_body", path, b"")
    if kind == 5:  # not UTF-8
        return Probe("malformed_body", path, full.replace(b'"model"', b'"mod\xff\xfeel"', 1))
    # xargs nested under another object, or a deeply nested value
    nested: object = {SAMPLER_KEY: name}
    for _ in range(rng.randint(2, 40)):
        nested = [nested] if rng.random() < 0.5 else {"x": nested}
    xargs = {SAMPLER_KEY: name, "typical_p": nested}
    return Probe("malformed_body", path, encode({**body, "vllm_xargs": xargs}), keys=("typical_p",))


def generate(model: str) -> list[Probe]:
    rng = random.Random(SEED)
    return [probe(rng, model) for _ in range(N_REQUESTS)]


# ---- sending -------------------------------------------------------------------------------

_local = threading.local()


def session() -> requests.Session:
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    return _local.session


@dataclasses.dataclass(frozen=True)
class Outcome:
    probe: Probe
    status: int  # 0: no HTTP answer (connection dropped or timed out)
    text: str


def send(server: Server, item: Probe) -> Outcome:
    try:
        response = session().post(f"{server.url}{item.path}", data=item.body,
                                   headers={"Content-Type": item.content_type}, timeout=120)
    except requests.RequestException as e:
        return Outcome(item, 0, f"{type(e).__name__}: {e}")
    return Outcome(item, response.status_code, response.text)


def problem(outcome: Outcome) -> str | None:
    """What is wrong with the server's answer to one probe, or None."""
    item, status, text = outcome.probe, outcome.status, outcome.text
    if item.ok:
        return None if status == 200 else f"valid request got {status}"
    if not 400 <= status < 500:
        return f"invalid request got {status}"
    if item.keys and not any(key in text for key in item.keys):
        return f"the {status} names none of {list(item.keys)}"
    if item.ours:  # the plugin's refusal: the key as error.param, the range in the message
        try:
            error = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            return f"the {status} body is not vLLM's error object"
        key = error.get("param")
        if key not in item.keys:
            return f"error.param is {key!r}, expected one of {list(item.keys)}"
        if item.kind == "bad_value":
            expected = f"{key} must be a number in {PARAMS_BY_KEY[key].interval()}, got "
            if expected not in error["message"]:
                return f"the message does not give the range of {key} and the value"
    return None


def greedy_answer(server: Server) -> tuple[list[int], str]:
    response = requests.post(f"{server.url}{COMPLETIONS}", timeout=120, json={
        "model": server.model, "prompt": GREEDY_PROMPT, "max_tokens": GREEDY_TOKENS,
        "temperature": 0.0, "ignore_eos": True, "return_token_ids": True,
    })
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["token_ids"], choice["text"]


def test_generated_bad_requests_get_4xx_naming_the_key_and_the_server_keeps_serving(
    adaptive_server: Server,
) -> None:
    probes = generate(adaptive_server.model)
    assert len(probes) >= 1000
    kinds = collections.Counter(p.kind for p in probes)
    assert all(kinds[k] >= 30 for k in ("bad_value", "unknown_sampler", "malformed_body", "valid")), kinds

    before = greedy_answer(adaptive_server)
    start = time.monotonic()
    with ThreadPoolExecutor(THREADS) as pool:
        outcomes = list(pool.map(lambda p: send(adaptive_server, p), probes))
    elapsed = time.monotonic() - start
    after = greedy_answer(adaptive_server)

    statuses = collections.Counter(o.status for o in outcomes)
    by_kind = collections.Counter((o.probe.kind, o.status) for o in outcomes)
    print(
        f"\nrobustness: {len(outcomes)} requests in {elapsed:.1f} s with {THREADS} threads; "
        f"status counts {dict(sorted(statuses.items()))}; by kind "
        f"{ {f'{k}:{s}': n for (k, s), n in sorted(by_kind.items())} }"
    )
    problems = [(o, p) for o in outcomes if (p := problem(o)) is not None]
    shown = "\n".join(
        f"- {p}: {o.probe.kind} {o.probe.path} {o.probe.content_type} body={o.probe.body[:300]!r} -> {o.text[:400]}"
        for o, p in problems[:15]
    )
    assert not problems, f"{len(problems)} of {len(outcomes)} answers are wrong:\n{shown}"
    assert adaptive_server.process.poll() is None, "the server exited"
    assert after == before, "the greedy answer changed after the bad requests"


@pytest.mark.parametrize(("sampler", "key", "interval"), [
    ("top_n_sigma", "top_n_sigma", "(0, 100]"), ("dynatemp", "dynatemp_range", "[0, 10]"),
])
def test_json_true_is_not_a_number(adaptive_server: Server, sampler: str, key: str, interval: str) -> None:
    for path, body in [
        (COMPLETIONS, {"prompt": "Hello"}), (CHAT, {"messages": [{"role": "user", "content": "hi"}]}),
    ]:
        response = requests.post(f"{adaptive_server.url}{path}", timeout=120, json={
            "model": adaptive_server.model, "max_tokens": 1, **body,
            "vllm_xargs": {SAMPLER_KEY: sampler, key: True},
        })
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == key
        assert error["message"].startswith(f"{key} must be a number in {interval}, got True")
