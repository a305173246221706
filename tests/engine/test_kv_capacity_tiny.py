"""benchmarks/kv_capacity.py through a real engine on the tiny random model: both arms in one
engine (eager, engine core in process), sizes chosen so that the pool, not max_num_seqs, limits
the `off` arm and makes vLLM preempt. Nothing here is timed; the trained model's figures are in
the README ("KV-cache compaction", Capacity).

8 recall prompts of about 290 tokens with the tiny model's tokenizer (9-10 blocks of 32 each;
with their 36-72 new tokens up to 12) in a pool of 31 usable blocks: vLLM admits a request once its
whole prompt fits, so the `off` arm runs 3 at once, whose growth needs more than the one block
left: it preempts. The `on` arm keeps a quarter of each prompt (3 blocks, up to 5 before it is
compacted again), so the other requests fit beside the one being prefilled. About 20 s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.kv_capacity import MIN_CAPACITY_RATIO, Settings, format_table, main, run

pytestmark = pytest.mark.engine

SETTINGS = {"requests": 8, "prompt_tokens": 280, "max_tokens": 72, "min_tokens": 36, "blocks": 32,
            "max_num_batched_tokens": 128, "enforce_eager": True}


@pytest.fixture(scope="module")
def result(tiny_model: Path) -> dict[str, Any]:
    return run(Settings(model=str(tiny_model), **SETTINGS))


def test_compaction_runs_more_requests_at_once_in_the_same_pool(result: dict[str, Any]) -> None:
    off, on = result["arms"]["off"], result["arms"]["on"]
    assert result["usable_blocks"] == 31 and 280 < result["longest_prompt"] <= 320
    # The pool is the limit of the off arm: 3 prompts of 10 blocks fit, a 4th does not.
    assert off["peak_running"] == 3
    assert on["peak_running"] > off["peak_running"]
    assert on["mean_running"] > off["mean_running"]
    assert on["compactions"] >= SETTINGS["requests"] and on["blocks_freed"] > 0 and on["tokens_evicted"] > 0
    assert off["compactions"] == off["blocks_freed"] == 0
    assert on["scored"] == on["degraded"] == 0  # streaming: nothing to score
    checks = result["checks"]
    assert checks["peak_running_ratio"] == on["peak_running"] / off["peak_running"]
    assert checks["capacity_ok"] == (checks["peak_running_ratio"] >= MIN_CAPACITY_RATIO)


def test_preemptions_are_counted_as_vllm_counts_them(result: dict[str, Any]) -> None:
    off, on = result["arms"]["off"], result["arms"]["on"]
    assert off["preemptions"] > 0  # the scenario does what it is for
    for arm in (off, on):
        assert arm["preemptions"] == arm["vllm_preemptions"] == sum(s["preempted"] for s in arm["steps"])
    assert result["checks"]["fewer_preemptions"] == (on["preemptions"] < off["preemptions"])


def test_every_block_comes_back_and_every_request_generates(result: dict[str, Any]) -> None:
    for arm in result["arms"].values():
        assert arm["free_blocks_start"] == arm["free_blocks_end"] == result["usable_blocks"]
        assert 0 <= arm["min_free_blocks"] < arm["free_blocks_start"]
        assert arm["generated"] == sum(result["output_lengths"])
        assert [len(t) for t in arm["tokens"]] == result["output_lengths"]
        assert arm["empty_outputs"] == 0
        assert all(0 <= s["free_blocks"] <= result["usable_blocks"] for s in arm["steps"])
        assert max(s["running"] for s in arm["steps"]) == arm["peak_running"]


def test_the_table_shows_both_arms_and_the_checks(result: dict[str, Any]) -> None:
    table = format_table(result)
    off, on = result["arms"]["off"], result["arms"]["on"]
    assert f"| off | {off['peak_running']} |" in table
    assert f"| on (streaming, 0.25) | {on['peak_running']} |" in table
    assert "peak running on/off" in table and "preemptions on < off" in table


def test_the_command_line_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--budget", "1.5"], ["--order", "on,on"], ["--policy", "nope"], ["--blocks", "1"]):
        with pytest.raises(SystemExit):
            main(argv)
    assert "--budget" in capsys.readouterr().err


def test_results_are_json(result: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(result))
    assert json.loads(path.read_text())["settings"]["requests"] == SETTINGS["requests"]
