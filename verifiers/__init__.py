"""Verifiers. Importing this package registers every built-in verifier in `VERIFIERS`."""

from verifiers import (  # noqa: F401  (registration)
    answer_agreement,
    checklist,
    code_tests,
    introspection,
    logprob,
    reference,
    reward_model,
    self_judge,
)
from verifiers.base import VERIFIERS, Verifier, build_verifiers, register_verifier

__all__ = ["VERIFIERS", "Verifier", "build_verifiers", "register_verifier"]
