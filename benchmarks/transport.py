"""Learner <-> actor transport: throughput over loopback, and end-to-end env steps/s with 1, 2, 4 actors.

1. Bandwidth, for payloads of each size (synthetic tensors, encoded with the real codec):
   - parameters: the learner publishes a ParametersMessage; time until 1 (and 4) ParameterReceivers
     hold it decoded (gRPC streaming in LeRobot's 2 MiB chunks + safetensors decode);
   - rollout: an actor uploads a RolloutMessage; time until the learner's servicer has decoded,
     validated and accepted it;
   - raw socket: the same number of bytes through one loopback TCP socket (sendall / recv_into), the
     ceiling any transport on this machine could reach. Ratio = gRPC MB/s / raw MB/s.
   Median of `--repeats`. Encoding (safetensors save) is timed separately: it happens once per version.
2. End to end: `lerobot-pirl-learner` + N `lerobot-pirl-actor` processes (forked from a preloaded
   forkserver) on MetaWorld reach-v3 (state) with a tiny random flow_mlp, and the single-process
   `lerobot-pirl-train` with the same per-process envs as a reference. Env steps/s = training env steps
   of iterations 2.. divided by their wall time (from metrics.jsonl; iteration 1 warms up); every
   setup runs once per round, `--rounds` rounds one after the other, median reported.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/transport.py --output benchmarks/results/transport.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from lerobot_pirl.distributed.config import TOKEN_FILE, TransportConfig
from lerobot_pirl.distributed.payloads import MIB, ParametersMessage, RolloutMessage, RolloutSpec
from lerobot_pirl.distributed.transport import (
    LearnerClient,
    LearnerServicer,
    ParameterBoard,
    ParameterReceiver,
    RolloutBoard,
    start_learner_server,
)
from lerobot_pirl.rollout.batch import RolloutBatch
from lerobot_pirl.testing.processes import free_port, start_cli
from lerobot_pirl.testing.tiny_flow_mlp import save_tiny_flow_mlp

OBS_KEY = "observation.image"


# ---- payloads of a given size -------------------------------------------------------------------------


def parameters_of_size(size_mb: float, version: int = 0) -> ParametersMessage:
    numel = int(size_mb * MIB / 4)
    tensors = {f"expert.layer{i}.weight": torch.randn(numel // 8) for i in range(8)}  # 8 float32 tensors
    return ParametersMessage("bench", version, 4, [0, 1, 2, 3], 1, "fp", {}, False, tensors)


def rollout_of_size(size_mb: float, version: int = 0) -> tuple[RolloutMessage, RolloutSpec]:
    """T=32 decisions × N=8 envs; an image-like observation carries the bulk of the bytes."""
    T, N, K, H, A = 32, 8, 4, 50, 32
    chain_bytes = T * N * (K + 1) * H * A * 4
    pixels = max(1, int((size_mb * MIB - chain_bytes) / (T * N * 4)))
    batch = RolloutBatch(
        observations={OBS_KEY: torch.rand(T, N, pixels)},
        chains=torch.randn(T, N, K + 1, H, A),
        step_index=torch.randint(0, K, (T, N)),
        logprobs=torch.randn(T, N),
        values=torch.randn(T, N),
        rewards=torch.zeros(T, N),
        terminated=torch.zeros(T, N, dtype=torch.bool),
        truncated=torch.zeros(T, N, dtype=torch.bool),
        next_values=torch.randn(T, N),
        mask=torch.ones(T, N, dtype=torch.bool),
        episode_index=torch.arange(N).expand(T, N).contiguous(),
        episode_returns=torch.zeros(N),
        episode_success=torch.zeros(N, dtype=torch.bool),
        episode_lengths=torch.full((N,), T * 5),
        episode_done=torch.zeros(N, dtype=torch.bool),
        episode_task=torch.zeros(N, dtype=torch.int64),
        env_steps=T * N * 5,
    )
    spec = RolloutSpec(N, K, H, A, 1, {OBS_KEY: ((pixels,), torch.float32)})
    return RolloutMessage("bench", version, 0, 0, 0, [batch]), spec


# ---- measurements -------------------------------------------------------------------------------------


def raw_socket_seconds(data: bytes) -> float:
    """Seconds to move `data` through one loopback TCP connection into a preallocated buffer."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = bytearray(len(data))
    done = threading.Event()

    def receive():
        connection, _ = server.accept()
        view, got = memoryview(received), 0
        while got < len(data):
            got += connection.recv_into(view[got:])
        connection.close()
        done.set()

    thread = threading.Thread(target=receive)
    thread.start()
    client = socket.create_connection(("127.0.0.1", port))
    started = time.perf_counter()
    client.sendall(data)
    done.wait()
    elapsed = time.perf_counter() - started
    client.close()
    thread.join()
    server.close()
    return elapsed


def parameter_broadcast_seconds(size_mb: float, receivers: int, repeats: int) -> tuple[list[float], float]:
    """(seconds from publish to every receiver holding the decoded version, per repeat; encode seconds)."""
    servicer = LearnerServicer(ParameterBoard(), RolloutBoard(), None, max_upload_bytes=1 << 30)
    transport = TransportConfig(port=0, num_actors=receivers)
    server, port = start_learner_server(transport, servicer)
    transport.port = port
    clients = [LearnerClient(transport, i) for i in range(receivers)]
    threads = [ParameterReceiver(c, max_bytes=1 << 34, max_backoff_s=0.5) for c in clients]
    for thread in threads:
        thread.start()
    times, encode_s = [], 0.0
    try:
        for version in range(repeats + 1):  # version 0 warms the streams up
            message = parameters_of_size(size_mb, version)
            started = time.perf_counter()
            data = message.encode()
            encode_s = time.perf_counter() - started
            started = time.perf_counter()
            servicer.parameters.publish(version, data)
            for thread in threads:
                assert thread.wait_for_newer(("bench", version - 1), timeout=300) is not None
            if version > 0:
                times.append(time.perf_counter() - started)
    finally:
        for thread in threads:
            thread.stop()
        for client in clients:
            client.close()
        servicer.stopping.set()
        server.stop(grace=None)
    return times, encode_s


def rollout_upload_seconds(size_mb: float, repeats: int) -> tuple[list[float], float, int]:
    """(seconds per upload until the learner accepted it, encode seconds, payload bytes)."""
    transport = TransportConfig(port=0)
    times, encode_s, size = [], 0.0, 0
    for version in range(repeats + 1):
        message, spec = rollout_of_size(size_mb, version)
        servicer = LearnerServicer(ParameterBoard(), RolloutBoard(), spec, max_upload_bytes=1 << 34)
        server, port = start_learner_server(transport, servicer)
        client = LearnerClient(TransportConfig(port=port), 0)
        assert client.ready(timeout=30)  # connection set up before the clock starts
        servicer.rollouts.open("bench", version, 1)
        try:
            started = time.perf_counter()
            data = message.encode()
            encode_s, size = time.perf_counter() - started, len(data)
            started = time.perf_counter()
            client.upload(data, timeout=600)
            if version > 0:
                times.append(time.perf_counter() - started)
        finally:
            client.close()
            servicer.stopping.set()
            server.stop(grace=None)
    return times, encode_s, size


def bandwidth_rows(sizes_mb: list[float], repeats: int) -> list[dict]:
    rows = []
    for size_mb in sizes_mb:
        data = parameters_of_size(size_mb).encode()
        raw = statistics.median(raw_socket_seconds(data) for _ in range(repeats))
        one, encode_params = parameter_broadcast_seconds(size_mb, 1, repeats)
        four, _ = parameter_broadcast_seconds(size_mb, 4, repeats)
        upload, encode_rollout, rollout_bytes = rollout_upload_seconds(size_mb, repeats)
        raw_rollout = statistics.median(raw_socket_seconds(bytes(rollout_bytes)) for _ in range(repeats))
        mb = len(data) / 1e6
        row = {
            "payload_mb": round(mb, 1),
            "raw_socket_mb_s": mb / raw,
            "params_1_actor_mb_s": mb / statistics.median(one),
            "params_4_actors_total_mb_s": 4 * mb / statistics.median(four),
            "params_encode_s": encode_params,
            "rollout_mb": round(rollout_bytes / 1e6, 1),
            "rollout_upload_mb_s": rollout_bytes / 1e6 / statistics.median(upload),
            "rollout_raw_socket_mb_s": rollout_bytes / 1e6 / raw_rollout,
            "rollout_encode_s": encode_rollout,
        }
        row["params_ratio"] = row["params_1_actor_mb_s"] / row["raw_socket_mb_s"]
        row["rollout_ratio"] = row["rollout_upload_mb_s"] / row["rollout_raw_socket_mb_s"]
        rows.append(row)
        print(
            f"{mb:7.1f} MB  raw {row['raw_socket_mb_s']:7.0f} MB/s | "
            f"params→1 {row['params_1_actor_mb_s']:6.0f} "
            f"({row['params_ratio']:.2f}×) params→4 total {row['params_4_actors_total_mb_s']:6.0f} | "
            f"rollout {row['rollout_mb']:.0f} MB up {row['rollout_upload_mb_s']:6.0f} MB/s "
            f"({row['rollout_ratio']:.2f}×)",
            flush=True,
        )
    return rows


# ---- end to end -----------------------------------------------------------------------------------------


def common_flags(policy_dir: Path, num_envs: int, decisions: int) -> list[str]:
    return [
        f"--policy.path={policy_dir}",
        "--env.type=metaworld_state",
        "--env.task=reach-v3",
        "--env.episode_length=100",
        f"--rollout.num_envs={num_envs}",
        f"--rollout.decisions_per_env={decisions}",
        "--rollout.sparse_reward=false",
        "--algorithm.minibatch_size=256",
        "--algorithm.micro_batch_size=256",
        "--device=cpu",
    ]


def training_flags(output_dir: Path, iterations: int) -> list[str]:
    return [
        f"--output_dir={output_dir}",
        f"--iterations={iterations}",
        "--save_freq=0",
        "--eval.freq=0",
        "--eval.n_episodes=2",
        "--eval.batch_size=2",
        "--eval.videos=0",
    ]


def steady_state_sps(metrics_path: Path) -> tuple[float, float]:
    """(env steps/s over iterations 2.., mean seconds per iteration)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    rows = [r for r in rows if r["iteration"] >= 1]
    first, last = rows[0], rows[-1]
    seconds = last["time_s"] - first["time_s"]
    return (last["env_steps"] - first["env_steps"]) / seconds, seconds / (len(rows) - 1)


def run_trainer(work: Path, common: list[str], iterations: int, tag: str) -> tuple[float, float]:
    output = work / f"trainer_{tag}"
    process = start_cli(
        "lerobot-pirl-train", [*common, *training_flags(output, iterations)], work / f"{tag}.log"
    )
    process.join(1800)
    return steady_state_sps(output / "metrics.jsonl")


def run_learner_and_actors(
    work: Path, common: list[str], iterations: int, actors: int, tag: str
) -> tuple[float, float]:
    output, port = work / f"actors{actors}_{tag}", free_port()
    transport = [f"--transport.port={port}"]
    learner = start_cli(
        "lerobot-pirl-learner",
        [*common, *transport, *training_flags(output, iterations), f"--transport.num_actors={actors}"],
        work / f"learner{actors}_{tag}.log",
    )
    actor_processes = [
        start_cli(
            "lerobot-pirl-actor",
            [
                *common,
                *transport,
                f"--transport.token_file={output / TOKEN_FILE}",
                f"--transport.actor_id={a}",
            ],
            work / f"actor{actors}_{a}_{tag}.log",
        )
        for a in range(actors)
    ]
    learner.join(1800)
    for process in actor_processes:
        process.join(60)
        if process.is_alive():
            process.kill()
    return steady_state_sps(output / "metrics.jsonl")


def end_to_end_rows(
    actor_counts: list[int], num_envs: int, decisions: int, iterations: int, rounds: int
) -> list[dict]:
    """Every setup once per round, rounds one after the other (load from other jobs hits all setups)."""
    work = Path(tempfile.mkdtemp(prefix="pirl_transport_bench_"))
    policy_dir = save_tiny_flow_mlp(work / "policy")
    common = common_flags(policy_dir, num_envs, decisions)
    setups = [("lerobot-pirl-train (1 process)", 0)] + [(f"learner + {n} actors", n) for n in actor_counts]
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in setups}
    for round_index in range(rounds):
        for name, actors in setups:
            tag = f"r{round_index}"
            if actors == 0:
                result = run_trainer(work, common, iterations, tag)
            else:
                result = run_learner_and_actors(work, common, iterations, actors, tag)
            measured[name].append(result)
            print(
                f"round {round_index}: {name}: {result[0]:7.0f} env steps/s, {result[1]:.2f} s/iteration",
                flush=True,
            )
    rows = []
    for name, actors in setups:
        sps = [m[0] for m in measured[name]]
        rows.append(
            {
                "setup": name,
                "actors": actors,
                "env_steps_per_s_median": statistics.median(sps),
                "env_steps_per_s_rounds": sps,
                "s_per_iteration_median": statistics.median(m[1] for m in measured[name]),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes_mb", type=float, nargs="+", default=[4, 64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--num_envs", type=int, default=4, help="envs per actor (and of the trainer)")
    parser.add_argument("--decisions", type=int, default=25, help="decisions per env and iteration")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="end-to-end repetitions of every setup")
    parser.add_argument("--skip_end_to_end", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "bandwidth": bandwidth_rows(args.sizes_mb, args.repeats),
    }
    if not args.skip_end_to_end:
        result["end_to_end"] = {
            "num_envs_per_process": args.num_envs,
            "decisions_per_env": args.decisions,
            "iterations": args.iterations,
            "rows": end_to_end_rows(args.actors, args.num_envs, args.decisions, args.iterations, args.rounds),
        }
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
