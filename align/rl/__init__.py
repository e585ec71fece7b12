"""The experience loop: rollouts, advantage estimators, losses and optimizers."""
