"""Rewards for post-training: scorers behind one text-in/floats-out protocol.

``reward.scorers`` builds them from specs (``rule:NAME``, ``model:PATH``, ``module:function``,
committees of several); ``reward.rules`` holds the rule registry, ``reward.model`` the
reward-model scorer and ``reward.losses`` the reward-model training losses used by ``align rm``.
"""

from reward.rules import RULES, Rule, exact_match, get_rule, length_penalty, regex, register_rule

__all__ = ["RULES", "Rule", "exact_match", "get_rule", "length_penalty", "regex", "register_rule"]
