"""The one typed configuration of vllm-adaptive.

A deployment writes it as YAML (`vllm serve ... --plugin adaptive --adaptive-config FILE`) or
passes a dict offline (`LLM(model, **vllm_adaptive.engine_kwargs({...}))`). It is validated
once, at start-up, in the process that parses it; bad keys or values stop start-up with a
`ConfigError` that names the key. The validated form travels to the engine core and every
worker inside vLLM's own `VllmConfig.additional_config["adaptive"]`, so every process reads
the same values without environment variables or files.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vllm_adaptive.errors import ConfigError
from vllm_adaptive.kvcache.config import KVCompactionConfig
from vllm_adaptive.routing.config import RoutingConfig
from vllm_adaptive.sampling.param_spec import as_number, shown
from vllm_adaptive.sampling.registry import PARAMS_BY_KEY
from vllm_adaptive.speculative.config import AdaptiveDraftConfig

# Key under VllmConfig.additional_config that holds our validated config; its presence is
# what "the plugin is on" means in every process.
ADDITIONAL_CONFIG_KEY = "adaptive"


def _check_sampling_config(self: Any) -> None:
    for param in PARAMS_BY_KEY.values():
        value = getattr(self, param.default_from)
        number = as_number(value)
        if number is None or not param.contains(number):
            raise ConfigError(f"{param.default_from} must be a number in {param.interval()}, got {shown(value)}")


# Per-request samplers (chosen with `vllm_xargs: {"adaptive_sampler": ...}`): `enabled` (whether
# requests may select an adaptive sampler at all), then one float field per sampler parameter,
# named by its request key (mirostat_tau, ..., top_n_sigma) and defaulting to the definition's
# default: the deployment's default for requests that choose a sampler without setting it. Its
# range is the one requests get. Generated from vllm_adaptive.sampling.registry, so a sampler's
# parameters are declared once, in its module.
SamplingConfig = dataclasses.make_dataclass(
    "SamplingConfig",
    [("enabled", bool, dataclasses.field(default=True))]
    + [(p.key, float, dataclasses.field(default=p.default)) for p in PARAMS_BY_KEY.values()],
    frozen=True,
    namespace={
        "__module__": __name__,
        "__doc__": (
            "Per-request samplers: `enabled`, and each sampler parameter's deployment default "
            "(vllm_adaptive.sampling.registry)."
        ),
        "__post_init__": _check_sampling_config,
    },
)


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics under the `vllm_adaptive:` prefix on vLLM's `/metrics`."""

    enabled: bool = True


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    # Adaptive draft length for vLLM's draft-model speculation (vllm_adaptive.speculative).
    speculative: AdaptiveDraftConfig = dataclasses.field(default_factory=AdaptiveDraftConfig)
    # Entropy Adaptive Decoding on draft-model speculation (vllm_adaptive.routing).
    routing: RoutingConfig = dataclasses.field(default_factory=RoutingConfig)
    # KV-cache compaction in vLLM's paged cache (vllm_adaptive.kvcache).
    kvcache: KVCompactionConfig = dataclasses.field(default_factory=KVCompactionConfig)

    def __post_init__(self) -> None:
        if self.kvcache.enabled and (self.routing.enabled or self.speculative.enabled):
            raise ConfigError(
                "kvcache.enabled cannot be true together with "
                f"{'routing.enabled' if self.routing.enabled else 'speculative.enabled'}: KV "
                "compaction does not run with speculative decoding yet; set one of them to false"
            )
        # EAD v1 runs on vLLM's fixed-K proposer path: every request drafts K tokens and the
        # routing decides which of them are accepted unverified; adaptive draft length would
        # stop drafts on its own rules underneath it. The two are not combined yet.
        if self.routing.enabled and self.speculative.enabled:
            raise ConfigError(
                "routing.enabled and speculative.enabled cannot both be true: EAD (routing) runs "
                "on vLLM's fixed draft length in this version, and adaptive draft length "
                "(speculative) changes it per request; set one of them to false"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str = "adaptive config") -> AdaptiveConfig:
        """Build and validate from plain data; `source` prefixes error messages (e.g. a file name)."""
        return _build(cls, data or {}, source, prefix="")

    @classmethod
    def from_file(cls, path: str | Path) -> AdaptiveConfig:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read {str(path)!r}: {e.strerror}") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> AdaptiveConfig | None:
        """The config an engine was started with, or None when the plugin is off for it."""
        additional = getattr(vllm_config, "additional_config", None) or {}
        data = additional.get(ADDITIONAL_CONFIG_KEY)
        if data is None:
            return None
        return cls.from_dict(data, source="additional_config.adaptive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_T = TypeVar("_T")


def _build(cls: type[_T], data: Mapping[str, Any], source: str, prefix: str) -> _T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix + str(unknown[0])!r}; "
            f"allowed keys{' under ' + prefix.rstrip('.') if prefix else ''}: {sorted(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = prefix + name
        expected = hints[name]
        if dataclasses.is_dataclass(expected):
            kwargs[name] = _build(expected, value or {}, source, prefix=key + ".")  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(expected, value, source, key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {prefix}{e}") from None


def _coerce(expected: Any, value: Any, source: str, key: str) -> Any:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        members = typing.get_args(expected)
        for member in members:  # in declaration order: `float | str` reads 0.9 as a float
            if member is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(member, value, source, key)
            except ConfigError:
                continue
        names = " or ".join("null" if m is type(None) else m.__name__ for m in members)
        raise ConfigError(f"{source}: {key} must be a {names}, got {value!r}")
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config type {expected!r} of {key} has no coercion rule")
    raise ConfigError(f"{source}: {key} must be a {expected.__name__}, got {value!r}")
