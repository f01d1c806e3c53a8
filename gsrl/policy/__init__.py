"""Policies: the interface (``Policy``, ``PolicyOutput``), the registry (``build_policy``) and implementations."""

from gsrl.policy.base import ObservationSpec, Policy, PolicyOutput, available_policies, build_policy, register_policy

__all__ = ["ObservationSpec", "Policy", "PolicyOutput", "available_policies", "build_policy", "register_policy"]
