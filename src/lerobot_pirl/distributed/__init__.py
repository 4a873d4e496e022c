"""The learner and actor processes over LeRobot's gRPC transport: config, payloads, transport, DDP."""
