"""Training app library: stage policy, optimizer, parallelism, tracking, checkpoints, callbacks, the task."""
