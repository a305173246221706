"""Errors vllm-adaptive raises at people, in a module of its own so every config module can use them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A deployment-config problem; the message names the key, the allowed values and the value."""
