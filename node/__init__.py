"""A volunteer node: identity, coordinator client, hivemind swarm glue, trainer, validator, download."""
