"""The smallest run config that still exercises every role: shared by the process-level tests."""

TINY_RUN = [
    "env_server.num_envs=2",
    "task.max_episode_steps=10",
    "policy.hidden_sizes=[32]",
    "policy_server.segment_length=4",
    "learner.segments_per_update=2",
    "redis.max_stream_len=8",
    "algo.update_epochs=1",
    "algo.num_minibatches=2",
    "learner.checkpoint_every=0",
    "learner.metrics_port=0",
    "env_server.metrics_port=0",
]
