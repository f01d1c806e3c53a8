"""Policies: the interface (``Policy``, ``PolicyOutput``), the registry (``build_policy``) and implementations."""

from gsrl.policy.base import (
    ObservationSpec,
    Policy,
    PolicyOutput,
    available_policies,
    build_configured_policy,
    build_policy,
    load_model_weights,
    load_weights_file,
    register_policy,
)

__all__ = [
    "ObservationSpec",
    "Policy",
    "PolicyOutput",
    "available_policies",
    "build_configured_policy",
    "build_policy",
    "load_model_weights",
    "load_weights_file",
    "register_policy",
]
