"""Learner memory under uploads that never finish (issue 17): the RSS of a learner server while clients
send most of a large rollout upload and then hold the stream open without its last chunk.

    python benchmarks/stalled_uploads.py [--mib 1024] [--clients 3] [--rounds 2] [--timeout-s 20]

The server runs in this process with the learner's limits (`--transport.upload_timeout_s`, one upload in
flight per actor id); the clients are other processes, so their buffers do not count. Times are from
the clients' start: when the server held every byte sent, and when it had dropped them all. Prints a table and
writes benchmarks/results/stalled_uploads.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import platform
import threading
import time
from pathlib import Path

import psutil

from lerobot_pirl.distributed.config import TransportConfig
from lerobot_pirl.distributed.payloads import MIB
from lerobot_pirl.distributed.transport import (
    LearnerServicer,
    ParameterBoard,
    RolloutBoard,
    start_learner_server,
)

RESULTS = Path(__file__).parent / "results" / "stalled_uploads.json"


def stall(port: int, actor_id: int, mib: int, hold_s: float) -> None:
    """Client process: `mib` 1 MiB chunks of one upload, never the last, then hold the stream open.
    A raw stub of LeRobot's proto (no torch import), as a hostile client would write it."""
    import grpc
    from lerobot.transport import services_pb2, services_pb2_grpc

    from lerobot_pirl.distributed.transport import ACTOR_ID_METADATA

    stub = services_pb2_grpc.LearnerServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    chunk = b"x" * MIB

    def chunks():
        yield services_pb2.Transition(transfer_state=services_pb2.TransferState.TRANSFER_BEGIN, data=chunk)
        for _ in range(mib - 1):
            yield services_pb2.Transition(
                transfer_state=services_pb2.TransferState.TRANSFER_MIDDLE, data=chunk
            )
        time.sleep(hold_s)

    with contextlib.suppress(grpc.RpcError):  # the learner drops the upload: what is measured
        stub.SendTransitions(chunks(), metadata=[(ACTOR_ID_METADATA, str(actor_id))], timeout=hold_s + 600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="MiB each client sends before it stalls")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=60.0, help="the learner's upload timeout")
    args = parser.parse_args()

    process = psutil.Process()
    servicer = LearnerServicer(
        ParameterBoard(),
        RolloutBoard(),
        None,
        max_upload_bytes=2 * args.mib * MIB,
        num_actors=args.clients,
        upload_timeout_s=args.timeout_s,
    )
    server, port = start_learner_server(TransportConfig(port=0, num_actors=args.clients), servicer)
    peak = [0]
    sampling = threading.Event()

    def sample_rss():
        while not sampling.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.05)

    threading.Thread(target=sample_rss, daemon=True).start()
    rows = []
    context = multiprocessing.get_context("spawn")
    try:
        for round_index in range(args.rounds):
            before = process.memory_info().rss
            peak[0] = before
            started = time.monotonic()
            clients = [
                context.Process(target=stall, args=(port, a, args.mib, 3 * args.timeout_s))
                for a in range(args.clients)
            ]
            for client in clients:
                client.start()
            target = args.clients * args.mib * MIB
            while servicer.upload_bytes_in_flight < target and time.monotonic() - started < args.timeout_s:
                time.sleep(0.05)
            buffered, buffered_at = servicer.upload_bytes_in_flight, time.monotonic()
            while servicer.upload_bytes_in_flight > 0 and time.monotonic() - started < 4 * args.timeout_s:
                time.sleep(0.1)
            dropped_after = time.monotonic() - started
            time.sleep(1.0)
            after = process.memory_info().rss
            for client in clients:
                client.kill()
                client.join()
            rows.append(
                {
                    "round": round_index + 1,
                    "rss_before_mib": before / MIB,
                    "rss_peak_mib": peak[0] / MIB,
                    "rss_after_drop_mib": after / MIB,
                    "buffered_mib": buffered / MIB,
                    "in_flight_after_mib": servicer.upload_bytes_in_flight / MIB,
                    "buffered_after_s": buffered_at - started,
                    "dropped_after_s": dropped_after,
                }
            )
    finally:
        sampling.set()
        servicer.stopping.set()
        server.stop(grace=None)

    columns = (("round", 5), ("RSS before", 11), ("peak", 9), ("after drop", 11), ("buffered", 9), ("at", 7))
    header = " ".join(f"{name:>{width}}" for name, width in (*columns, ("dropped at", 11)))
    print(f"{args.clients} clients x {args.mib} MiB never finished, upload timeout {args.timeout_s:.0f} s")
    print(header)
    for row in rows:
        print(
            f"{row['round']:>5} {row['rss_before_mib']:>9.0f} M {row['rss_peak_mib']:>7.0f} M "
            f"{row['rss_after_drop_mib']:>9.0f} M {row['buffered_mib']:>7.0f} M "
            f"{row['buffered_after_s']:>5.1f} s {row['dropped_after_s']:>9.1f} s"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "command": f"python benchmarks/stalled_uploads.py --mib {args.mib} --clients {args.clients} "
                f"--rounds {args.rounds} --timeout-s {args.timeout_s}",
                "machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores",
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
