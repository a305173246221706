"""KV compaction's per-request keys and deployment section (vllm_adaptive.kvcache.params, .config,
.compatibility): rules from requests, errors that name the key, and start-up refusals."""

from __future__ import annotations

import pytest

from vllm_adaptive.config import AdaptiveConfig
from vllm_adaptive.errors import ConfigError
from vllm_adaptive.kvcache.compatibility import SCHEDULER_CLS, check_engine_arguments
from vllm_adaptive.kvcache.config import KVCompactionConfig
from vllm_adaptive.kvcache.params import parse_request
from vllm_adaptive.sampling.param_spec import SamplerParamError

CONFIG = KVCompactionConfig(enabled=True, sinks=4, buffer=64)


def test_requests_without_kv_keys_are_not_compacted() -> None:
    assert parse_request(None, CONFIG) is None and parse_request({"ead": True}, CONFIG) is None


def test_a_budget_in_tokens_or_as_a_share_of_the_prompt() -> None:
    fixed = parse_request({"kv_budget": 40, "kv_sinks": 2, "kv_buffer": 8}, CONFIG)
    assert (fixed.rule, fixed.tokens, fixed.sinks, fixed.buffer, fixed.min_tokens) == ("fixed", 40, 2, 8, 3)
    assert parse_request({"kv_budget": "40"}, CONFIG).tokens == 40  # vllm_xargs may carry strings
    ratio = parse_request({"kv_budget": 0.25}, CONFIG)
    assert (ratio.rule, ratio.ratio, ratio.sinks, ratio.buffer) == ("ratio", 0.25, 4, 64)
    assert parse_request({"kv_budget": 1}, CONFIG).tokens == 1


def test_an_entropy_budget_takes_its_multiplier_and_keeps_the_window() -> None:
    default = parse_request({"kv_budget": "entropy"}, KVCompactionConfig(enabled=True, window=16, entropy_multiplier=3))
    assert (default.rule, default.multiplier, default.sinks, default.recent, default.min_tokens) == ("entropy", 3.0, 4, 16, 20)
    sent = parse_request({"kv_budget": "entropy", "kv_entropy_multiplier": "1.5", "kv_sinks": 2}, CONFIG)
    assert (sent.multiplier, sent.sinks, sent.recent) == (1.5, 2, 32)
    # ceil(1.5 x 10.2) + sinks + window; never below the sinks and the window.
    assert sent.target(500, effective=10.2) == 16 + 2 + 32 and sent.target(500, effective=0.0) == 34


@pytest.mark.parametrize(("args", "key", "words"), [
    ({"kv_budget": 0}, "kv_budget", "integer >= 1"),
    ({"kv_budget": 2.5}, "kv_budget", "integer >= 1"),
    ({"kv_budget": True}, "kv_budget", "got True"),
    ({"kv_budget": "many"}, "kv_budget", "got 'many'"),
    ({"kv_budget": 40, "kv_sinks": -1}, "kv_sinks", "[0, 1024]"),
    ({"kv_budget": 40, "kv_buffer": 0}, "kv_buffer", "[1, 1048576]"),
    ({"kv_budget": 40, "kv_policy": "pyramid"}, "kv_policy", "['streaming', 'snapkv', 'h2o', 'keynorm']"),
    ({"kv_sinks": 4}, "kv_sinks", "needs kv_budget"),
    ({"kv_budget": "Entropy"}, "kv_budget", "or \"entropy\", got 'Entropy'"),
    ({"kv_budget": "entropy", "kv_entropy_multiplier": 0}, "kv_entropy_multiplier", "(0, 1000]"),
    ({"kv_budget": "entropy", "kv_entropy_multiplier": "x"}, "kv_entropy_multiplier", "got 'x'"),
    ({"kv_budget": 40, "kv_entropy_multiplier": 2}, "kv_entropy_multiplier", "applies to kv_budget \"entropy\" only"),
])
def test_bad_values_name_the_key_the_range_and_the_value(args: dict, key: str, words: str) -> None:
    with pytest.raises(SamplerParamError) as raised:
        parse_request(args, CONFIG)
    assert raised.value.parameter == key and key in str(raised.value) and words in str(raised.value)


def test_the_section_is_validated_at_start_up_naming_the_key() -> None:
    assert AdaptiveConfig.from_dict({"kvcache": {"enabled": True}}).kvcache.enabled
    with pytest.raises(ConfigError, match=r"kvcache\.sinks must be an integer in \[0, 1024\], got -2"):
        AdaptiveConfig.from_dict({"kvcache": {"sinks": -2}})
    with pytest.raises(ConfigError, match=r"kvcache\.policy must be one of \['streaming', 'snapkv', 'h2o', 'keynorm'\]"):
        AdaptiveConfig.from_dict({"kvcache": {"policy": "pyramid"}})
    with pytest.raises(ConfigError, match=r"kvcache\.entropy_multiplier must be a number in \(0, 1000\], got -1"):
        AdaptiveConfig.from_dict({"kvcache": {"entropy_multiplier": -1}})
    with pytest.raises(ConfigError, match="kvcache.enabled cannot be true together with routing.enabled"):
        AdaptiveConfig.from_dict({"kvcache": {"enabled": True}, "routing": {"enabled": True}})


def test_engine_arguments_get_the_scheduler_and_refusals_name_the_setting() -> None:
    assert check_engine_arguments(None, {}) == {"scheduler_cls": SCHEDULER_CLS, "async_scheduling": False}
    with pytest.raises(ConfigError) as raised:
        check_engine_arguments({"method": "ngram"}, {"scheduler_cls": "x.Y", "kv_cache_dtype": "fp8",
                                                     "pipeline_parallel_size": 2})
    message = str(raised.value)
    assert message.startswith("kvcache.enabled cannot run with these settings:")
    for setting in ("speculative_config", "scheduler_cls", "kv_cache_dtype", "pipeline_parallel_size"):
        assert setting in message


def test_engine_kwargs_turns_the_scheduler_on() -> None:
    import vllm_adaptive

    kwargs = vllm_adaptive.engine_kwargs({"kvcache": {"enabled": True}}, seed=0)
    assert kwargs["scheduler_cls"] == SCHEDULER_CLS and kwargs["async_scheduling"] is False
    assert "scheduler_cls" not in vllm_adaptive.engine_kwargs({}, seed=0)


def test_admission_refuses_kv_keys_where_the_deployment_does_not_compact() -> None:
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from vllm_adaptive.patches.input_processor_validate_params import refuse_unservable_kv

    def processor(adaptive: dict | None) -> SimpleNamespace:
        additional = {} if adaptive is None else {"adaptive": adaptive}
        return SimpleNamespace(vllm_config=SimpleNamespace(additional_config=additional))

    asking = SamplingParams(extra_args={"kv_budget": 40})
    for deployment in (None, AdaptiveConfig().to_dict()):  # plugin off; plugin on, kvcache off
        with pytest.raises(VLLMValidationError, match="kvcache.enabled is false") as raised:
            refuse_unservable_kv(processor(deployment), asking)
        assert raised.value.parameter == "kv_budget"
    on = processor(AdaptiveConfig.from_dict({"kvcache": {"enabled": True}}).to_dict())
    refuse_unservable_kv(on, asking)  # served
    refuse_unservable_kv(processor(None), SamplingParams())  # no kv key: not looked at
    with pytest.raises(VLLMValidationError) as raised:
        refuse_unservable_kv(on, SamplingParams(extra_args={"kv_budget": 40, "kv_buffer": "x"}))
    assert raised.value.parameter == "kv_buffer"


def test_raw_json_values_are_checked_as_sent() -> None:
    """JSON true would reach the engine as the integer 1 (one token kept): refused as sent."""
    from vllm.exceptions import VLLMValidationError

    from vllm_adaptive.patches.openai_protocol_vllm_xargs import check_adaptive_xargs

    with pytest.raises(VLLMValidationError) as raised:
        check_adaptive_xargs({"kv_budget": True})
    assert raised.value.parameter == "kv_budget"
    assert check_adaptive_xargs({"kv_budget": 64, "kv_sinks": 2}) == {"kv_budget": 64, "kv_sinks": 2}
