"""The learner <-> actor link over LeRobot's gRPC `LearnerService` (lerobot/transport/services.proto).

LeRobot's proto has four RPCs that carry byte blobs cut into 2 MiB chunks (its `send_bytes_in_chunks`
/ `receive_bytes_in_chunks`); we keep the proto and the chunking and give the RPCs on-policy meaning:

    StreamParameters(Empty) -> stream Parameters    every version the learner publishes, to EVERY
                                                    connected actor (the latest one first on connect)
    SendTransitions(stream Transition) -> Empty     one actor's rollout of one version
    SendInteractions(stream InteractionMessage)     small JSON events (an actor saying hello), logged
    Ready(Empty) -> Empty                           reachability probe

LeRobot's stock servicer (lerobot/rl/learner_service.py) feeds one shared queue, so of N actors only
one would get each version; ours keeps the latest version on a board that every stream reads.
gRPC metadata carries what the Empty requests cannot: the actor id, the actor process's instance id
and the run's token. Payloads are `payloads.py` messages (safetensors + JSON); anything malformed,
oversized, or for another version is refused with a gRPC status and a logged error, and the server
keeps serving.

What one client can hold (issue 17): every RPC needs the run's token; only the run's actor ids get a
parameter stream, one each; and each id has at most one upload in flight, dropped when it is not complete
within --transport.upload_timeout_s. So the learner buffers at most num_actors x max_upload_mb of uploads.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import grpc
from lerobot.transport import services_pb2, services_pb2_grpc
from lerobot.transport.utils import (
    MAX_MESSAGE_SIZE,
    grpc_channel_options,
    receive_bytes_in_chunks,
    send_bytes_in_chunks,
)

from lerobot_pirl.distributed.config import TOKEN_ENV, TOKEN_FILE, TransportConfig, is_loopback
from lerobot_pirl.distributed.payloads import (
    DUPLICATE,
    MALFORMED,
    MIB,
    STALE,
    TOO_LARGE,
    UNKNOWN_ACTOR,
    ParametersMessage,
    PayloadError,
    RolloutMessage,
    RolloutSpec,
)

logger = logging.getLogger(__name__)

ACTOR_ID_METADATA = "x-lerobot-pirl-actor"
INSTANCE_METADATA = "x-lerobot-pirl-instance"  # one per actor process: tells a reconnect from a duplicate
TOKEN_METADATA = "x-lerobot-pirl-token"
MAX_EVENT_BYTES = 64 * 1024
STATUS_FOR_REASON = {
    MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    STALE: grpc.StatusCode.FAILED_PRECONDITION,
    DUPLICATE: grpc.StatusCode.ALREADY_EXISTS,
    UNKNOWN_ACTOR: grpc.StatusCode.INVALID_ARGUMENT,
}


def receive_payload(
    chunks: Iterator,
    max_bytes: int,
    shutdown: threading.Event,
    on_chunk: Callable[[int], None] | None = None,
) -> bytes | None:
    """One chunked payload from a gRPC stream (LeRobot's receiver), refused once it exceeds max_bytes.
    `on_chunk(size)` is told each chunk's size as it arrives.

    Returns None when the stream ends before a complete payload. Raises PayloadError when the stream
    is oversized or not a valid chunk sequence.
    """

    def bounded() -> Iterator:
        received = 0
        for chunk in chunks:
            received += len(chunk.data)
            if received > max_bytes:
                raise PayloadError(TOO_LARGE, f"payload exceeds {max_bytes / MIB:.1f} MiB")
            if on_chunk is not None:
                on_chunk(len(chunk.data))
            yield chunk

    try:
        return receive_bytes_in_chunks(bounded(), None, shutdown, log_prefix="[lerobot-pirl]")
    except BaseException as error:
        # The receiver's finished frame holds the partial payload, in a reference cycle with this error
        # that only a garbage collection would free: clear it now (issue 17: 3 GB kept per round).
        traceback.clear_frames(error.__traceback__)
        if not isinstance(error, ValueError) or isinstance(error, PayloadError):
            raise
        raise PayloadError(MALFORMED, str(error)) from error  # LeRobot's receiver: unknown transfer state


def invocation_metadata(context: grpc.ServicerContext) -> dict[str, str]:
    return {item.key: item.value for item in context.invocation_metadata() if isinstance(item.value, str)}


# ---- learner side -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedParameters:
    version: int
    chunks: tuple  # an encoded ParametersMessage as LeRobot's Parameters chunks, cut once for all streams
    finished: bool


class ParameterBoard:
    """The latest published parameters; every actor stream waits here for a newer version."""

    def __init__(self):
        self._condition = threading.Condition()
        self._latest: PublishedParameters | None = None

    def publish(self, version: int, data: bytes, finished: bool = False) -> None:
        chunks = tuple(send_bytes_in_chunks(data, services_pb2.Parameters, log_prefix="[parameters]"))
        with self._condition:
            self._latest = PublishedParameters(version, chunks, finished)
            self._condition.notify_all()

    def wait_for_newer(self, than_version: int | None, timeout: float) -> PublishedParameters | None:
        with self._condition:
            self._condition.wait_for(
                lambda: (
                    self._latest is not None
                    and (than_version is None or self._latest.version > than_version or self._latest.finished)
                ),
                timeout=timeout,
            )
            latest = self._latest
        if latest is None or (
            than_version is not None and latest.version <= than_version and not latest.finished
        ):
            return None
        return latest


@dataclass
class RoundResult:
    rollouts: list[RolloutMessage]  # sorted by actor id
    expected: int
    wait_s: float  # from opening the round to returning
    timed_out: bool  # proceeded without every actor


class RolloutBoard:
    """Collects the rollouts of the open (run, version) round, one per actor id."""

    def __init__(self):
        self._condition = threading.Condition()
        self._round: tuple[str, int, int] | None = None  # (run_id, version, num_actors)
        self._received: dict[int, RolloutMessage] = {}
        self._opened_at = 0.0
        self._first_arrival: float | None = None

    def open(self, run_id: str, version: int, num_actors: int) -> None:
        with self._condition:
            self._round = (run_id, version, num_actors)
            self._received = {}
            self._opened_at = time.monotonic()
            self._first_arrival = None

    def submit(self, message: RolloutMessage) -> None:
        """Accept `message` for the open round or raise PayloadError (stale, duplicate, unknown actor)."""
        with self._condition:
            if self._round is None or (message.run_id, message.version) != self._round[:2]:
                current = (
                    "none" if self._round is None else f"version {self._round[1]} of run {self._round[0]}"
                )
                raise PayloadError(
                    STALE,
                    f"rollout for version {message.version} of run {message.run_id}; collecting {current}",
                )
            if message.actor_id >= self._round[2]:
                raise PayloadError(
                    UNKNOWN_ACTOR, f"actor id {message.actor_id} >= --transport.num_actors={self._round[2]}"
                )
            if message.actor_id in self._received:
                raise PayloadError(
                    DUPLICATE, f"actor {message.actor_id} already sent version {message.version}"
                )
            self._received[message.actor_id] = message
            if self._first_arrival is None:
                self._first_arrival = time.monotonic()
            self._condition.notify_all()

    def wait(
        self, straggler_timeout_s: float, stop: threading.Event, report_every_s: float = 30.0
    ) -> RoundResult | None:
        """Block until every actor's rollout arrived, or `straggler_timeout_s` after the first one did.

        With nothing arrived it waits on (an update needs data) and says so every `report_every_s`.
        Closes the round: later uploads for it are stale. Returns None if `stop` was set.
        """
        last_report = time.monotonic()
        with self._condition:
            if self._round is None:
                raise RuntimeError("open() a round before waiting for it")
            run_id, version, expected = self._round
            while not stop.is_set():
                now = time.monotonic()
                arrived = len(self._received)
                if arrived == expected:
                    break
                if self._first_arrival is not None and now - self._first_arrival >= straggler_timeout_s:
                    break
                if now - last_report >= report_every_s:
                    logger.info(
                        "version %d: %d/%d actor rollouts so far, waiting", version, arrived, expected
                    )
                    last_report = now
                deadline = (
                    self._first_arrival + straggler_timeout_s
                    if self._first_arrival is not None
                    else now + 1.0
                )
                self._condition.wait(timeout=max(0.01, min(1.0, deadline - now)))
            self._round = None
            if stop.is_set():
                return None
            rollouts = [self._received[a] for a in sorted(self._received)]
            return RoundResult(
                rollouts, expected, time.monotonic() - self._opened_at, len(rollouts) < expected
            )


class HeldStream(NamedTuple):
    """The parameter stream an actor id holds: which actor process, which stream, its call."""

    instance: str
    number: int
    context: grpc.ServicerContext


class LearnerServicer(services_pb2_grpc.LearnerServiceServicer):
    """Our servicer of LeRobot's LearnerService proto: broadcast parameters, validate rollouts."""

    def __init__(
        self,
        parameters: ParameterBoard,
        rollouts: RolloutBoard,
        spec: RolloutSpec | None,
        max_upload_bytes: int,
        token: str | None = None,
        on_event: Callable[[dict], None] | None = None,
        num_actors: int | None = None,
        upload_timeout_s: float = 600.0,
    ):
        self.parameters = parameters
        self.rollouts = rollouts
        self.spec = spec
        self.max_upload_bytes = max_upload_bytes
        self.token = token or None
        self.on_event = on_event
        self.stopping = threading.Event()
        self.rejected = 0  # payloads refused so far (tests and logs read it)
        self._streams_lock = threading.Lock()
        self.open_streams = 0
        # Parameter streams: ids 0..num_actors-1 only, one stream per id, so no client can hold the server's
        # worker threads with streams (issue 17: 12 held streams stalled a real actor). A reconnect of the
        # same actor process replaces its stream; another process with a held id is refused.
        self.actor_ids = None if num_actors is None else {str(i) for i in range(num_actors)}
        self._stream_of_actor: dict[str, HeldStream] = {}
        self._streams_opened = 0
        self.upload_timeout_s = upload_timeout_s
        self._uploading: set[str] = set()  # actor ids with an upload in flight
        self.upload_bytes_in_flight = 0  # bytes buffered by uploads in progress (tests read it)

    def _authorize(self, context: grpc.ServicerContext) -> dict[str, str]:
        metadata = invocation_metadata(context)
        if self.token is not None and not hmac.compare_digest(
            metadata.get(TOKEN_METADATA, "").encode(), self.token.encode()
        ):
            logger.error("refused %s: missing or wrong %s token", context.peer(), TOKEN_ENV)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong token (${TOKEN_ENV})")
        return metadata

    def _refuse(self, context: grpc.ServicerContext, what: str, error: PayloadError) -> None:
        with self._streams_lock:
            self.rejected += 1
        # A late rollout (the actor collected for a version or learner run that has moved on) is part of
        # normal operation after a timeout or a restart; anything else is a broken or hostile client.
        level = logging.WARNING if error.reason in (STALE, DUPLICATE) else logging.ERROR
        logger.log(level, "refused %s from %s: %s", what, context.peer(), error)
        context.abort(STATUS_FOR_REASON.get(error.reason, grpc.StatusCode.INVALID_ARGUMENT), str(error))

    def _known_actor(self, metadata: dict[str, str], context: grpc.ServicerContext, what: str) -> str:
        actor = metadata.get(ACTOR_ID_METADATA, "?")
        if self.actor_ids is not None and actor not in self.actor_ids:
            logger.error("refused %s from %s: unknown actor id %r", what, context.peer(), actor)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown actor id {actor!r}")
        return actor

    def Ready(self, request, context):  # noqa: N802 (the proto's names)
        self._authorize(context)
        return services_pb2.Empty()

    def StreamParameters(self, request, context):  # noqa: N802
        metadata = self._authorize(context)
        actor = self._known_actor(metadata, context, "a parameter stream")
        instance = metadata.get(INSTANCE_METADATA, "")
        with self._streams_lock:
            holder = self._stream_of_actor.get(actor)
            duplicate = holder is not None and holder.instance != instance and holder.context.is_active()
            if not duplicate:
                self.open_streams += 1
                self._streams_opened += 1
                stream = self._streams_opened
                self._stream_of_actor[actor] = HeldStream(instance, stream, context)
        if duplicate:
            # Two processes with one --transport.actor_id would collect the same episodes (issue 17).
            logger.error(
                "refused actor %s from %s: that actor id is connected already", actor, context.peer()
            )
            context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"actor id {actor} is already connected (from {holder.context.peer()}); give each actor "
                "its own --transport.actor_id",
            )
        context.send_initial_metadata(())  # lets the actor know at once that it is connected
        logger.info(
            "actor %s connected from %s%s",
            actor,
            context.peer(),
            " (its earlier stream is closed)" if holder is not None else "",
        )
        try:
            sent_version = None
            while (
                context.is_active()
                and not self.stopping.is_set()
                and self._stream_of_actor[actor].number == stream
            ):
                published = self.parameters.wait_for_newer(sent_version, timeout=0.5)
                if published is None:
                    continue
                yield from published.chunks
                sent_version = published.version
                if published.finished:
                    return
        finally:
            with self._streams_lock:
                self.open_streams -= 1
                if actor in self._stream_of_actor and self._stream_of_actor[actor].number == stream:
                    del self._stream_of_actor[actor]
            logger.info("actor %s stream closed", actor)

    def SendTransitions(self, request_iterator, context):  # noqa: N802
        actor = self._known_actor(self._authorize(context), context, "an upload")
        with self._streams_lock:
            busy = actor in self._uploading
            self._uploading.add(actor)
        if busy:
            logger.warning("refused an upload from %s: actor %s has one in flight", context.peer(), actor)
            context.abort(grpc.StatusCode.ABORTED, f"actor {actor} has an upload in flight; retry after it")
        # A client that stops sending would hold its buffer and a worker thread for good: drop the upload
        # when it is not complete in time (the actor's own deadline for it is the same).
        watchdog = threading.Timer(self.upload_timeout_s, context.cancel)
        watchdog.daemon = True
        watchdog.start()
        received = [0]
        try:
            data = receive_payload(
                request_iterator, self.max_upload_bytes, self.stopping, self._counted(received)
            )
            if data is None:
                raise PayloadError(MALFORMED, "the upload ended before its last chunk")
            started = time.perf_counter()
            message = RolloutMessage.decode(data, self.max_upload_bytes, self.spec)
            if self.actor_ids is not None and str(message.actor_id) != actor:
                raise PayloadError(MALFORMED, f"actor {actor} sent a rollout of actor {message.actor_id}")
            self.rollouts.submit(message)
        except PayloadError as error:
            self._refuse(context, "a rollout", error)
            return services_pb2.Empty()  # not reached: abort raised
        except grpc.RpcError:  # the actor went away mid-upload (killed, network), or the watchdog fired
            logger.warning("an upload from %s broke off after %.1f MiB", context.peer(), received[0] / MIB)
            return services_pb2.Empty()
        finally:
            watchdog.cancel()
            with self._streams_lock:
                self._uploading.discard(actor)
                self.upload_bytes_in_flight -= received[0]
        logger.info(
            "rollout of actor %d for version %d: %d env steps, %.1f MiB (decoded in %.2f s)",
            message.actor_id,
            message.version,
            message.env_steps,
            len(data) / MIB,
            time.perf_counter() - started,
        )
        return services_pb2.Empty()

    def _counted(self, received: list[int]) -> Callable[[int], None]:
        """Adds each chunk's size to `received[0]` and to the learner's bytes in flight."""

        def count(size: int) -> None:
            with self._streams_lock:
                received[0] += size
                self.upload_bytes_in_flight += size

        return count

    def SendInteractions(self, request_iterator, context):  # noqa: N802
        self._authorize(context)
        try:
            data = receive_payload(request_iterator, MAX_EVENT_BYTES, self.stopping)
            try:
                event = json.loads(data or b"")
            except (ValueError, RecursionError) as error:
                raise PayloadError(MALFORMED, f"event is not JSON ({error})") from error
            if not isinstance(event, dict):
                raise PayloadError(MALFORMED, "event is not a JSON object")
        except PayloadError as error:
            self._refuse(context, "an event", error)
            return services_pb2.Empty()  # not reached: abort raised
        except grpc.RpcError:
            return services_pb2.Empty()
        logger.info("event from %s: %s", context.peer(), json.dumps(event)[:500])
        if self.on_event is not None:
            self.on_event(event)
        return services_pb2.Empty()


def _read(path: Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def learner_token(transport: TransportConfig, output_dir: Path) -> tuple[str, str]:
    """The run's token and the flag that gives it to actors: $LEROBOT_PIRL_TOKEN, --transport.token_file,
    or <output_dir>/transport_token, made (mode 0600) at the run's first start and kept for its resumes."""
    from lerobot_pirl.runtime.config import ConfigError

    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV], f"${TOKEN_ENV} (as set for the learner)"
    path = Path(transport.token_file) if transport.token_file is not None else Path(output_dir) / TOKEN_FILE
    if transport.token_file is None and not path.exists():
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        os.replace(staging, path)
    token = path.read_text().strip()
    if not token:
        raise ConfigError(f"the token file {path} is empty")
    return token, f"--transport.token_file={path.resolve()}"


def actor_token(transport: TransportConfig, timeout_s: float) -> str | None:
    """The token this actor presents: $LEROBOT_PIRL_TOKEN, else --transport.token_file, waited for while
    the learner (which writes it once its policy is loaded) has not made it yet."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    if transport.token_file is None:
        return None
    path, deadline = Path(transport.token_file), time.monotonic() + timeout_s
    if not path.exists():
        logger.info("waiting for the learner's token file %s", path)
    while not path.exists():
        if time.monotonic() > deadline:
            raise LearnerRefusedError(f"--transport.token_file={path} did not appear in {timeout_s:.0f} s")
        time.sleep(0.5)
    return path.read_text().strip()


def start_learner_server(transport: TransportConfig, servicer: LearnerServicer) -> tuple[grpc.Server, int]:
    """Serve `servicer` on transport.host:port (port 0 picks a free one); returns (server, bound port)."""
    from lerobot_pirl.runtime.config import ConfigError

    # One worker per actor stream (held for the actor's life) + concurrent uploads + spare for restarts.
    workers = 2 * transport.num_actors + 8
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
        ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
        ("grpc.so_reuseport", 0),  # a second learner on the same port must fail, not share it
        ("grpc.keepalive_permit_without_calls", 1),  # actors ping to notice a dead learner
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
        # The learner pings too: the stream of an actor whose machine vanished ends within ~30 s, and a
        # restarted actor with its id is then not taken for a duplicate.
        ("grpc.keepalive_time_ms", 20000),
        ("grpc.keepalive_timeout_ms", 10000),
    ]
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="learner-rpc"), options=options
    )
    services_pb2_grpc.add_LearnerServiceServicer_to_server(servicer, server)
    if transport.learner_uses_tls:
        credentials = grpc.ssl_server_credentials([(_read(transport.tls_key), _read(transport.tls_cert))])
        bind = server.add_secure_port
        bound = bind(transport.address, credentials)
    else:
        bound = server.add_insecure_port(transport.address)
    if not bound:
        raise ConfigError(f"could not listen on {transport.address} (in use?)")
    server.start()
    scheme = "TLS" if transport.learner_uses_tls else "plaintext"
    logger.info("learner serving LearnerService on %s:%d (%s)", transport.host, bound, scheme)
    if not is_loopback(transport.host) and not transport.learner_uses_tls:  # --transport.insecure=true
        logger.warning(
            "listening on %s without TLS (--transport.insecure): the parameters, the token and the rollouts "
            "cross the network in the clear",
            transport.host,
        )
    return server, bound


# ---- actor side ---------------------------------------------------------------------------------------


REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
# A parameter stream refused for good: an actor id outside the run's, or one another actor holds.
STREAM_REFUSED = (*REFUSED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS)


class LearnerRefusedError(RuntimeError):
    """The learner refused this actor (wrong token, unknown or duplicate actor id): retrying cannot help."""


def refusal_message(error: grpc.RpcError) -> str:
    """The one line an actor ends with when the learner refuses it."""
    if error.code() not in REFUSED:
        return f"the learner refused this actor: {error.details()}"
    return (
        f"the learner refused this actor: wrong token ({error.details()}); pass the "
        f"--transport.token_file=<learner output_dir>/{TOKEN_FILE} the learner logged, or set ${TOKEN_ENV}"
    )


class LearnerClient:
    """An actor's channel to the learner: the parameter stream, uploads, events."""

    def __init__(self, transport: TransportConfig, actor_id: int, token: str | None = None):
        """`token`: the run's token (default: $LEROBOT_PIRL_TOKEN)."""
        backoff_ms = int(1000 * transport.reconnect_max_backoff_s)
        options = [
            *grpc_channel_options(),
            ("grpc.keepalive_time_ms", 20000),
            ("grpc.keepalive_timeout_ms", 10000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.initial_reconnect_backoff_ms", min(200, backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
        ]
        if transport.tls_server_name:
            options.append(("grpc.ssl_target_name_override", transport.tls_server_name))
        if transport.actor_uses_tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=_read(transport.tls_ca))
            self.channel = grpc.secure_channel(transport.address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(transport.address, options=options)
        self.stub = services_pb2_grpc.LearnerServiceStub(self.channel)
        self.metadata = [(ACTOR_ID_METADATA, str(actor_id)), (INSTANCE_METADATA, uuid.uuid4().hex)]
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        if token:
            self.metadata.append((TOKEN_METADATA, token))
        # Reachability from our own calls' outcomes (gRPC's connectivity watcher thread errors out
        # when its channel is closed under it): an open parameter stream counts as reachable.
        self._unreachable_since: float | None = time.monotonic()
        self._state_lock = threading.Lock()

    def mark_reachable(self) -> None:
        with self._state_lock:
            self._unreachable_since = None

    def note_error(self, error: grpc.RpcError) -> None:
        """A call failed; connection-level failures start (or continue) the unreachable clock."""
        if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            with self._state_lock:
                if self._unreachable_since is None:
                    self._unreachable_since = time.monotonic()

    def unreachable_for(self) -> float:
        """Seconds since the learner was last reachable (0 while connected)."""
        with self._state_lock:
            return 0.0 if self._unreachable_since is None else time.monotonic() - self._unreachable_since

    def ready(self, timeout: float) -> bool:
        """Whether the learner answers; raises LearnerRefusedError when it refuses this actor."""
        try:
            self.stub.Ready(services_pb2.Empty(), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            if error.code() in REFUSED:
                raise LearnerRefusedError(refusal_message(error)) from error
            self.note_error(error)
            return False
        self.mark_reachable()
        return True

    def stream_parameters(self):
        """The parameter stream, once the learner answered (it sends headers at once); raises RpcError."""
        call = self.stub.StreamParameters(services_pb2.Empty(), metadata=self.metadata)
        try:
            call.initial_metadata()
        except grpc.RpcError as error:
            self.note_error(error)
            raise
        self.mark_reachable()
        return call

    def upload(self, data: bytes, timeout: float) -> None:
        """Send one rollout; raises grpc.RpcError (the learner's refusal reason is in its details)."""
        chunks = send_bytes_in_chunks(data, services_pb2.Transition, log_prefix="[rollout]")
        try:
            self.stub.SendTransitions(chunks, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            self.note_error(error)
            raise
        self.mark_reachable()

    def send_event(self, event: dict, timeout: float = 10.0) -> bool:
        data = json.dumps(event).encode()
        try:
            chunks = send_bytes_in_chunks(data, services_pb2.InteractionMessage, log_prefix="[event]")
            self.stub.SendInteractions(chunks, timeout=timeout, metadata=self.metadata)
            return True
        except grpc.RpcError:
            return False

    def close(self) -> None:
        self.channel.close()


class ParameterReceiver(threading.Thread):
    """Background thread: keeps the learner's parameter stream open (reconnecting with exponential
    backoff) and holds the newest decoded version; the actor's loop takes it when it is ready."""

    def __init__(self, client: LearnerClient, max_bytes: int, max_backoff_s: float):
        super().__init__(name="parameter-receiver", daemon=True)
        self.client = client
        self.max_bytes = max_bytes
        self.max_backoff_s = max_backoff_s
        self._stop_event = threading.Event()
        self._condition = threading.Condition()
        self._latest: ParametersMessage | None = None
        self._call = None
        self.refused: str | None = None  # why the learner refused this actor; retrying cannot help

    @property
    def latest(self) -> ParametersMessage | None:
        with self._condition:
            return self._latest

    def wait_for_newer(self, than_key: tuple[str, int] | None, timeout: float) -> ParametersMessage | None:
        with self._condition:
            newer = lambda: self._latest is not None and self._latest.key != than_key  # noqa: E731
            self._condition.wait_for(lambda: self.refused is not None or newer(), timeout=timeout)
            latest = self._latest
        return latest if latest is not None and latest.key != than_key else None

    def run(self) -> None:
        backoff = 0.2
        while not self._stop_event.is_set():
            try:
                self._call = self.client.stream_parameters()
                while not self._stop_event.is_set():
                    data = receive_payload(self._call, self.max_bytes, self._stop_event)
                    if data is None:
                        break  # the learner closed the stream (it is stopping)
                    message = ParametersMessage.decode(data, self.max_bytes)
                    with self._condition:
                        self._latest = message
                        self._condition.notify_all()
                    backoff = 0.2
                    if message.finished:
                        return
            except grpc.RpcError as error:
                if self._stop_event.is_set():
                    return
                if error.code() in STREAM_REFUSED:  # issue 17: these used to be retried forever
                    with self._condition:
                        self.refused = refusal_message(error)
                        self._condition.notify_all()
                    return
                self.client.note_error(error)
                logger.warning("learner unreachable (%s); retrying in %.1f s", error.code().name, backoff)
            except PayloadError as error:
                logger.error("refused parameters from the learner: %s", error)
            self._stop_event.wait(backoff)
            backoff = min(2 * backoff, self.max_backoff_s)

    def stop(self) -> None:
        self._stop_event.set()
        if self._call is not None:
            self._call.cancel()
