"""Every message that crosses a tokenrelay socket.

Runs in every process; owns no socket. Never import an event loop or a zmq context here.

A message is two ZeroMQ frames: one type byte, then the msgpack encoding of a `msgspec.Struct`
(ROUTER sockets add the peer identity in front, PUB adds a topic frame). No pickle anywhere.

Sockets and the messages they carry (see README "Architecture"):

  socket (owner)                         peer                          messages
  -------------------------------------  ----------------------------  --------------------------------------
  head control ROUTER (head, binds)      agent DEALER (connects)       AgentRegister, AgentHeartbeat,
                                                                       AgentLeaving ->
                                                                       <- ControlReply, Assignment
                                         proxy DEALER (connects)       HeadHello, SnapshotRequest ->
                                                                       <- HeadInfo, RoutingTable
                                                                       ScaleDemand -> (no reply)
                                         CLI DEALER (connects)         StatusRequest -> <- StatusReply
                                                                       Deploy/Scale/DeleteRequest ->
                                                                       <- ControlReply
  head routing PUB (head, binds)         proxy SUB (connects)          <- RoutingTable (topic b"table")
  agent replica ROUTER (agent, binds)    model_proc DEALER (connects)  ReplicaHello, ReplicaStatus,
                                                                       ReplicaDead ->
  model_proc data ROUTER (replica,       proxy DEALER (connects, one   GenerateRequest, Abort ->
    binds)                               per replica per worker)       <- TokenBatch, RequestError,
                                                                          ReplicaDead

Token messages carry deltas, never cumulative text, and a replica sends one TokenBatch per engine step
per connected proxy worker, holding the new text of all that worker's requests.

Longer than the ~400-line module guideline on purpose: every wire message lives in this one module (house
rule 4), and the message structs alone pass 400 lines. The only other code here is the type-byte table and
encode/decode (about 60 lines), which belongs with the messages, so the module is not split.
"""
from __future__ import annotations

import enum
from typing import Any, Optional, Union

import msgspec

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A frame that is not a valid tokenrelay message (unknown type byte, bad payload)."""


class StrEnum(str, enum.Enum):
    """A state name that is also its string (enum.StrEnum before Python 3.11): compares equal to the bare
    string, prints as it in %-style logs and metric labels, and msgspec encodes it as the string."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class ReplicaState(StrEnum):
    """A replica's state as its agent reports it (agent.lifecycle drives the transitions)."""

    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    FAILED = "failed"


# --------------------------------------------------------------------------- data plane


class SamplingParams(msgspec.Struct, frozen=True, omit_defaults=True):
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    stop: list[str] = []
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str


class Resume(msgspec.Struct, frozen=True, array_like=True):
    """GenerateRequest.resume: the request already produced `token_ids` (completion tokens, in order) on
    a replica that was lost; the client has their text. The engine continues after them as if it had
    generated them itself: its first delta holds token len(token_ids), `completion_tokens` counts them
    too, and `max_tokens` bounds the total. An engine that cannot resume refuses the request (501).
    `created`: a relayed stream's `created` as the client got it (0: unknown), kept by the new replica."""

    token_ids: list[int]
    created: int = 0


class GenerateRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """proxy -> replica. `prompt` for completions and the plain endpoint, `messages` for chat.

    Relayed OpenAI requests (engines that serve the OpenAI API themselves, see docs/api.md) set `endpoint`
    (the HTTP path, e.g. "/v1/chat/completions") and `body` (the client's JSON body, untouched) instead:
    the replica's engine answers with the response bytes its own serving layer wrote, as Delta texts
    (SSE events when streaming, else one JSON body) that the proxy writes through; `headers` are the
    client's request headers that vLLM's app reads (Content-Type, X-data-parallel-rank, ...: the proxy's
    RELAYED_HEADERS, lowercase names), None from a proxy that sends none (then Content-Type is JSON).
    """

    request_id: str
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    params: SamplingParams = SamplingParams()
    endpoint: str = ""
    body: bytes = b""
    resume: Optional[Resume] = None  # set when the proxy moves a stream here from a lost replica
    headers: Optional[dict[str, str]] = None


class Abort(msgspec.Struct, frozen=True):
    """proxy -> replica: stop these requests (idempotent: unknown ids are ignored)."""

    request_ids: list[str]


class Delta(msgspec.Struct, frozen=True, array_like=True):
    """New text of one request since the previous delta. Token counts are running totals.

    `token_ids`: the completion token ids behind `text` (new ones only), which the proxy keeps so it can
    resume the request elsewhere (GenerateRequest.resume); empty from engines that do not report them."""

    request_id: str
    text: str
    finish_reason: Optional[str]  # None while running; "stop", "length", "abort" at the end
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = []


class TokenBatch(msgspec.Struct, frozen=True, array_like=True):
    """replica -> proxy: every new delta for one proxy worker from one engine step.

    `load` is the number of requests the replica holds (running + waiting, from every proxy) when it sent
    the batch; None from replicas that predate it. A batch with no deltas is a pure load report: a replica
    pushes one to every known proxy worker when its load changed (rate-limited). Both directions stay
    compatible: older decoders ignore the trailing field, and an empty batch carries no delta to act on.
    """

    deltas: list[Delta]
    load: Optional[int] = None


class RequestError(msgspec.Struct, frozen=True):
    """replica -> proxy: this request failed. `status` is the HTTP status the client should see."""

    request_id: str
    status: int
    message: str
    type: str = "server_error"
    param: Optional[str] = None
    body: bytes = b""  # a relayed request's error body exactly as the engine's serving layer wrote it


# RequestError.type of a replica that is shutting down (drain): it refused the request or stopped it
# unfinished. Not the replica's fault and not the request's: proxies send it elsewhere (or resume it there)
# and never count it against the replica.
SHUTTING_DOWN = "service_unavailable"
def error_type_for(status: int) -> str:
    """RequestError.type (OpenAI's error type) for an HTTP status: 429 rate_limit_error, any other status
    below 500 invalid_request_error (the request's fault), else server_error."""
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


KEY_REFUSED = "permission_error"  # RequestError.type: the replica's host does not accept this proxy's key


def loggable_identity(identity: bytes) -> str:
    """A proxy worker's DEALER identity (`proxy-HOST-PID-SECRET`) as logs may show it: without the part
    after its last '-', a secret, since replicas set ROUTER_HANDOVER and whoever connects with the whole
    identity (and any proxy key) takes over that worker's streams."""
    head, sep, _ = identity.rpartition(b"-")
    return (head if sep else b"?").decode("ascii", "replace")[:120]


class ReplicaDead(msgspec.Struct, frozen=True):
    """replica -> every peer: the engine died; fail everything in flight on this replica at once."""

    replica_id: str
    reason: str


# --------------------------------------------------------------------------- replica <-> agent


class ReplicaHello(msgspec.Struct, frozen=True):
    protocol: int
    replica_id: str
    endpoint: str  # the data ROUTER endpoint proxies connect to
    pid: int
    metrics_port: int = 0  # the replica's Prometheus /metrics HTTP port on its host (0: none)
    deployment: str = ""  # with generation: lets a restarted agent adopt a replica that outlived it
    generation: int = 0


MODEL_CARD_MAX_BYTES = 16384  # a /v1/models entry is a few hundred bytes; it rides every routing table


class ReplicaStatus(msgspec.Struct, frozen=True):
    """Sent from the replica's working loop every status interval: it is also the heartbeat."""

    replica_id: str
    ready: bool  # the engine has produced a token
    running: int
    waiting: int
    kv_cache_usage: float
    steps: int  # engine steps so far: progress for liveness
    tokens_generated: int
    requests_finished: int
    requests_aborted: int
    errors: int
    ttft_p90_s: Optional[float] = None  # time to first token, p90 over the last TTFT window; None: no request
    # the engine's own `/v1/models` entry for the deployment (JSON, vLLM's ModelCard: max_model_len, root,
    # ...), relayed by the proxy as `vllm serve` writes it; b"": the engine has none (mock), or not ready
    model_card: bytes = b""  # at most MODEL_CARD_MAX_BYTES: the head ignores a longer one


# --------------------------------------------------------------------------- agent <-> head


class GpuInfo(msgspec.Struct, frozen=True):
    index: int
    name: str
    memory_bytes: int


class Capacity(msgspec.Struct, frozen=True):
    cpus: int
    memory_bytes: int
    gpus: list[GpuInfo] = []


class ReplicaSpec(msgspec.Struct, frozen=True):
    """What the head wants an agent to run."""

    replica_id: str
    deployment: str
    engine: str
    model: str
    engine_args: dict[str, Any] = {}
    gpus: int = 0
    max_ongoing_requests: int = 64
    generation: int = 0  # the deployment's spec generation (rolling updates)
    cpus: float = 0.0
    memory_bytes: int = 0
    drain_seconds: float = 10.0


class ReplicaReport(msgspec.Struct, frozen=True):
    """What an agent knows of one replica it runs."""

    replica_id: str
    deployment: str
    state: ReplicaState  # an unknown name is a decode error, not a silently unroutable replica
    endpoint: str = ""
    pid: int = 0
    restarts: int = 0
    started_at: float = 0.0
    message: str = ""
    status: Optional[ReplicaStatus] = None
    generation: int = 0
    metrics_endpoint: str = ""  # HOST:PORT of the replica's /metrics ("": none)
    cpu_percent: float = 0.0  # the replica's process tree, % of one core, over the last sample
    rss_bytes: int = 0  # resident memory of the replica's process tree


class AgentRegister(msgspec.Struct, frozen=True):
    protocol: int
    agent_id: str
    host: str
    capacity: Capacity
    labels: dict[str, str] = {}
    replicas: list[ReplicaReport] = []
    metrics_endpoint: str = ""  # HOST:PORT of the agent's /metrics ("": none)


class GpuUsage(msgspec.Struct, frozen=True):
    index: int
    utilization: float  # 0.0 - 1.0 over NVML's last sample period
    memory_used_bytes: int
    memory_total_bytes: int


class AgentUsage(msgspec.Struct, frozen=True):
    """The agent's and its replicas' resource use (agent.metrics samples it); GPUs when NVML works."""

    cpu_percent: float  # agent + replica process trees, % of one core
    rss_bytes: int
    gpus: list[GpuUsage] = []


class AgentHeartbeat(msgspec.Struct, frozen=True):
    agent_id: str
    seq: int
    replicas: list[ReplicaReport] = []
    usage: Optional[AgentUsage] = None


class AgentLeaving(msgspec.Struct, frozen=True):
    """agent -> head, when it starts an orderly shutdown: its replicas leave routing now, as planned (the
    head says so at INFO), instead of the head noticing the silence later and reporting a failure."""

    agent_id: str
    reason: str = ""


class Assignment(msgspec.Struct, frozen=True):
    """head -> agent: the full set of replicas this agent must run (declarative, idempotent)."""

    epoch: int
    version: int
    replicas: list[ReplicaSpec]


class ControlReply(msgspec.Struct, frozen=True):
    ok: bool
    code: str = ""  # machine-readable reason when not ok, e.g. "unknown_agent", "protocol"
    message: str = ""
    data: dict[str, Any] = {}


# --------------------------------------------------------------------------- proxy <-> head


class HeadHello(msgspec.Struct, frozen=True):
    protocol: int
    role: str  # "proxy", "cli"
    http_endpoint: str = ""  # a proxy's HTTP HOST:PORT (its /metrics), listed in the head's Prometheus SD file


class HeadInfo(msgspec.Struct, frozen=True):
    protocol: int
    epoch: int
    publish_endpoint: str


class SnapshotRequest(msgspec.Struct, frozen=True):
    protocol: int


class ReplicaRoute(msgspec.Struct, frozen=True, array_like=True):
    replica_id: str
    endpoint: str
    running: int
    waiting: int
    kv_cache_usage: float
    max_ongoing_requests: int


ROUTING_POLICIES = ("p2c", "prefix")


class RoutingSettings(msgspec.Struct, frozen=True):
    """How proxies pick a replica and queue requests for one deployment (docs/api.md, "Routing")."""

    policy: str = "p2c"  # p2c: power of two choices by load; prefix: same prompt prefix, same replica
    prefix_chars: int = 256  # prefix policy: characters of the rendered prompt that are hashed
    max_imbalance: int = 8  # prefix/session target kept while its load <= least loaded + this
    session_affinity: bool = True  # X-Session-ID picks the replica (with the same load guard)
    queue_size: int = 32  # requests one proxy worker holds waiting for a free replica
    queue_timeout_s: float = 2.0  # longest wait in that queue before 429
    resume: bool = True  # a stream whose replica is lost mid-way goes on on another one (docs/api.md)


class TimeoutSettings(msgspec.Struct, frozen=True):
    """Per-deployment request timeouts in seconds; None: the proxy's own default (its CLI flags)."""

    first_token_s: Optional[float] = None
    idle_s: Optional[float] = None
    total_s: Optional[float] = None


class DeploymentRoute(msgspec.Struct, frozen=True):
    name: str
    engine: str
    model: str
    replicas: list[ReplicaRoute]
    routing: RoutingSettings = RoutingSettings()  # absent from older heads: the defaults
    timeouts: TimeoutSettings = TimeoutSettings()
    # > 0: the deployment scales to zero; a request finding no replica waits this long for one to start
    cold_start_timeout_s: float = 0.0
    model_card: bytes = b""  # a replica's ReplicaStatus.model_card (the current generation's, else the last seen)


class RoutingTable(msgspec.Struct, frozen=True):
    """head -> proxies: every deployment and its healthy replicas. Always the whole table."""

    epoch: int
    version: int
    published_at: float
    deployments: list[DeploymentRoute]


class ScaleDemand(msgspec.Struct, frozen=True):
    """proxy -> head, no reply: `waiting` requests of a scaled-to-zero deployment wait in this proxy
    worker for a replica. Sent at most once a second per deployment while they wait; the autoscaler
    starts a replica on it (head.autoscaler)."""

    deployment: str
    waiting: int


# --------------------------------------------------------------------------- CLI <-> head


class StatusRequest(msgspec.Struct, frozen=True):
    protocol: int
    token: str = ""


class DeployRequest(msgspec.Struct, frozen=True):
    """Create or update a deployment (idempotent). `spec` is the deployment spec as plain data."""

    token: str
    spec: dict[str, Any]


class ScaleRequest(msgspec.Struct, frozen=True):
    token: str
    name: str
    replicas: int


class DeleteRequest(msgspec.Struct, frozen=True):
    token: str
    name: str


class ReplicaStatusRow(msgspec.Struct):
    """One replica in `tokenrelay status` (filled by head.cluster; head.metrics adds the usage fields).
    Encoded as a map with the same keys the reply carried when it was a dict, so old CLIs still read it."""

    replica_id: str
    agent: str
    host: str
    state: str          # a ReplicaState, or "assigned" (not yet reported) / "draining" (head-side)
    generation: int
    endpoint: str = ""
    pid: int = 0
    restarts: int = 0
    age_s: float = 0.0
    message: str = ""
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    tokens_generated: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    metrics_endpoint: str = ""


class AutoscaleStatus(msgspec.Struct, frozen=True):
    desired: int
    wanted: int
    reason: str


class DeploymentStatus(msgspec.Struct):
    """One deployment in `tokenrelay status`: the spec as DeploymentSpec.to_dict() spells it, then the
    head's view of it (state is "pending", "healthy" or "degraded")."""

    name: str
    engine: str
    model: str
    replicas: int
    engine_args: dict[str, Any] = {}
    gpus: int = 0
    cpus: float = 0.0
    memory: int = 0
    max_ongoing_requests: int = 0
    placement: dict[str, Any] = {}
    drain_seconds: float = 0.0
    routing: dict[str, Any] = {}
    timeouts: dict[str, Any] = {}
    rollout: dict[str, Any] = {}
    autoscaling: Optional[dict[str, Any]] = None
    state: str = ""
    ready_replicas: int = 0
    generation: int = 0
    pending_reason: str = ""
    rollout_note: str = ""
    failures: str = ""
    replica_list: list[ReplicaStatusRow] = []
    autoscale: Optional[AutoscaleStatus] = None


class AgentStatus(msgspec.Struct):
    """One agent in `tokenrelay status` (head.cluster; head.metrics adds the usage fields)."""

    agent_id: str
    host: str
    cpus: int
    memory_bytes: int
    gpus: list[GpuInfo] = []
    labels: dict[str, str] = {}
    last_heartbeat_s: float = 0.0
    replicas: int = 0
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    gpu_usage: list[GpuUsage] = []
    metrics_endpoint: str = ""


class StatusReply(msgspec.Struct, frozen=True):
    epoch: int
    version: int
    deployments: list[DeploymentStatus]
    agents: list[AgentStatus]


# --------------------------------------------------------------------------- framing

Message = Union[
    GenerateRequest, Abort, TokenBatch, RequestError, ReplicaDead,
    ReplicaHello, ReplicaStatus,
    AgentRegister, AgentHeartbeat, AgentLeaving, Assignment, ControlReply,
    HeadHello, HeadInfo, SnapshotRequest, RoutingTable, ScaleDemand,
    StatusRequest, StatusReply, DeployRequest, ScaleRequest, DeleteRequest,
]

_TYPES: dict[int, type] = {
    0x01: GenerateRequest,
    0x02: Abort,
    0x03: TokenBatch,
    0x04: RequestError,
    0x05: ReplicaDead,
    0x10: ReplicaHello,
    0x11: ReplicaStatus,
    0x20: AgentRegister,
    0x21: AgentHeartbeat,
    0x22: Assignment,
    0x23: ControlReply,
    0x24: AgentLeaving,
    0x30: HeadHello,
    0x31: HeadInfo,
    0x32: SnapshotRequest,
    0x33: RoutingTable,
    0x34: ScaleDemand,
    0x40: StatusRequest,
    0x41: StatusReply,
    0x42: DeployRequest,
    0x43: ScaleRequest,
    0x44: DeleteRequest,
}
_TYPE_BYTES: dict[type, bytes] = {cls: bytes([code]) for code, cls in _TYPES.items()}
_DECODERS: dict[bytes, msgspec.msgpack.Decoder[Any]] = {
    bytes([code]): msgspec.msgpack.Decoder(cls) for code, cls in _TYPES.items()
}
_encoder = msgspec.msgpack.Encoder()

TABLE_TOPIC = b"table"


def encode(msg: Any) -> list[bytes]:
    """Return the two frames [type byte, payload] for a message."""
    try:
        type_byte = _TYPE_BYTES[type(msg)]
    except KeyError:
        raise ProtocolError("not a protocol message: %r" % type(msg).__name__) from None
    return [type_byte, _encoder.encode(msg)]


def decode(type_frame: bytes, payload: bytes) -> Any:
    """Decode two frames into a message; raise ProtocolError on anything malformed."""
    decoder = _DECODERS.get(bytes(type_frame))
    if decoder is None:
        raise ProtocolError("unknown message type %r" % bytes(type_frame)[:4])
    try:
        return decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:  # a payload nested too deep
        raise ProtocolError("bad %s payload: %s" % (_TYPES[type_frame[0]].__name__, exc)) from exc


def decode_frames(frames: list[bytes]) -> Any:
    """Decode the last two frames of a multipart message (ROUTER/PUB prefixes are the caller's)."""
    if len(frames) < 2:
        raise ProtocolError("expected at least 2 frames, got %d" % len(frames))
    return decode(frames[-2], frames[-1])
