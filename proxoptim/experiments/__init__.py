"""Experiments wing: models, data, training loop, CLI. The library never imports this."""
