"""A model spread over Ray replicas, behind the same `Engine` protocol as one local engine.

`RayEngine` runs in the engine process, which is the Ray driver. It keeps `concurrency`
replicas, Ray actors that each host the runner's own engine adapter (runner.ray_replica),
hands each request to the replica with the fewest in flight, and gathers what they finish.
Everything above the protocol (the journal, resume, cancel, progress, the crash book) sees
one engine, and the replicas' outputs are the local engine's, so the result lines are too.

Each replica is kept busy by queueing the next `advance` call before the last one has
answered: Ray runs an actor's calls in the order they were sent, so the replica steps again
while its last outputs travel back, and a request added in between is in its next step.

A replica that dies (its process, its node, or an error inside its engine) is replaced by a
new actor. The requests it held become suspects, and each suspect then runs alone in a
replica, as the local crash book does with requests that were in a dead engine process: a
request that kills its replica while alone SOLO_CRASHES times fails by itself with a clear
error, and the others are unharmed. When Ray itself is lost, so is this process, and the
job resumes from its journal like after any engine death.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from runner.journal import SOLO_CRASHES
from runner.ray_cluster import (
    RaySettings,
    check_resources,
    cluster_settings,
    connect,
    describe_hardware,
    runtime_env,
)
from runner.ray_replica import Replica
from runner.types import EngineInfo, EngineLoadError, EngineOutput, EngineRequest, ModelSpec

log = logging.getLogger(__name__)

WAIT_SECONDS = 0.1  # a step waits at most this for the replicas, so new requests wait little
ADVANCE_SECONDS = 0.5  # a replica steps at most this long before it answers with nothing
CALLS_AHEAD = 2  # advance calls queued at each replica, so it never waits for the driver
LOAD_SECONDS = 1800.0  # a replica that has not loaded by then is given up on
PING_SECONDS = 30.0  # how long a replica idle until now has to answer before work resumes
CLOSE_SECONDS = 10.0


class ReplicaLost(Exception):
    """A replica could not be started again; the engine, and its process, give up."""


@dataclass(eq=False)
class _Slot:
    """One replica's place: the actor now in it, and the requests it holds."""

    index: int
    handle: Any = None
    generation: int = 0  # bumped at each new actor, so answers of a dead one are ignored
    live: bool = False  # loaded and taking requests
    started: float = 0.0
    info: EngineInfo | None = None
    assigned: dict[str, EngineRequest] = field(default_factory=dict)
    advancing: int = 0  # advance calls not answered yet
    counters: tuple[int, int] = (0, 0)
    reserved: bool = False  # kept for suspects, each of which runs alone in it
    solo: str | None = None  # the suspect running alone in it now


class RayEngine:
    """An `Engine` (see runner.types) whose requests run on replicas in a Ray cluster."""

    def __init__(self, spec: ModelSpec, load_seconds: float = LOAD_SECONDS) -> None:
        try:
            import ray
        except ImportError:
            raise EngineLoadError(
                f"model {spec.alias!r} runs on Ray, which is not installed here "
                "(install batchbox with its cluster extra)"
            ) from None
        started = time.monotonic()
        self.spec = spec
        self.settings = RaySettings.of(spec)
        self.load_seconds = load_seconds
        self.inner = dataclasses.replace(spec, backend=self.settings.backend, ray={})
        self.owns_ray = connect(self.settings)
        self.slots = [_Slot(index) for index in range(self.settings.concurrency)]
        self.calls: dict[Any, tuple[_Slot, int, str]] = {}  # answers awaited, by reference
        self.backlog: deque[EngineRequest] = deque()  # added, not yet in a replica
        self.suspects: deque[EngineRequest] = deque()  # were in a replica that died
        self.solo_deaths: dict[str, int] = {}
        self.finished: list[EngineOutput] = []
        self.retired = (0, 0)  # the counters of replicas that died
        self.idle = True  # nothing has run since the last step (or the load)
        try:
            check_resources(self.settings, spec.alias)
            self.actor = ray.remote(Replica).options(
                num_cpus=self.settings.num_cpus,
                num_gpus=self.settings.num_gpus,
                max_restarts=0,  # a dead replica is replaced by a new actor (see _replace)
                runtime_env=runtime_env(spec.environment),
            )
            for slot in self.slots:
                self._start(slot)
            while not all(slot.live for slot in self.slots):
                self._collect(1.0)
                self._check_loading(every=True)
        except BaseException:
            self.close()
            raise
        infos = [slot.info for slot in self.slots if slot.info is not None]
        first = infos[0]
        self.info = EngineInfo(
            model=spec.alias,
            source=spec.source,
            runner=first.runner,
            max_model_len=first.max_model_len,
            engine_version=f"{first.engine_version} on Ray {ray.__version__}",
            hardware=describe_hardware(self.settings, infos),
            load_seconds=round(time.monotonic() - started, 3),
            settings=cluster_settings(self.settings, infos),
        )

    # -- the Engine protocol ---------------------------------------------------------------

    def add(self, request: EngineRequest) -> None:
        # Placed at the next step, together with the requests added beside it: one call
        # per replica instead of one per request. A replica's rejection comes back from
        # `step` as a failed output, as the engine process returns it.
        self.backlog.append(request)

    def step(self) -> list[EngineOutput]:
        if self.idle:
            self._check_idle_replicas()
            self.idle = False
        self._check_loading(every=False)
        self._place_suspects()
        self._place_backlog()
        for slot in self.slots:
            while slot.live and slot.assigned and slot.advancing < CALLS_AHEAD:
                self._call(slot, "advance", ADVANCE_SECONDS)
                slot.advancing += 1
        self._collect(WAIT_SECONDS)
        outputs, self.finished = self.finished, []
        self.idle = not self.has_unfinished()
        return outputs

    def has_unfinished(self) -> bool:
        return bool(
            self.backlog
            or self.suspects
            or self.finished
            or any(slot.assigned for slot in self.slots)
        )

    def abort(self, keys: list[str]) -> None:
        dropped = set(keys)
        self.backlog = deque(request for request in self.backlog if request.key not in dropped)
        self.suspects = deque(request for request in self.suspects if request.key not in dropped)
        self.finished = [output for output in self.finished if output.key not in dropped]
        for slot in self.slots:
            held = [key for key in slot.assigned if key in dropped]
            for key in held:
                del slot.assigned[key]
                if slot.solo == key:
                    slot.solo = None
            if held and slot.live:
                self._call(slot, "abort", held)

    def counters(self) -> tuple[int, int]:
        prompt, completion = self.retired
        for slot in self.slots:
            prompt += slot.counters[0]
            completion += slot.counters[1]
        return prompt, completion

    def close(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        live = [slot.handle for slot in self.slots if slot.live]
        try:
            ray.get([handle.close.remote() for handle in live], timeout=CLOSE_SECONDS)
        except ray.exceptions.RayError:
            pass  # a replica that cannot close cleanly is killed all the same
        for slot in self.slots:
            if slot.handle is not None:
                ray.kill(slot.handle, no_restart=True)
                slot.handle = None
            slot.live = False
        self.calls.clear()
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False

    # -- replicas --------------------------------------------------------------------------

    def _start(self, slot: _Slot) -> None:
        slot.handle = self.actor.remote()
        slot.generation += 1
        slot.live = False
        slot.started = time.monotonic()
        slot.advancing = 0
        self._call(slot, "load", self.inner)

    def _check_loading(self, every: bool) -> None:
        """At load every replica must come up in time; later the engine carries on with the
        replicas it has while one is replaced (its node may be gone), and gives up only
        when none has been live for that long."""
        late = [
            slot
            for slot in self.slots
            if not slot.live and time.monotonic() - slot.started > self.load_seconds
        ]
        if late and (every or not any(slot.live for slot in self.slots)):
            raise self._load_error(
                f"a Ray replica was not placed and loaded within {self.load_seconds:g} s"
            )

    def _check_idle_replicas(self) -> None:
        """Before work resumes, replace the replicas that died while idle (a GPU box switched
        off overnight), so that no request is sent to a dead one and made a suspect."""
        pings = []
        for slot in self.slots:
            if slot.live and not slot.assigned:
                pings.append(self._call(slot, "advance", 0.0))
                slot.advancing += 1
        deadline = time.monotonic() + PING_SECONDS
        while any(ping in self.calls for ping in pings) and time.monotonic() < deadline:
            self._collect(WAIT_SECONDS)

    def _load_error(self, why: str) -> Exception:
        message = f"model {self.spec.alias!r} could not run on Ray: {why}"
        return ReplicaLost(message) if hasattr(self, "info") else EngineLoadError(message)

    def _call(self, slot: _Slot, method: str, argument: Any) -> Any:
        reference = getattr(slot.handle, method).remote(argument)
        self.calls[reference] = (slot, slot.generation, method)
        return reference

    def _collect(self, timeout: float) -> None:
        """Take every answer that is in, waiting up to `timeout` for the first."""
        import ray

        if not self.calls:
            time.sleep(timeout)
            return
        waiting = list(self.calls)
        ready, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
        for reference in ready:
            self._receive(reference)

    def _receive(self, reference: Any) -> None:
        import ray

        slot, generation, method = self.calls.pop(reference)
        if generation != slot.generation:
            return  # from a replica that has been replaced since
        try:
            answer = ray.get(reference)
        except ray.exceptions.RayError as error:
            if method == "load":
                raise self._load_error(f"a replica ended while loading ({_cause(error)})") from None
            self._replace(slot, _cause(error))
            return
        if method == "load":
            status, payload = answer
            if status != "ready":
                raise self._load_error(payload)
            slot.live, slot.info = True, payload
        elif method == "advance":
            slot.advancing -= 1
            outputs, slot.counters, _ = answer
            for output in outputs:
                if slot.assigned.pop(output.key, None) is None:
                    continue  # aborted meanwhile
                if slot.solo == output.key:
                    slot.solo = None
                self.finished.append(output)

    def _replace(self, slot: _Slot, why: str) -> None:
        """A replica died: what it held becomes suspect, and a new actor takes its place."""
        import ray

        held = list(slot.assigned.values())
        log.warning(
            "Ray replica %d of %s died with %d requests in it (%s); starting another",
            slot.index,
            self.spec.alias,
            len(held),
            why,
        )
        if slot.solo is not None and held:
            request = held[0]
            deaths = self.solo_deaths.get(request.key, 0) + 1
            self.solo_deaths[request.key] = deaths
            if deaths >= SOLO_CRASHES:
                self.finished.append(_condemned(request))
            else:
                self.suspects.appendleft(request)
        else:
            self.suspects.extend(held)
        prompt, completion = self.retired
        self.retired = (prompt + slot.counters[0], completion + slot.counters[1])
        slot.assigned.clear()
        slot.counters = (0, 0)
        slot.reserved, slot.solo = False, None
        ray.kill(slot.handle, no_restart=True)
        self._start(slot)

    # -- placing requests --------------------------------------------------------------------

    def _place_suspects(self) -> None:
        """Run suspects one at a time, each alone in a replica kept for them; where there
        are two replicas or more, one keeps serving the other requests meanwhile."""
        live = [slot for slot in self.slots if slot.live]
        if not live:
            return
        running = sum(1 for slot in live if slot.solo is not None)
        wanted = min(max(1, len(live) - 1), running + len(self.suspects))
        reserved = sum(1 for slot in live if slot.reserved)
        for slot in sorted(live, key=lambda slot: len(slot.assigned)):
            if reserved >= wanted:
                break
            if not slot.reserved:
                slot.reserved = True
                reserved += 1
        for slot in live:
            if not slot.reserved or slot.assigned:
                continue  # still draining, or running its suspect
            if self.suspects:
                request = self.suspects.popleft()
                slot.solo = request.key
                slot.assigned[request.key] = request
                self._call(slot, "add", [request])
            else:
                slot.reserved = False

    def _place_backlog(self) -> None:
        """Each waiting request to the open replica with the fewest requests in it."""
        open_slots = [slot for slot in self.slots if slot.live and not slot.reserved]
        if not self.backlog or not open_slots:
            return
        batches: dict[int, list[EngineRequest]] = {}
        while self.backlog:
            request = self.backlog.popleft()
            slot = min(open_slots, key=lambda slot: len(slot.assigned))
            slot.assigned[request.key] = request
            batches.setdefault(slot.index, []).append(request)
        for index, requests in batches.items():
            self._call(self.slots[index], "add", requests)


def _condemned(request: EngineRequest) -> EngineOutput:
    return EngineOutput(
        key=request.key,
        prompt_tokens=0,
        error_code="engine_crashed",
        error_message=(
            f"a Ray replica of the engine died each of the {SOLO_CRASHES} times this request "
            "ran alone in it"
        ),
    )


def _cause(error: Exception) -> str:
    """The first line of a Ray error: what happened, without Ray's traceback."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
