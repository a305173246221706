"""VLLM_ADAPTIVE_FAULT_INJECT: which fault points a process injects (vllm_adaptive.faults)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vllm_adaptive import faults
from vllm_adaptive.errors import ConfigError
from vllm_adaptive.faults import FAULT_INJECT_ENV, InjectedFault, fault_injected, injected_faults, raise_if_injected


@pytest.fixture(autouse=True)
def fresh_reading(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(FAULT_INJECT_ENV, raising=False)
    injected_faults.cache_clear()
    yield
    injected_faults.cache_clear()


def test_nothing_is_injected_by_default() -> None:
    assert injected_faults() == frozenset()
    assert not any(fault_injected(name) for name in faults.FAULT_POINTS)
    raise_if_injected("spec:stop_rule")  # does not raise


def test_named_points_fail_and_the_others_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_INJECT_ENV, " spec:stop_rule,,spec:feedback ")
    assert injected_faults() == {"spec:stop_rule", "spec:feedback"}
    assert fault_injected("spec:stop_rule") and fault_injected("spec:feedback")
    assert not fault_injected("spec:controller")
    with pytest.raises(InjectedFault, match="spec:feedback") as failure:
        raise_if_injected("spec:feedback")
    assert failure.value.name == "spec:feedback"


def test_the_variable_is_read_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_INJECT_ENV, "spec:finish")
    assert fault_injected("spec:finish")
    monkeypatch.setenv(FAULT_INJECT_ENV, "")
    assert fault_injected("spec:finish")
    injected_faults.cache_clear()
    assert not fault_injected("spec:finish")


def test_an_unknown_name_in_the_variable_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_INJECT_ENV, "spec:stop_rule,spec:stoprule")
    with pytest.raises(ConfigError, match=rf"{FAULT_INJECT_ENV}: unknown fault point\(s\) \['spec:stoprule'\]"):
        injected_faults()


def test_asking_about_a_point_that_does_not_exist_is_an_error() -> None:
    with pytest.raises(ValueError, match="'spec:nothing' is not a fault point"):
        fault_injected("spec:nothing")
