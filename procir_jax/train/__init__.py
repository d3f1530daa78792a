"""Training: mesh and sharding rules, optimizer, step, checkpoints and the loop."""
