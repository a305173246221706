"""`vllm-adaptive-loadtest`: one bounded, headless locust run and its summary (or an A/B pair).

Checks every argument and the server before starting locust, runs locust in a subprocess (its
gevent monkey-patching stays out of the caller), scrapes `/metrics` before and after, and writes
to the results folder: locust's CSVs and HTML report, the per-request records, PNG plots, and
`summary.md` / `summary.json`. In A/B mode the same load runs against A, then B, and the ratios
B/A of the summary figures are printed and written to `ab.md` / `ab.json`.

Exit status: 0 when every request succeeded, 1 when some failed, 2 for bad arguments or an
unreachable server, 3 when locust itself failed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import requests

from . import report, server_metrics
from .measures import Summary, summarize
from .prompts import PromptsError, load_prompts
from .scenarios import DEFAULT_SCENARIO, UnknownScenarioError, describe_scenarios, get_scenario
from .slo import SLOError, parse_slos
from .sse import Api

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
DEFAULT_URL = "http://127.0.0.1:8000"
PREFLIGHT_TIMEOUT_S = 5.0


class UsageError(Exception):
    """A bad argument or an unusable server: reported in one line, before any load is sent."""


@dataclass(frozen=True)
class Target:
    label: str
    url: str
    model: str
    scenario: str


@dataclass(frozen=True)
class Load:
    api: str
    users: int
    spawn_rate: float
    duration_s: int | None
    max_requests: int
    max_tokens: int
    fixed_output: bool
    token_ids: bool
    prompts_file: str
    prompt_words: int
    prompt_seed: int
    slos_ms: dict[str, float]
    stop_timeout_s: int
    request_timeout_s: float


def parse_duration(text: str) -> int:
    """Seconds from `90`, `90s`, `2m`, `1h30m` (locust's --run-time forms)."""
    value = text.strip().lower()
    if value.isdigit():
        seconds = int(value)
    else:
        match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", value)
        if not value or match is None:
            raise UsageError(
                f"bad --duration {text!r}: expected seconds or a time like 30s, 2m, 1h30m"
            )
        hours, minutes, secs = (int(g) if g else 0 for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if seconds <= 0:
        raise UsageError(f"bad --duration {text!r}: must be more than 0 seconds")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-adaptive-loadtest",
        description="Bounded streaming load test of an OpenAI-compatible (vLLM) server: "
        "TTFT, ITL, TPOT, E2E latency, throughput and goodput.",
    )
    parser.add_argument("--url", default=DEFAULT_URL,
                        help=f"server base URL (default {DEFAULT_URL})")
    parser.add_argument("--model", default="", help="model name (default: first in /v1/models)")
    parser.add_argument("--scenario", default=DEFAULT_SCENARIO,
                        help=f"request scenario (default {DEFAULT_SCENARIO}; see --list-scenarios)")
    parser.add_argument("--list-scenarios", action="store_true",
                        help="print the scenarios and exit")
    parser.add_argument("--api", choices=[a.value for a in Api], default=Api.COMPLETIONS.value)
    parser.add_argument("--users", type=int, default=4, help="concurrent users (default 4)")
    parser.add_argument("--spawn-rate", type=float, default=0.0,
                        help="users started per second (default: all at once)")
    parser.add_argument("--duration", default="",
                        help="run time, e.g. 30s, 2m (default 30s unless --requests is given)")
    parser.add_argument("--requests", type=int, default=0,
                        help="stop after this many requests (with --duration: whichever first)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--fixed-output", action="store_true",
                        help="every request writes exactly --max-tokens (ignore_eos, min_tokens)")
    parser.add_argument("--no-token-ids", action="store_true",
                        help="do not ask for vLLM's return_token_ids (for other OpenAI servers)")
    parser.add_argument("--prompts-file", default="",
                        help="one prompt per line, or .jsonl with a \"prompt\" per line")
    parser.add_argument("--prompt-seed", type=int, default=None,
                        help="seed of the synthetic prompts (default: a new one per run, so "
                        "that a run does not hit the prefix cache with an earlier run's prompts)")
    parser.add_argument("--prompt-words", type=int, default=64,
                        help="synthetic prompt length in words when no --prompts-file (default 64)")
    parser.add_argument("--slo", default="",
                        help="goodput SLOs in ms, e.g. ttft:500,tpot:50 (names: ttft, tpot, e2el)")
    parser.add_argument("--out", default="",
                        help="results folder (default results/loadtest/<date-time>)")
    parser.add_argument("--stop-timeout", type=int, default=30,
                        help="seconds in-flight requests get to finish at the end (default 30)")
    parser.add_argument("--request-timeout", type=float, default=300.0,
                        help="seconds without data before a request fails (default 300)")
    ab = parser.add_argument_group("A/B (same load against A, then B; prints ratios B/A)")
    ab.add_argument("--b-url", default="", help="B's base URL (default: --url)")
    ab.add_argument("--b-model", default="", help="B's model (default: --model, or discovered)")
    ab.add_argument("--b-scenario", default="", help="B's scenario (default: --scenario)")
    return parser


def check_url(url: str) -> None:
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
        raise UsageError(f"bad URL {url!r}: expected http://HOST:PORT, e.g. {DEFAULT_URL}")


def served_models(url: str) -> list[str]:
    """The server's models; fails fast, before locust starts, when the server cannot be used."""
    endpoint = url.rstrip("/") + "/v1/models"
    try:
        response = requests.get(endpoint, timeout=PREFLIGHT_TIMEOUT_S)
    except requests.ConnectionError:
        raise UsageError(
            f"cannot reach {url}: nothing answers there (connection refused or no route). "
            "Start a server (`make serve`) or pass the right --url/URL."
        ) from None
    except requests.Timeout:
        raise UsageError(
            f"cannot reach {url}: no answer within {PREFLIGHT_TIMEOUT_S:g} s"
        ) from None
    if response.status_code != 200:
        raise UsageError(
            f"{endpoint} answered HTTP {response.status_code}; expected an OpenAI-compatible "
            "server such as `vllm serve`"
        )
    try:
        return [str(m["id"]) for m in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{endpoint} did not return an OpenAI model list") from None


def resolve_target(label: str, url: str, model: str, scenario: str) -> Target:
    check_url(url)
    get_scenario(scenario)
    models = served_models(url)
    if not models:
        raise UsageError(f"{url}/v1/models lists no model")
    if model and model not in models:
        raise UsageError(f"{url} does not serve model {model!r}; it serves: {', '.join(models)}")
    return Target(label=label, url=url.rstrip("/"), model=model or models[0], scenario=scenario)


def resolve_load(args: argparse.Namespace) -> Load:
    for name in ("users", "max_tokens", "prompt_words"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} must be at least 1, got {getattr(args, name)}")
    if args.requests < 0:
        raise UsageError(f"--requests must be 0 (no limit) or more, got {args.requests}")
    if args.stop_timeout < 0 or args.request_timeout <= 0:
        raise UsageError("--stop-timeout must be >= 0 and --request-timeout > 0")
    if args.prompts_file:
        try:
            load_prompts(Path(args.prompts_file))
        except PromptsError as err:
            raise UsageError(str(err)) from None
    try:
        slos = parse_slos(args.slo) if args.slo else {}
    except SLOError as err:
        raise UsageError(f"--slo: {err}") from None
    if args.duration:
        duration: int | None = parse_duration(args.duration)
    else:
        duration = None if args.requests else 30
    return Load(
        api=args.api, users=args.users, spawn_rate=args.spawn_rate or float(args.users),
        duration_s=duration, max_requests=args.requests, max_tokens=args.max_tokens,
        fixed_output=args.fixed_output, token_ids=not args.no_token_ids,
        prompts_file=str(Path(args.prompts_file).resolve()) if args.prompts_file else "",
        prompt_words=args.prompt_words,
        prompt_seed=(args.prompt_seed if args.prompt_seed is not None
                     else random.SystemRandom().randrange(1 << 31)),
        slos_ms=slos, stop_timeout_s=args.stop_timeout,
        request_timeout_s=args.request_timeout,
    )


def locust_command(target: Target, load: Load, out: Path) -> list[str]:
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", target.url, "--users", str(load.users), "--spawn-rate", str(load.spawn_rate),
        "--stop-timeout", str(load.stop_timeout_s),
        "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "report.html"),
        # final, exact statistics, as locust_stats.json (locust adds ".json"); the CSVs are
        # sampled each second and can miss the last one
        "--json-file", str(out / "locust_stats"),
        "--scenario", target.scenario, "--model", target.model, "--api", load.api,
        "--max-tokens", str(load.max_tokens), "--prompt-words", str(load.prompt_words),
        "--prompt-seed", str(load.prompt_seed),
        "--request-timeout", str(load.request_timeout_s),
        "--records-file", str(out / "requests.jsonl"),
    ]
    if load.duration_s is not None:
        command += ["--run-time", f"{load.duration_s}s"]
    if load.max_requests:
        command += ["--max-requests", str(load.max_requests)]
    if load.fixed_output:
        command.append("--fixed-output")
    if not load.token_ids:
        command.append("--no-token-ids")
    if load.prompts_file:
        command += ["--prompts-file", load.prompts_file]
    return command


def describe_run(target: Target, load: Load) -> list[str]:
    bound = " and ".join(
        part for part in (
            f"{load.duration_s} s" if load.duration_s is not None else "",
            f"{load.max_requests} requests" if load.max_requests else "",
        ) if part
    )
    output = f"max_tokens {load.max_tokens}" + (" (fixed: ignore_eos)" if load.fixed_output else "")
    prompts = load.prompts_file or f"synthetic, {load.prompt_words} words, seed {load.prompt_seed}"
    return [
        (
            f"Load test{target.label} `{target.scenario}`: {target.url}, "
            f"model `{target.model}`, {Api(load.api).path}"
        ),
        f"{load.users} users, bounded by {bound}; {output}; prompts: {prompts}",
    ]


def run_once(target: Target, load: Load, out: Path) -> Summary:
    """One locust run into `out`; its summary is printed and written there."""
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "requests.jsonl"
    records_path.unlink(missing_ok=True)
    heading = describe_run(target, load)
    print(f"vllm-adaptive-loadtest: {heading[0]}; results in {out}", flush=True)
    before = server_metrics.scrape(target.url)
    command = locust_command(target, load, out)
    limit = None
    if load.duration_s is not None:
        limit = load.duration_s + load.stop_timeout_s + 120
    log_path = out / "locust.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            returncode = process.wait(timeout=limit)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            process.send_signal(signal.SIGINT)
            returncode = process.wait(timeout=60)
    after = server_metrics.scrape(target.url)
    records = report.read_records(records_path)
    if returncode not in (0, 1) or not records:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"locust exited with {returncode} and {len(records)} requests; "
                           f"log {log_path}:\n{tail}")
    counters = means = None
    if before is not None and after is not None:
        counters = server_metrics.counter_deltas(before.counters, after.counters)
        means = server_metrics.latency_means_ms(
            before.latency_histograms, after.latency_histograms
        )
    summary = summarize(records, load.slos_ms, counters, means)
    text = report.render_summary(summary, heading)
    run_info = {"target": asdict(target), "load": asdict(load), "locust_command": command}
    report.write_summary(out, summary, text, run_info)
    report.plot_latency_over_time(records, out / "latency_over_time.png")
    report.plot_throughput_over_time(records, out / "throughput_over_time.png")
    print(text, flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_scenarios:
        print(describe_scenarios())
        return 0
    ab_mode = bool(args.b_url or args.b_scenario or args.b_model)
    try:
        load = resolve_load(args)
        a = resolve_target(" A" if ab_mode else "", args.url, args.model, args.scenario)
        b = None
        if ab_mode:
            b = resolve_target(" B", args.b_url or args.url, args.b_model or args.model,
                               args.b_scenario or args.scenario)
    except (UsageError, UnknownScenarioError) as err:
        print(f"vllm-adaptive-loadtest: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or f"results/loadtest/{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        if b is None:
            summary = run_once(a, load, out)
            return 0 if summary.failed == 0 else 1
        summary_a = run_once(a, load, out / "a")
        # B's synthetic prompts differ from A's (same lengths), so B finds none of them cached
        summary_b = run_once(b, replace(load, prompt_seed=load.prompt_seed + 1), out / "b")
    except RuntimeError as err:
        print(f"vllm-adaptive-loadtest: error: {err}", file=sys.stderr)
        return 3
    label_a = f"{a.url} `{a.model}` scenario `{a.scenario}`"
    label_b = f"{b.url} `{b.model}` scenario `{b.scenario}`"
    text = report.render_ab(summary_a, summary_b, label_a, label_b)
    (out / "ab.md").write_text(text)
    (out / "ab.json").write_text(json.dumps(
        {"a": label_a, "b": label_b, "figures": report.ab_ratios(summary_a, summary_b)}, indent=2
    ) + "\n")
    print(text, flush=True)
    return 0 if summary_a.failed == 0 and summary_b.failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
