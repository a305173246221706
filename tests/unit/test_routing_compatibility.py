"""Where Entropy Adaptive Decoding can run: the vLLM settings refused at start-up
(vllm_adaptive.routing.compatibility, through `engine_kwargs`), and the requests refused at
admission (patch spec-decode-admission, `refuse_unservable_routing`)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

import vllm_adaptive
from vllm_adaptive.config import AdaptiveConfig, ConfigError
from vllm_adaptive.patches.input_processor_validate_params import (
    refuse_samplers_under_speculation,
    refuse_unservable_routing,
)
from vllm_adaptive.routing.compatibility import check_engine_arguments, check_vllm_config, problems
from vllm_adaptive.routing.config import RoutingConfig

ROUTING = {"routing": {"enabled": True}}
DRAFT = {"method": "draft_model", "model": "m", "num_speculative_tokens": 3}
PREFIX = "routing.enabled (EAD) cannot run with these settings: "
SUFFIX = ". Change them, or set routing.enabled: false."
# Settings every check passes (what `problems` reads).
GOOD = {"method": "draft_model", "num_speculative_tokens": 3, "rejection_sample_method": "standard",
        "async_scheduling": False, "tensor_parallel_size": 1, "model_runner_v2": False}

# Start-up


def test_supported_settings_keep_the_speculative_config_and_turn_async_scheduling_off() -> None:
    kwargs = vllm_adaptive.engine_kwargs(ROUTING, speculative_config=DRAFT)
    assert kwargs["speculative_config"] == DRAFT
    assert kwargs["async_scheduling"] is False
    assert kwargs["additional_config"]["adaptive"]["routing"]["enabled"] is True


@pytest.mark.parametrize("k", [1, 2, 7, 128])
def test_any_draft_length_of_at_least_one_is_accepted(k: int) -> None:
    assert problems({**GOOD, "num_speculative_tokens": k}) == []


def test_routing_off_leaves_speculative_arguments_alone() -> None:
    ngram = {"method": "ngram", "num_speculative_tokens": 2}
    kwargs = vllm_adaptive.engine_kwargs({"routing": {"tau": 2.0}}, speculative_config=ngram, async_scheduling=True)
    assert kwargs["speculative_config"] == ngram and kwargs["async_scheduling"] is True


def test_without_a_speculative_config_start_up_says_what_to_pass() -> None:
    with pytest.raises(ConfigError) as e:
        vllm_adaptive.engine_kwargs(ROUTING)
    assert str(e.value) == (
        PREFIX + "speculative_config is not set: EAD needs vLLM's draft-model speculation; pass "
        '--speculative-config \'{"method": "draft_model", "model": DRAFT_MODEL, '
        '"num_speculative_tokens": K}\' (offline: speculative_config={...})' + SUFFIX
    )


@pytest.mark.parametrize(
    ("speculative_config", "engine_args", "problem"),
    [
        ({"method": "eagle", "model": "m", "num_speculative_tokens": 3}, {},
         "speculative_config method must be 'draft_model' (got 'eagle'): EAD routes inside vLLM's "
         "draft-model proposer only"),
        ({**DRAFT, "num_speculative_tokens": 0}, {},
         "speculative_config num_speculative_tokens must be an integer >= 1 (got 0): it is the "
         "draft length of every request"),
        ({**DRAFT, "num_speculative_tokens_per_batch_size": [(1, 8, 3), (9, 256, 0)]}, {},
         "speculative_config num_speculative_tokens_per_batch_size must be unset: it may set the "
         "draft length to 0, and with no draft step there is no entropy to route on"),
        ({**DRAFT, "disable_padded_drafter_batch": True}, {},
         "speculative_config disable_padded_drafter_batch must be off: the EAD proposer reads "
         "acceptances from the padded batch"),
        ({**DRAFT, "use_local_argmax_reduction": True}, {},
         "speculative_config use_local_argmax_reduction must be off: EAD needs the draft's full "
         "logits for its entropy"),
        ({**DRAFT, "use_heterogeneous_vocab": True}, {},
         "speculative_config use_heterogeneous_vocab must be off: EAD needs the draft's full logits "
         "in the target's vocabulary (its accepted draft tokens are target tokens)"),
        ({**DRAFT, "parallel_drafting": True}, {},
         "speculative_config parallel_drafting must be off: parallel drafting has no per-token "
         "draft step to route on"),
        ({**DRAFT, "rejection_sample_method": "synthetic"}, {},
         "speculative_config rejection_sample_method must be 'standard' (got 'synthetic')"),
        (DRAFT, {"async_scheduling": True},
         "async scheduling must be off (--no-async-scheduling, offline async_scheduling=False): it "
         "pads every draft to the scheduled length"),
        (DRAFT, {"tensor_parallel_size": 2},
         "tensor_parallel_size must be 1 (got 2): EAD's routing state lives in one worker process"),
        (DRAFT, {"pipeline_parallel_size": 4},
         "pipeline_parallel_size must be 1 (got 4): EAD's routing state lives in one worker process"),
        (DRAFT, {"data_parallel_size": 2},
         "data_parallel_size must be 1 (got 2): EAD's routing state lives in one worker process"),
    ],
)
def test_each_unsupported_setting_is_refused_by_name(
    speculative_config: dict, engine_args: dict, problem: str
) -> None:
    with pytest.raises(ConfigError) as e:
        vllm_adaptive.engine_kwargs(ROUTING, speculative_config=speculative_config, **engine_args)
    assert str(e.value) == PREFIX + problem + SUFFIX


def test_model_runner_v2_is_refused_with_the_setting_to_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ConfigError) as e:
        check_engine_arguments(RoutingConfig(enabled=True), DRAFT, {})
    assert str(e.value) == (
        PREFIX + "EAD runs on the V1 model runner only: set VLLM_USE_V2_MODEL_RUNNER=0 (it is set to 1)" + SUFFIX
    )


def test_every_problem_is_reported_at_once() -> None:
    found = problems({
        "method": "ngram", "num_speculative_tokens": None, "num_speculative_tokens_per_batch_size": [(1, 4, 2)],
        "parallel_drafting": True, "async_scheduling": True, "data_parallel_size": 2, "model_runner_v2": None,
    })
    assert [f.split(" ")[:2] for f in found] == [
        ["speculative_config", "method"],
        ["speculative_config", "num_speculative_tokens"],
        ["speculative_config", "num_speculative_tokens_per_batch_size"],
        ["speculative_config", "parallel_drafting"],
        ["async", "scheduling"],
        ["data_parallel_size", "must"],
        ["EAD", "runs"],
    ]
    assert found[1].startswith("speculative_config num_speculative_tokens must be an integer >= 1 (got None)")
    assert found[-1].endswith("(Model Runner V2 is the default on this platform)")


def resolved(**changes: Any) -> SimpleNamespace:
    """A resolved VllmConfig as check_vllm_config reads it."""
    spec = SimpleNamespace(method="draft_model", num_speculative_tokens=3, rejection_sample_method="standard",
                           num_speculative_tokens_per_batch_size=None, disable_padded_drafter_batch=False,
                           use_local_argmax_reduction=False, use_heterogeneous_vocab=False, parallel_drafting=False)
    config = SimpleNamespace(
        speculative_config=spec,
        scheduler_config=SimpleNamespace(async_scheduling=False),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, data_parallel_size=1),
        use_v2_model_runner=False,
    )
    for name, value in changes.items():
        target = spec if hasattr(spec, name) else config.scheduler_config if name == "async_scheduling" else config
        setattr(target, name, value)
    return config


def test_the_worker_check_accepts_a_supported_resolved_config() -> None:
    check_vllm_config(RoutingConfig(enabled=True), resolved())


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"async_scheduling": True},
         "async scheduling must be off (--no-async-scheduling, offline async_scheduling=False): it "
         "pads every draft to the scheduled length"),
        ({"use_v2_model_runner": True},
         "EAD runs on the V1 model runner only: set VLLM_USE_V2_MODEL_RUNNER=0 (it is set to 1)"),
        ({"num_speculative_tokens_per_batch_size": [(1, 256, 3)]},
         "speculative_config num_speculative_tokens_per_batch_size must be unset: it may set the "
         "draft length to 0, and with no draft step there is no entropy to route on"),
        ({"speculative_config": None},
         "speculative_config is not set: EAD needs vLLM's draft-model speculation"),
    ],
)
def test_the_worker_check_refuses_what_vllm_resolved(changes: dict, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        check_vllm_config(RoutingConfig(enabled=True), resolved(**changes))
    assert str(e.value) == PREFIX + problem + SUFFIX


# Admission


def processor(routing: dict[str, Any] | None = None, *, speculative: Any = "greedy",
              plugin: bool = True) -> SimpleNamespace:
    """The InputProcessor as the admission checks read it: vllm_config.additional_config and
    .speculative_config (draft_model with this draft_sample_method; None: no speculation)."""
    additional = {"adaptive": AdaptiveConfig.from_dict({"routing": routing or {}}).to_dict()} if plugin else {}
    spec = None
    if speculative is not None:
        spec = SimpleNamespace(method="draft_model", num_speculative_tokens=3, draft_sample_method=speculative)
    return SimpleNamespace(vllm_config=SimpleNamespace(additional_config=additional, speculative_config=spec))


SERVING = processor({"enabled": True})


def admit(proc: SimpleNamespace, **kwargs: Any) -> None:
    """Both checks the admission patch runs after vLLM's own, in its order."""
    params = SamplingParams(max_tokens=8, **kwargs)
    refuse_samplers_under_speculation(proc, params)
    refuse_unservable_routing(proc, params)


def refusal(proc: SimpleNamespace, **kwargs: Any) -> VLLMValidationError:
    with pytest.raises(VLLMValidationError) as e:
        admit(proc, **kwargs)
    return e.value


@pytest.mark.parametrize(
    "extra_args",
    [{"ead": True}, {"ead_tau": "0.5"}, {"ead": 1, "ead_window": 3.0, "ead_min_stint": 2, "ead_mode": "faithful"}],
)
def test_greedy_ead_requests_are_admitted(extra_args: dict) -> None:
    admit(SERVING, temperature=0.0, extra_args=extra_args)


def test_greedy_requests_may_keep_options_greedy_decoding_ignores() -> None:
    # vLLM resets top_k/top_p/min_p for temperature 0, and a seed changes nothing.
    admit(SERVING, temperature=0.0, top_k=5, top_p=0.5, min_p=0.1, seed=3, extra_args={"ead": True})


def test_sampled_ead_requests_are_admitted_with_a_probabilistic_draft() -> None:
    admit(processor({"enabled": True}, speculative="probabilistic"), temperature=0.7, top_k=-1, extra_args={"ead": True})


def test_sampled_ead_request_with_a_greedy_draft_is_refused_naming_temperature() -> None:
    error = refusal(SERVING, temperature=0.7, extra_args={"ead": True})
    assert (error.parameter, error.value) == ("temperature", 0.7)
    assert error.args[0] == (
        "this request uses Entropy Adaptive Decoding (it sends ['ead']), which accepts the small "
        "model's tokens unverified, so the small model must follow the request's sampling options, "
        "and here it would not: temperature=0.7: the deployment's small model drafts greedily "
        "(speculative_config draft_sample_method is 'greedy'), so it would write its argmax, not a "
        "sample; send temperature 0, or use a deployment with draft_sample_method 'probabilistic'. "
        "Change these options, or send ead: false."
    )


@pytest.mark.parametrize(
    ("option", "value"),
    [("top_k", 40), ("top_p", 0.9), ("min_p", 0.05), ("seed", 1)],
)
def test_sampling_options_the_draft_sampler_ignores_are_refused(option: str, value: Any) -> None:
    error = refusal(processor({"enabled": True}, speculative="probabilistic"),
                    temperature=0.7, extra_args={"ead_tau": 1.0}, **{option: value})
    assert (error.parameter, error.value) == (option, value)
    assert f"{option}={value!r}: " in str(error)


@pytest.mark.parametrize(
    ("option", "value"),
    [("presence_penalty", 0.5), ("frequency_penalty", -0.5), ("repetition_penalty", 1.2)],
)
def test_penalties_are_refused_even_for_greedy_requests(option: str, value: float) -> None:
    error = refusal(SERVING, temperature=0.0, extra_args={"ead": True}, **{option: value})
    assert (error.parameter, error.value) == (option, value)
    assert f"{option}={value!r}: the small model ignores penalties" in str(error)


def test_logit_bias_is_refused_even_for_greedy_requests() -> None:
    error = refusal(SERVING, temperature=0.0, extra_args={"ead": True}, logit_bias={7: -100.0})
    assert (error.parameter, error.value) == ("logit_bias", {7: -100.0})
    assert "logit_bias={7: -100.0}: the small model ignores logit biases" in str(error)
    admit(SERVING, temperature=0.0, extra_args={"ead": False}, logit_bias={7: -100.0})


def test_every_unhonoured_option_is_listed_and_the_first_is_named() -> None:
    error = refusal(SERVING, temperature=0.7, seed=5, repetition_penalty=1.1, extra_args={"ead": True})
    assert error.parameter == "temperature"
    message = str(error)
    assert message.index("temperature=0.7") < message.index("repetition_penalty=1.1") < message.index("seed=5")


def test_ead_keys_on_a_deployment_without_routing_are_refused_naming_the_key() -> None:
    error = refusal(processor({}), temperature=0.0, extra_args={"ead_window": 4})
    assert (error.parameter, error.value) == ("ead_window", 4)
    assert error.args[0] == (
        "ead_window=4 cannot be served here: this deployment does not serve Entropy Adaptive "
        "Decoding (routing.enabled is false in its adaptive config). Send the request without the "
        "ead_* keys, or use a deployment with routing.enabled: true."
    )
    # A bad value there gets the same answer: the deployment is what the client must change.
    assert refusal(processor({}), extra_args={"ead": "maybe"}).parameter == "ead"


def test_ead_false_is_admitted_anywhere() -> None:
    admit(processor({}), temperature=0.8, seed=1, extra_args={"ead": False})
    admit(processor({}, speculative=None), temperature=0.8, extra_args={"ead": "false"})
    admit(SERVING, temperature=0.8, seed=1, extra_args={"ead": 0})


def test_bad_values_are_refused_naming_key_and_value() -> None:
    error = refusal(SERVING, temperature=0.0, extra_args={"ead_tau": -1})
    assert (error.parameter, error.value) == ("ead_tau", -1)
    assert error.args[0] == "ead_tau must be a number in (0, inf) bits, got -1"
    error = refusal(SERVING, temperature=0.0, extra_args={"ead": False, "ead_window": 2})
    assert error.parameter == "ead" and "ead is false but the request also sets ['ead_window']" in str(error)


def test_requests_without_ead_keys_are_untouched_when_default_on_is_false() -> None:
    admit(SERVING, temperature=0.9, top_p=0.5, seed=7, repetition_penalty=1.3, extra_args={"other": 1})
    admit(SERVING, temperature=0.9, top_k=3)


def test_default_on_checks_requests_that_do_not_send_ead() -> None:
    default_on = processor({"enabled": True, "default_on": True})
    admit(default_on, temperature=0.0)
    error = refusal(default_on, temperature=0.5)
    assert error.parameter == "temperature"
    assert "(this deployment uses EAD for every request that does not send ead: false)" in str(error)
    admit(default_on, temperature=0.5, extra_args={"ead": False})


def test_ead_request_on_a_deployment_without_draft_model_speculation_is_refused() -> None:
    error = refusal(processor({"enabled": True}, speculative=None), temperature=0.0, extra_args={"ead_mode": "faithful"})
    assert (error.parameter, error.value) == ("ead_mode", "faithful")
    assert error.args[0] == (
        "ead_mode='faithful' cannot be served here: this deployment runs no draft-model "
        "speculation, which Entropy Adaptive Decoding needs. Send the request without the ead_* keys."
    )


def test_engines_without_the_plugin_and_pooling_requests_are_untouched() -> None:
    admit(processor(plugin=False), temperature=0.9, seed=1, extra_args={"ead": "maybe"})
    refuse_unservable_routing(processor({"enabled": True, "default_on": True}), object())


def test_adaptive_samplers_are_still_refused_on_speculating_deployments() -> None:
    error = refusal(SERVING, temperature=0.8, extra_args={"adaptive_sampler": "mirostat_v2"})
    assert (error.parameter, error.value) == ("adaptive_sampler", "mirostat_v2")
    assert "this deployment runs speculative decoding" in str(error)


def test_refusals_are_counted_by_parameter() -> None:
    def count() -> float:
        return REGISTRY.get_sample_value("vllm_adaptive:rejected_requests_total", {"parameter": "ead_min_stint"}) or 0.0

    before = count()
    refusal(SERVING, temperature=0.0, extra_args={"ead_min_stint": 2000})
    assert count() == before + 1


def test_a_missing_draft_length_gets_the_default() -> None:
    from vllm_adaptive.routing.compatibility import check_engine_arguments

    settings = check_engine_arguments(RoutingConfig(enabled=True), {"method": "draft_model", "model": "m"}, {})
    assert settings["speculative_config"] == {"method": "draft_model", "model": "m", "num_speculative_tokens": 4}
    given = check_engine_arguments(RoutingConfig(enabled=True), DRAFT, {})
    assert given["speculative_config"] == DRAFT
