"""Load tests for OpenAI-compatible streaming servers (installed as `vllm_adaptive.loadtest`).

`locustfile.py` is the locust user (TTFT, ITL, TPOT, E2E from the SSE stream); `cli.py` is
`vllm-adaptive-loadtest` / `make loadtest` (bounded runs, summary, plots, A/B). The pieces:
`sse.py` (stream decoding), `measures.py` (definitions and summary), `scenarios.py`,
`prompts.py`, `request_body.py`, `slo.py`, `server_metrics.py` (/metrics), `report.py`.
User documentation: docs/loadtest.md.
"""
