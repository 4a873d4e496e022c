"""What lerobot-pirl runs before torch is imported: the console entry point of `lerobot-pirl-train` and the
env-worker forkserver it starts.

A package of its own, standard library only, because `import lerobot_pirl` registers the LeRobot plugins
(the `flow_mlp` policy, the `metaworld_state` env), which imports torch and LeRobot (~12 s on 2 cores).
"""
