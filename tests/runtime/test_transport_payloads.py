"""The learner/actor wire format and server: round trips, refusals, fuzzing, TLS, token.

Everything here runs in one process on a free localhost port; no env or policy is built.
"""

import contextlib
import gc
import json
import shutil
import subprocess
import threading
import time

import grpc
import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lerobot.transport import services_pb2
from lerobot.transport.utils import send_bytes_in_chunks

from lerobot_pirl.distributed.config import TOKEN_ENV, TransportConfig
from lerobot_pirl.distributed.payloads import (
    MALFORMED,
    STALE,
    TOO_LARGE,
    ParametersMessage,
    PayloadError,
    RolloutMessage,
    RolloutSpec,
    encode_payload,
    load_trainable_state,
    within_magnitude,
)
from lerobot_pirl.distributed.transport import (
    LearnerClient,
    LearnerRefusedError,
    LearnerServicer,
    ParameterBoard,
    ParameterReceiver,
    RolloutBoard,
    start_learner_server,
)
from lerobot_pirl.rollout.batch import RolloutBatch

T, N, K, H, A, E = 3, 2, 2, 4, 4, 3  # decisions, envs, denoising steps, chunk, action width, episodes
SPEC = RolloutSpec(
    num_envs=N,
    num_steps=K,
    chunk_size=H,
    action_dim=A,
    num_batches=1,
    observations={"observation.state": ((4,), torch.float32)},
)


def make_batch(seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    episode_index = torch.tensor([[0, 1], [0, 1], [2, 1]])  # (T, N): env 0 restarts at decision 2
    return RolloutBatch(
        observations={"observation.state": torch.randn(T, N, 4, generator=g)},
        chains=torch.randn(T, N, K + 1, H, A, generator=g),
        step_index=torch.randint(0, K, (T, N), generator=g),
        logprobs=torch.randn(T, N, generator=g),
        values=torch.randn(T, N, generator=g),
        rewards=torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]),
        terminated=torch.tensor([[False, False], [True, False], [False, False]]),
        truncated=torch.zeros(T, N, dtype=torch.bool),
        next_values=torch.randn(T, N, generator=g),
        mask=torch.ones(T, N, dtype=torch.bool),
        episode_index=episode_index,
        episode_returns=torch.tensor([1.0, 0.0, 0.0]),
        episode_success=torch.tensor([True, False, False]),
        episode_lengths=torch.tensor([8, 12, 4]),
        episode_done=torch.tensor([True, False, False]),
        episode_task=torch.zeros(3, dtype=torch.int64),
        env_steps=24,
        extras={"note": 1.5},
    )


def make_rollout(version: int = 0, actor_id: int = 0, run_id: str = "run", seed: int = 0) -> RolloutMessage:
    return RolloutMessage(
        run_id=run_id,
        version=version,
        actor_id=actor_id,
        seed_start=100,
        seeds_used=3,
        batches=[make_batch(seed)],
        collect_s=0.5,
    )


def make_parameters(version: int = 0, finished: bool = False) -> ParametersMessage:
    return ParametersMessage(
        run_id="run",
        version=version,
        num_actors=2,
        seed_starts=[10, 20],
        seed_budget=10,
        frozen_fingerprint="abc",
        signature={"algorithm": "ppo"},
        finished=finished,
        tensors={"head.weight": torch.arange(6.0).reshape(2, 3), "head.bias": torch.zeros(2)},
    )


# ---- codec --------------------------------------------------------------------------------------------


def test_rollout_round_trip_is_exact_and_checked_against_the_spec():
    rollout = make_rollout(version=3, actor_id=1)
    decoded = RolloutMessage.decode(rollout.encode(), max_bytes=1 << 20, spec=SPEC)
    assert (decoded.run_id, decoded.version, decoded.actor_id, decoded.seeds_used) == ("run", 3, 1, 3)
    original, received = rollout.batches[0], decoded.batches[0]
    for name in ("chains", "step_index", "logprobs", "mask", "episode_index", "episode_success"):
        assert torch.equal(getattr(original, name), getattr(received, name)), name
        assert getattr(original, name).dtype == getattr(received, name).dtype
    assert torch.equal(original.observations["observation.state"], received.observations["observation.state"])
    assert received.env_steps == 24 and received.extras == {"note": 1.5}
    assert rollout.episode_statistics() == {"episodes": 1.0, "successes": 1.0, "mean_return": 1.0}


def test_parameters_round_trip_and_strict_loading():
    data = make_parameters(version=7).encode()
    message = ParametersMessage.decode(data, max_bytes=1 << 20)
    assert message.key == ("run", 7) and message.seed_starts == [10, 20] and not message.finished
    module = torch.nn.Module()
    module.head = torch.nn.Linear(3, 2)
    load_trainable_state(module, {f"head.{k.split('.')[1]}": v for k, v in message.tensors.items()})
    assert torch.equal(module.head.weight, torch.arange(6.0).reshape(2, 3))
    with pytest.raises(PayloadError, match="names differ"):
        load_trainable_state(module, {"head.weight": torch.zeros(2, 3)})
    with pytest.raises(PayloadError, match="expected"):
        load_trainable_state(module, {"head.weight": torch.zeros(3, 3), "head.bias": torch.zeros(2)})


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda b: b.chains.__setitem__((0, 0, 0, 0, 0), float("nan")), "NaN"),
        (lambda b: b.episode_index.__setitem__((0, 0), 7), "episode_index"),
        (lambda b: b.step_index.__setitem__((0, 0), K), "step_index"),
        (lambda b: setattr(b, "rewards", b.rewards[:2]), "rewards"),
        (lambda b: setattr(b, "mask", b.mask.float()), "mask"),
        (
            lambda b: b.observations.__setitem__("observation.state", torch.zeros(T, N, 5)),
            "observation.state",
        ),
        (lambda b: b.observations.__setitem__("extra", torch.zeros(T, N, 1)), "observations"),
        (lambda b: setattr(b, "chains", torch.zeros(T, N, K + 1, H, A + 1)), "chains"),
        # Issue 17: float64 chains and finite but absurd values used to be accepted and trained on.
        (lambda b: setattr(b, "chains", b.chains.double()), "chains must be a float32"),
        (lambda b: b.logprobs.__setitem__((0, 0), -1e38), "logprobs holds NaN, inf or a magnitude"),
        (lambda b: b.chains.__setitem__((2, 1, 0, 0, 0), 3e7), "chains holds"),
        (lambda b: b.rewards.__setitem__((1, 1), 1e9), "rewards holds"),
    ],
)
def test_rollouts_that_break_the_contract_are_refused(corrupt, message):
    rollout = make_rollout()
    corrupt(rollout.batches[0])
    with pytest.raises(PayloadError, match=message) as refused:
        RolloutMessage.decode(rollout.encode(), max_bytes=1 << 20, spec=SPEC)
    assert refused.value.reason == MALFORMED


def test_magnitude_check_sees_every_nan_inf_and_huge_value_and_no_half_precision_overflow():
    ones = torch.ones(100_000, dtype=torch.float16)  # would sum to 1e5 > 65504, the float16 maximum
    assert within_magnitude(ones) and within_magnitude(ones.bfloat16()) and within_magnitude(torch.arange(5))
    assert within_magnitude(torch.full((3,), -1e6)) and within_magnitude(torch.empty(0))
    for bad in (float("nan"), float("inf"), -float("inf"), 1.01e6, -2e30):
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            poisoned = torch.zeros(1000, dtype=dtype)
            poisoned[617] = bad
            assert not within_magnitude(poisoned), (bad, dtype)


def test_oversized_wrong_kind_and_wrong_protocol_payloads_are_refused():
    data = make_rollout().encode()
    with pytest.raises(PayloadError) as refused:
        RolloutMessage.decode(data, max_bytes=len(data) - 1)
    assert refused.value.reason == TOO_LARGE
    with pytest.raises(PayloadError, match="expected a parameters payload"):
        ParametersMessage.decode(data, max_bytes=1 << 20)
    wrong_protocol = encode_payload({}, {"kind": "parameters", "protocol": 99})
    with pytest.raises(PayloadError, match="protocol"):
        ParametersMessage.decode(wrong_protocol, max_bytes=1 << 20)


VALID_ROLLOUT = make_rollout().encode()
VALID_PARAMETERS = make_parameters().encode()
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def decode_both(data: bytes) -> None:
    """Each decoder either returns a message or raises PayloadError; nothing else may escape."""
    for decode in (
        lambda: RolloutMessage.decode(data, max_bytes=1 << 20, spec=SPEC),
        lambda: ParametersMessage.decode(data, max_bytes=1 << 20),
    ):
        with contextlib.suppress(PayloadError):
            decode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_only_raise_payload_errors(data):
    decode_both(data)


@settings(max_examples=200, deadline=None)
@given(
    source=st.sampled_from([VALID_ROLLOUT, VALID_PARAMETERS]),
    cut=st.integers(min_value=0, max_value=len(VALID_ROLLOUT)),
    flips=st.lists(
        st.tuples(st.integers(min_value=0, max_value=len(VALID_ROLLOUT) - 1), st.integers(1, 255)), max_size=6
    ),
)
def test_fuzz_truncated_and_bit_flipped_payloads_only_raise_payload_errors(source, cut, flips):
    mutated = bytearray(source[:cut] if cut < len(source) else source)
    for position, xor in flips:
        if position < len(mutated):
            mutated[position] ^= xor
    decode_both(bytes(mutated))


@settings(max_examples=150, deadline=None)
@given(
    metadata=st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=8),
    kind=st.sampled_from(["rollout", "parameters"]),
)
def test_fuzz_arbitrary_metadata_only_raises_payload_errors(metadata, kind):
    tensors = {"0/chains": torch.zeros(1, 1, K + 1, H, A)} if kind == "rollout" else {"w": torch.zeros(2)}
    decode_both(encode_payload(tensors, {**metadata, "kind": kind}))


# ---- the rollout round --------------------------------------------------------------------------------


def test_round_waits_for_stragglers_then_goes_on_and_refuses_late_uploads():
    board = RolloutBoard()
    board.open("run", 4, num_actors=2)
    board.submit(make_rollout(version=4, actor_id=1))
    with pytest.raises(PayloadError) as duplicate:
        board.submit(make_rollout(version=4, actor_id=1))
    assert duplicate.value.reason == "duplicate"
    with pytest.raises(PayloadError) as wrong_version:
        board.submit(make_rollout(version=3, actor_id=0))
    assert wrong_version.value.reason == STALE
    with pytest.raises(PayloadError, match="num_actors"):
        board.submit(make_rollout(version=4, actor_id=2))
    started = time.monotonic()
    result = board.wait(straggler_timeout_s=0.3, stop=threading.Event())
    assert 0.25 <= time.monotonic() - started < 2.0
    assert result.timed_out and [m.actor_id for m in result.rollouts] == [1] and result.expected == 2
    with pytest.raises(PayloadError) as late:
        board.submit(make_rollout(version=4, actor_id=0))
    assert late.value.reason == STALE


def test_round_returns_as_soon_as_every_actor_delivered():
    board = RolloutBoard()
    board.open("run", 0, num_actors=2)
    threading.Timer(0.1, lambda: board.submit(make_rollout(actor_id=0))).start()
    threading.Timer(0.2, lambda: board.submit(make_rollout(actor_id=1))).start()
    started = time.monotonic()
    result = board.wait(straggler_timeout_s=30.0, stop=threading.Event())
    assert time.monotonic() - started < 5.0
    assert not result.timed_out and [m.actor_id for m in result.rollouts] == [0, 1]


# ---- the server -----------------------------------------------------------------------------------------


@pytest.fixture
def server(request):
    """A learner server on a free port with a tiny upload limit; yields (servicer, transport)."""
    options = getattr(request, "param", {})
    transport = TransportConfig(port=0, num_actors=2, **options.get("transport", {}))
    servicer = LearnerServicer(
        ParameterBoard(),
        RolloutBoard(),
        SPEC,
        max_upload_bytes=options.get("max_upload_bytes", 64 * 1024),
        token=options.get("token"),
        num_actors=options.get("num_actors"),
        upload_timeout_s=options.get("upload_timeout_s", 600.0),
    )
    grpc_server, port = start_learner_server(transport, servicer)
    transport.port = port
    yield servicer, transport
    servicer.stopping.set()
    grpc_server.stop(grace=None)


def upload(transport: TransportConfig, data: bytes, actor_id: int = 0) -> grpc.StatusCode:
    client = LearnerClient(transport, actor_id)
    try:
        client.upload(data, timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()
    finally:
        client.close()


def test_server_refuses_bad_uploads_with_a_status_and_keeps_serving(server, caplog):
    servicer, transport = server
    servicer.rollouts.open("run", 5, num_actors=2)
    huge = make_rollout(version=5)
    huge.batches[0].observations["observation.state"] = torch.zeros(T, N, 40_000)  # ~1 MiB > 64 KiB
    assert upload(transport, huge.encode()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert upload(transport, b"\x00" * 100) == grpc.StatusCode.INVALID_ARGUMENT
    assert upload(transport, VALID_PARAMETERS) == grpc.StatusCode.INVALID_ARGUMENT  # wrong kind
    assert upload(transport, make_rollout(version=4).encode()) == grpc.StatusCode.FAILED_PRECONDITION
    client = LearnerClient(transport, 0)  # a chunk stream with no valid transfer state
    with pytest.raises(grpc.RpcError) as unknown_state:
        client.stub.SendTransitions(iter([services_pb2.Transition(data=b"xyz")]), timeout=10)
    client.close()
    assert unknown_state.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert servicer.rejected == 5
    assert "refused a rollout" in caplog.text
    # Still serving: a valid rollout for the open version is accepted, a repeat of it is not.
    assert upload(transport, make_rollout(version=5, actor_id=1).encode(), actor_id=1) == grpc.StatusCode.OK
    assert (
        upload(transport, make_rollout(version=5, actor_id=1).encode(), actor_id=1)
        == grpc.StatusCode.ALREADY_EXISTS
    )
    result = servicer.rollouts.wait(straggler_timeout_s=0.01, stop=threading.Event())
    assert [m.actor_id for m in result.rollouts] == [1]


def test_every_connected_actor_receives_every_version(server):
    servicer, transport = server
    receivers = []
    for actor_id in range(3):
        receiver = ParameterReceiver(LearnerClient(transport, actor_id), max_bytes=1 << 20, max_backoff_s=0.5)
        receiver.start()
        receivers.append(receiver)
    try:
        for version in range(3):
            servicer.parameters.publish(version, make_parameters(version).encode())
            for receiver in receivers:
                message = receiver.wait_for_newer(("run", version - 1), timeout=10)
                assert message is not None and message.version == version
        servicer.parameters.publish(3, make_parameters(3, finished=True).encode(), finished=True)
        for receiver in receivers:
            receiver.join(10)
            assert not receiver.is_alive() and receiver.latest.finished
    finally:
        for receiver in receivers:
            receiver.stop()
            receiver.client.close()


def every_rpc(client: LearnerClient) -> dict:
    """One call of each of the learner's four RPCs, as `client`."""
    return {
        "Ready": lambda: client.stub.Ready(services_pb2.Empty(), metadata=client.metadata, timeout=10),
        "StreamParameters": lambda: next(
            client.stub.StreamParameters(services_pb2.Empty(), metadata=client.metadata, timeout=10)
        ),
        "SendTransitions": lambda: client.upload(make_rollout().encode(), timeout=10),
        "SendInteractions": lambda: client.stub.SendInteractions(
            send_bytes_in_chunks(b"{}", services_pb2.InteractionMessage), metadata=client.metadata, timeout=10
        ),
    }


@pytest.mark.parametrize("server", [{"token": "s3cret"}], indirect=True)
def test_a_client_without_the_runs_token_is_refused_on_every_rpc(server, monkeypatch):
    # Issue 17: any local process could read the parameters and upload rollouts that were trained on.
    servicer, transport = server
    servicer.parameters.publish(0, VALID_PARAMETERS)
    servicer.rollouts.open("run", 0, num_actors=2)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    for token in (None, "guess"):
        stranger = LearnerClient(transport, 0, token=token)
        calls = every_rpc(stranger)
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (token, name)
        stranger.close()
    member = LearnerClient(transport, 1, token="s3cret")
    assert member.ready(timeout=10)
    member.upload(make_rollout(actor_id=1).encode(), timeout=10)
    result = servicer.rollouts.wait(straggler_timeout_s=0.01, stop=threading.Event())
    assert [m.actor_id for m in result.rollouts] == [1]  # none of the strangers' uploads
    member.close()


@pytest.mark.parametrize("server", [{"token": "s3cret"}], indirect=True)
def test_an_actor_with_a_wrong_token_is_told_at_once_instead_of_retrying(server, monkeypatch):
    # Issue 17: it used to log "learner unreachable (UNAUTHENTICATED)" and retry until the reconnect timeout.
    _, transport = server
    monkeypatch.setenv(TOKEN_ENV, "guess")
    client = LearnerClient(transport, 0)
    with pytest.raises(LearnerRefusedError, match="wrong token"):
        client.ready(timeout=10)
    receiver = ParameterReceiver(client, max_bytes=1 << 20, max_backoff_s=0.2)
    receiver.start()
    try:
        assert receiver.wait_for_newer(None, timeout=10) is None
        receiver.join(10)
        assert not receiver.is_alive() and "wrong token" in receiver.refused
    finally:
        receiver.stop()
        client.close()


def self_signed_certificate(directory) -> tuple:
    """(cert, key) PEM paths for CN=localhost with SANs localhost and 127.0.0.1."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip(
                "TLS test needs the `cryptography` package or the openssl command to make a certificate"
            )
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
        return cert, key
    import ipaddress

    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(private_key, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key


def test_tls_learner_serves_actors_that_trust_its_certificate_only(tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    transport = TransportConfig(port=0, tls_cert=cert, tls_key=key)
    transport.check("learner")
    servicer = LearnerServicer(ParameterBoard(), RolloutBoard(), SPEC, max_upload_bytes=1 << 20)
    grpc_server, port = start_learner_server(transport, servicer)
    try:
        trusting = LearnerClient(TransportConfig(port=port, tls_ca=cert), 0)
        assert trusting.ready(timeout=10)
        servicer.parameters.publish(0, VALID_PARAMETERS)
        receiver = ParameterReceiver(trusting, max_bytes=1 << 20, max_backoff_s=0.5)
        receiver.start()
        assert receiver.wait_for_newer(None, timeout=10).seed_starts == [10, 20]  # data flows encrypted
        receiver.stop()
        trusting.close()
        plaintext = LearnerClient(TransportConfig(port=port), 0)
        assert not plaintext.ready(timeout=2)
        plaintext.close()
    finally:
        servicer.stopping.set()
        grpc_server.stop(grace=None)


def test_an_actor_knows_how_long_the_learner_has_been_unreachable():
    from lerobot_pirl.testing.processes import free_port

    transport = TransportConfig(port=free_port())
    client = LearnerClient(transport, 0)
    assert not client.ready(timeout=0.5)
    time.sleep(0.2)
    assert client.unreachable_for() >= 0.2  # counted from the client's start: nothing listens yet
    servicer = LearnerServicer(ParameterBoard(), RolloutBoard(), SPEC, max_upload_bytes=1 << 20)
    grpc_server, _ = start_learner_server(transport, servicer)
    receiver = ParameterReceiver(client, max_bytes=1 << 20, max_backoff_s=0.2)
    try:
        receiver.start()  # the open stream alone (nothing published yet) proves the learner is there
        deadline = time.monotonic() + 20
        while client.unreachable_for() > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.unreachable_for() == 0.0 and receiver.latest is None
        servicer.stopping.set()
        grpc_server.stop(grace=None)
        deadline = time.monotonic() + 20
        while client.unreachable_for() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.unreachable_for() > 0  # the stream broke off and reconnecting fails
    finally:
        receiver.stop()
        servicer.stopping.set()
        grpc_server.stop(grace=None)
        client.close()


def test_events_are_json_objects_or_refused(server):
    servicer, transport = server
    events = []
    servicer.on_event = events.append
    client = LearnerClient(transport, 3)
    assert client.send_event({"event": "hello", "actor_id": 3})
    assert events == [{"event": "hello", "actor_id": 3}]

    with pytest.raises(grpc.RpcError) as refused:
        client.stub.SendInteractions(
            send_bytes_in_chunks(json.dumps([1, 2]).encode(), services_pb2.InteractionMessage), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    client.close()


@pytest.mark.parametrize("server", [{"num_actors": 2}], indirect=True)
def test_held_parameter_streams_cannot_starve_a_real_actor(server):
    # Issue 17: streams held open by one client used every worker thread (2 x actors + 8 = 12) and a real
    # actor stalled. Now each actor id holds one stream and unknown ids get none.
    servicer, transport = server
    servicer.parameters.publish(0, VALID_PARAMETERS)
    stranger = LearnerClient(transport, 7)
    with pytest.raises(grpc.RpcError) as refused:
        next(stranger.stream_parameters())
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    hostile = [LearnerClient(transport, 0) for _ in range(12)]  # a connection each, as a raw client can

    def open_stream(client):
        return client.stub.StreamParameters(services_pb2.Empty(), metadata=client.metadata)

    held = [open_stream(hostile[0])]
    next(held[0])  # served: it holds actor id 0 before the others ask (the server takes calls in any order)
    held += [open_stream(client) for client in hostile[1:]]
    codes = []
    for call in held[1:]:
        with pytest.raises(grpc.RpcError) as refused:
            next(call)
        codes.append(refused.value.code())
    assert codes == [grpc.StatusCode.ALREADY_EXISTS] * 11  # the first one holds actor id 0
    real = LearnerClient(transport, 1)
    receiver = ParameterReceiver(real, max_bytes=1 << 20, max_backoff_s=0.5)
    try:
        receiver.start()
        message = receiver.wait_for_newer(None, timeout=15)
        assert message is not None and message.seed_starts == [10, 20]
        assert servicer.open_streams == 2  # one per actor id
    finally:
        receiver.stop()
        for call in held:
            call.cancel()
        for client in (*hostile, stranger, real):
            client.close()


@pytest.mark.parametrize("server", [{"num_actors": 2}], indirect=True)
def test_a_second_actor_with_a_taken_id_exits_and_the_first_keeps_its_stream(server):
    # Issue 17: a duplicate id was only a warning, and the learner then waited out the straggler timeout.
    servicer, transport = server
    servicer.parameters.publish(0, make_parameters(0).encode())
    first, second = (
        ParameterReceiver(LearnerClient(transport, 0), max_bytes=1 << 20, max_backoff_s=0.2) for _ in range(2)
    )
    try:
        first.start()
        assert first.wait_for_newer(None, timeout=10).version == 0
        second.start()
        assert second.wait_for_newer(None, timeout=10) is None
        second.join(10)
        assert not second.is_alive() and "actor id 0 is already connected" in second.refused
        servicer.parameters.publish(1, make_parameters(1).encode())
        assert first.wait_for_newer(("run", 0), timeout=10).version == 1
        # Once the first actor is gone, a restarted one takes its id.
        first.stop()
        first.join(10)
        restarted = ParameterReceiver(LearnerClient(transport, 0), max_bytes=1 << 20, max_backoff_s=0.2)
        restarted.start()
        assert restarted.wait_for_newer(None, timeout=10).version == 1
        restarted.stop()
        restarted.client.close()
    finally:
        for receiver in (first, second):
            receiver.stop()
            receiver.client.close()


def stalled_upload(client: LearnerClient, mib: int, release: threading.Event) -> threading.Thread:
    """Sends `mib` 1 MiB chunks of an upload and then nothing, holding the stream open until `release`."""
    chunk = b"x" * (1 << 20)

    def chunks():
        yield services_pb2.Transition(transfer_state=services_pb2.TransferState.TRANSFER_BEGIN, data=chunk)
        for _ in range(mib - 1):
            yield services_pb2.Transition(
                transfer_state=services_pb2.TransferState.TRANSFER_MIDDLE, data=chunk
            )
        release.wait()

    def send():
        with contextlib.suppress(grpc.RpcError):
            client.stub.SendTransitions(chunks(), metadata=client.metadata, timeout=30)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    "server", [{"num_actors": 2, "upload_timeout_s": 1.5, "max_upload_bytes": 256 << 20}], indirect=True
)
def test_an_upload_that_never_finishes_is_dropped_and_its_memory_freed(server):
    # Issue 17: uploads that never sent their last chunk were held whole and for good (RSS 1.3 -> 4.5 GB).
    servicer, transport = server
    servicer.rollouts.open("run", 0, num_actors=2)
    release, stalling = threading.Event(), LearnerClient(transport, 0)
    rss = psutil.Process().memory_info
    gc.disable()  # the buffer must go when the upload is dropped, not at some later collection
    try:
        thread = stalled_upload(stalling, 96, release)
        deadline = time.monotonic() + 20
        while servicer.upload_bytes_in_flight < 96 << 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert servicer.upload_bytes_in_flight == 96 << 20  # every chunk so far, held by the one upload
        held_rss = rss().rss
        # One upload in flight per actor id; uploads for ids outside the run are refused unread.
        assert upload(transport, make_rollout().encode(), actor_id=0) == grpc.StatusCode.ABORTED
        assert (
            upload(transport, make_rollout(actor_id=5).encode(), actor_id=5)
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        # Past --transport.upload_timeout_s the stalled upload is dropped and its buffer released.
        while servicer.upload_bytes_in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert servicer.upload_bytes_in_flight == 0
        time.sleep(0.5)
        assert held_rss - rss().rss > 64 << 20
        assert upload(transport, make_rollout().encode(), actor_id=0) == grpc.StatusCode.OK
        # The rollout's actor id must be the one the client connected as.
        assert (
            upload(transport, make_rollout(actor_id=0).encode(), actor_id=1)
            == grpc.StatusCode.INVALID_ARGUMENT
        )
    finally:
        gc.enable()
        release.set()
        thread.join(10)
        stalling.close()
