"""One request's way to a replica: admission (wait in the queue), choice, send, first token, retries.

Runs in proxy workers on the request's greenlet (gevent); owns no socket: it goes through the injected
Cluster (gateway.Gateway in production, a fake in unit tests). Must never wait without a deadline and
never retry once the first token was handed to the caller.

    admit()      route now, or wait in the deployment's bounded queue (FIFO, only the first ticket tries),
                 or raise: 429 queue full / waited too long, 503 no usable replica. A deployment whose
                 replicas are all down at the moment (a lost agent: their processes restart) waits in
                 the same queue for one to come back, then 503.
    first(t)     wait up to t seconds for the first token; None when t passed with nothing yet (the caller
                 may send SSE keep-alives and call again). A failure before the first token that the
                 replica caused and that another replica may not have (503/429: refused, overloaded, dead,
                 unreachable, connection lost) is retried on another replica, at most `max_attempts` sends
                 in all and only within `retry_window` seconds of the start; a 4xx is the request's fault:
                 never retried and never held against the replica. Final failures raise ProxyError.
    resume(err)  the replica was lost mid-stream (died, said ReplicaDead, connection lost or frozen past
                 the liveness bound, or it stopped the request while shutting down): send the request to
                 another replica with the token ids received so far (GenerateRequest.resume), so it
                 continues where the lost one was; the caller then waits for the new first token with
                 `first()` as usual. At most `max_resumes` per request, never past the request's deadline,
                 only when the deployment allows it (`routing.resume`) and the replica reported a token
                 id for every token it sent (else the text would repeat). With no usable replica at that
                 moment (all lost at once) it waits for one, up to `retry_window`.
                 Relayed vLLM streams resume too where the replica reported token ids (chat and text
                 completions, n=1, no tools/structured outputs/stop strings: model_proc/relay_resume.py),
                 with the first event's `created` (Resume.created) so the continuation matches.
                 A request whose client gets nothing before its end (`Limits.restart`: a relayed, not
                 streamed vLLM request) starts over elsewhere with the same body instead, from `first()`,
                 under the same bounds.
Every outcome feeds the replica's circuit breaker through `Cluster.record`; a replica that refused or
stopped a request because it is shutting down (protocol.SHUTTING_DOWN) is not counted against.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import msgspec
from gevent.event import Event

from proxy import metrics
from proxy.admission import (
    ADMIT, REJECT_FULL, REJECT_NONE, REJECT_TIMEOUT, AdmissionQueue, Ticket, decide, retry_after,
)
from proxy.errors import ClientGone, NoHealthyReplica, Overloaded, ProxyError, UpstreamError, UpstreamTimeout
from proxy.replicas import ReplicaUnavailable
from proxy.router import DOWN, FULL, NONE, Decision
from proxy.streams import RequestStream, as_error
from runtime.protocol import KEY_REFUSED, SHUTTING_DOWN, Delta, GenerateRequest, RequestError, Resume

log = logging.getLogger(__name__)

CREATED = re.compile(r'"created":\s*(\d+)')
RETRYABLE = (429, 503)  # the replica refused or is gone: another one may well serve it
SLICE = 0.25  # seconds between checks that the client is still there while we wait


@dataclass(frozen=True)
class Limits:
    first_token: float  # seconds from the first send to the first token
    total: float  # seconds from the request's start to its end
    max_attempts: int = 3  # sends to replicas, the first one included
    retry_window: float = 10.0  # no retry starts later than this after the request's (or resume's) start
    resume: bool = True  # resume a stream elsewhere when its replica is lost mid-way
    max_resumes: int = 3  # resumes per request
    # nothing reaches the client before the request's end (a relayed non-streamed request: the replica
    # sends vLLM's whole JSON body at once): a lost replica's request starts over elsewhere, same body
    restart: bool = False


def created_of(text: str) -> int:
    """The `created` of a relayed stream's first event (0 when there is none)."""
    match = CREATED.search(text)
    return int(match.group(1)) if match else 0


class Cluster(Protocol):
    def choose(self, deployment: str, key: Optional[str], exclude: frozenset[str]) -> Decision: ...
    def send(self, replica_id: str, request: GenerateRequest) -> RequestStream: ...
    def queue(self, deployment: str) -> AdmissionQueue: ...
    def record(self, replica_id: str, ok: bool) -> None: ...


class Dispatch:
    def __init__(self, cluster: Cluster, deployment: str, request: GenerateRequest, key: Optional[str],
                 limits: Limits, clock: Callable[[], float], client_gone: Callable[[], bool] = lambda: False,
                 started_at: Optional[float] = None) -> None:
        self._cluster = cluster
        self.deployment = deployment
        self._request = request
        self._key = key
        self.limits = limits
        self._clock = clock
        self._client_gone = client_gone
        self.started_at = clock() if started_at is None else started_at
        self.deadline = self.started_at + limits.total
        self.stream: Optional[RequestStream] = None
        self.attempts = 0
        self._tried: set[str] = set()
        self._first_deadline = float("inf")
        self._last_error: Optional[RequestError] = None
        self.queued_s = 0.0
        self._window_start = self.started_at  # retries (max_attempts, retry_window) count from here
        self.resumes = 0
        self._replayed: list[int] = []  # token ids received from replicas lost before the current one
        self._resumed_at: Optional[float] = None
        self._created = 0  # a relayed stream's `created`, as its client got it (kept on a resume)

    @property
    def request_id(self) -> str:
        return self._request.request_id

    # ----------------------------------------------------------------- admission

    def admit(self) -> None:
        """Send the request to a replica, waiting in the queue if every replica is full."""
        queue = self._cluster.queue(self.deployment)
        event = Event()
        ticket: Optional[Ticket] = None
        start = self._clock()
        down = False  # the last answer was: replicas listed, every one down (restarting)
        try:
            while True:
                now = self._clock()
                mine = ticket is None or queue.is_first(ticket)
                outcome = self._try_send() if mine else FULL
                if mine:
                    down = outcome == DOWN
                verdict = decide(outcome, ticket, queue, now)
                if verdict == ADMIT:
                    return
                if verdict == REJECT_NONE:
                    raise self._no_replica()
                if verdict in (REJECT_FULL, REJECT_TIMEOUT):
                    if down and verdict == REJECT_TIMEOUT:
                        raise NoHealthyReplica("every replica of %r is down and none came back within %.1fs"
                                               % (self.deployment, queue.timeout))
                    if down:
                        raise NoHealthyReplica("every replica of %r is down for now and the wait queue is full"
                                               % self.deployment)
                    raise self._overloaded(verdict, queue)
                if ticket is None:
                    ticket = queue.join(now, event.set)
                    if ticket is None:  # decide() saw room a moment ago; nothing yields in between
                        raise self._overloaded(REJECT_FULL, queue)
                event.clear()
                event.wait(max(0.0, min(SLICE, ticket.deadline - now, self.deadline - now)))
                if self._client_gone():
                    raise ClientGone()
                if self._clock() >= self.deadline:
                    raise UpstreamTimeout("request %s took longer than %gs in all" % (
                        self.request_id, self.limits.total))
        finally:
            if ticket is not None:
                queue.leave(ticket)
                self.queued_s = self._clock() - start
                metrics.QUEUE_WAIT.labels(self.deployment).observe(self.queued_s)

    def _try_send(self) -> str:
        """Choose and send; returns the router outcome (ROUTE once sent)."""
        while True:
            decision = self._cluster.choose(self.deployment, self._key, frozenset(self._tried))
            if decision.replica_id is None:
                return decision.outcome
            rid = decision.replica_id
            self._tried.add(rid)
            self.attempts += 1
            try:
                self.stream = self._cluster.send(rid, self._request)
            except ReplicaUnavailable as exc:
                log.warning("req=%s [failover] replica %s unreachable: %s", self.request_id, rid, exc)
                self._cluster.record(rid, False)
                if not self._may_retry():
                    self._last_error = RequestError(self.request_id, 503, str(exc))
                    return NONE
                continue
            if self._first_deadline == float("inf"):  # the first send that went out starts the clock
                self._first_deadline = self._clock() + self.limits.first_token
            return decision.outcome

    def _no_replica(self) -> ProxyError:
        if self._last_error is not None:
            return UpstreamError.from_message(self._last_error)
        return NoHealthyReplica("no healthy replica of %r can take the request" % self.deployment)

    def _overloaded(self, verdict: str, queue: AdmissionQueue) -> ProxyError:
        metrics.REJECTED.labels(self.deployment, verdict).inc()
        if verdict == REJECT_FULL:
            why = "every replica of %r is busy and the wait queue is full" % self.deployment
        else:
            why = "every replica of %r stayed busy for %.1fs" % (self.deployment, queue.timeout)
        return Overloaded(why, retry_after(queue.timeout))

    def _may_retry(self) -> bool:
        return (self.attempts < self.limits.max_attempts
                and self._clock() - self._window_start < self.limits.retry_window)

    # ----------------------------------------------------------------- first token

    def first(self, timeout: Optional[float]) -> Optional[Delta]:
        """The first token, retrying on another replica when this one failed; None after `timeout`."""
        until = float("inf") if timeout is None else self._clock() + timeout
        while True:
            assert self.stream is not None, "admit() first"
            now = self._clock()
            limit = min(self._first_deadline, self.deadline)
            if now >= limit:
                self._fail_current(None)
                if limit == self.deadline:
                    raise UpstreamTimeout("request %s took longer than %gs in all"
                                          % (self.request_id, self.limits.total))
                raise UpstreamTimeout("no first token from replica %s within %gs" % (
                    self.stream.replica_id, self.limits.first_token))
            if now >= until:
                return None
            item = self.stream.get(max(0.0, min(SLICE, until - now, limit - now)))
            if item is None:
                if self._client_gone():
                    raise ClientGone()
                continue
            err = as_error(item)
            if err is None:
                self._cluster.record(self.stream.replica_id, True)
                assert isinstance(item, Delta)
                if self._request.endpoint and not self._created and not self.limits.restart:
                    self._created = created_of(item.text)
                if self._resumed_at is not None:
                    metrics.RESUME_GAP.labels(self.deployment).observe(self._clock() - self._resumed_at)
                    self._resumed_at = None
                return item
            if self.limits.restart and self.resumable(err):  # lost before its (only) answer: start over
                failed = self.resume(err)
                if failed is not None:
                    raise UpstreamError.from_message(failed)
                continue
            if err.type == KEY_REFUSED:  # this proxy's fault or its operator's, never the client's
                log.error("req=%s [auth] replica %s refused this proxy's key: %s", self.request_id,
                          self.stream.replica_id, err.message)
                err = RequestError(err.request_id, 503, "a replica refused this proxy's key", "server_error")
            self._fail_current(err)
            if err.type == SHUTTING_DOWN:
                # a draining replica's refusal is no attempt, and the router avoids it from now on (it
                # is not "tried": with every replica draining, the request waits for their successors)
                self.attempts -= 1
                self._tried.discard(self.stream.replica_id)
            if err.status not in RETRYABLE or not self._may_retry():
                raise UpstreamError.from_message(err)
            log.warning("req=%s [failover] replica %s failed before the first token (%d %s); retrying",
                        self.request_id, self.stream.replica_id, err.status, err.message)
            metrics.RETRIES.labels(self.deployment).inc()
            self._last_error = err
            self.admit()

    def _fail_current(self, err: Optional[RequestError]) -> None:
        """Let go of the current attempt; count it against the replica unless the request was at fault."""
        stream = self.stream
        assert stream is not None
        stream.close("first_token_timeout" if err is None else "error")  # aborts it there if unfinished
        if err is not None and err.type == SHUTTING_DOWN:
            pass  # a draining replica: not its fault, and not the request's
        elif err is None or err.status >= 500 or err.status == 429:
            self._cluster.record(stream.replica_id, False)
        else:
            self._cluster.record(stream.replica_id, True)  # it answered: a 4xx is the request's fault

    # ----------------------------------------------------------------- mid-stream resume

    def resumable(self, err: RequestError) -> bool:
        """May the stream that ended with `err` (mid-way, from the current stream) go on elsewhere?"""
        stream = self.stream
        if stream is None or not self.limits.resume or self.resumes >= self.limits.max_resumes:
            return False
        if not (stream.lost or (err.status == 503 and err.type == SHUTTING_DOWN)):
            return False
        if not self.limits.restart and len(self._replayed) + len(stream.token_ids) != stream.completion_tokens:
            return False  # the engine did not report every token's id (a relayed vLLM stream reports them
            # only where it can be resumed: model_proc/relay_resume.py): a resume would repeat text
        return self._clock() < self.deadline and not self._client_gone()

    def resume(self, err: RequestError) -> Optional[RequestError]:
        """Send the request to another replica, to continue after the tokens received so far (call when
        `resumable(err)`). None once sent (wait with `first()`), else the error that ends the request."""
        old = self.stream
        assert old is not None
        restart = self.limits.restart
        ids = [] if restart else self._replayed + old.token_ids.tolist()  # restart: the client has nothing
        self._replayed = ids
        old.close("error")
        if err.type != SHUTTING_DOWN:
            self._cluster.record(old.replica_id, False)
        # a dead or unreachable replica is down in the router's view (and its restarted process is a new
        # connection, usable again); one that is shutting down is still up: do not pick it again
        self._tried = {old.replica_id} if err.type == SHUTTING_DOWN else set()
        now = self._clock()
        self.resumes += 1
        self.attempts = 0
        self._window_start = now
        self._first_deadline = float("inf")
        self._resumed_at = now
        self._last_error = None
        if not restart:
            self._request = msgspec.structs.replace(self._request, resume=Resume(ids, self._created))
        metrics.RESUMES.labels(self.deployment).inc()
        metrics.TOKENS_REPLAYED.labels(self.deployment).inc(len(ids))
        log.warning("req=%s [failover] replica %s lost after %d token(s) (%d %s); %s elsewhere (%d/%d)",
                    self.request_id, old.replica_id, len(ids), err.status, err.message,
                    "starting over" if restart else "resuming", self.resumes, self.limits.max_resumes)
        give_up = min(self.deadline, now + self.limits.retry_window)
        while True:
            try:
                self.admit()
                return None
            except ProxyError as exc:
                # no replica usable right now (every one died at once: a lost agent): wait for one to
                # come back, within the retry window
                if exc.status != 503 or self._clock() + SLICE >= give_up or self._client_gone():
                    log.warning("req=%s [failover] resume failed: %d %s", self.request_id, exc.status,
                                exc.message)
                    return RequestError(self.request_id, exc.status, exc.message, exc.type, exc.param)
                self.attempts = 0
                self._tried = set()
                Event().wait(SLICE)

    def client_gone(self) -> bool:
        """Did the client close its connection? (A peek at its socket; False when unknown.)"""
        return self._client_gone()

    def close(self, reason: str = "client_gone") -> None:
        if self.stream is not None:
            self.stream.close(reason)
