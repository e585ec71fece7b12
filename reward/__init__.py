"""Rewards for post-training: rule rewards looked up by name (see ``reward.rules``)."""

from reward.rules import RULES, Rule, arithmetic, exact_match, get_rule, register_rule

__all__ = ["RULES", "Rule", "arithmetic", "exact_match", "get_rule", "register_rule"]
