"""The balancer with fake deployments: least in flight, round robin on ties, cooldown, probe back,
fallback chains."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from gateway.balance import Health, candidates, pick
from gateway.interface import Backend, Capabilities, GenerationRequest, ReadyState, StreamItem
from gateway.router import Route, Router


class _Deployment(Backend):
    Options = msgspec.Struct

    def __init__(self, name: str) -> None:
        super().__init__(name, msgspec.Struct())
        self.state = ReadyState(ready=True)
        self.cooling_until: float | None = None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    def ready(self) -> ReadyState:
        return self.state

    def cooling_down_until(self) -> float | None:
        return self.cooling_until

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        raise NotImplementedError
        yield


def _route(name: str, tag: str, *, fallbacks: tuple[str, ...] = (), aliases: tuple[str, ...] = ()) -> Route:
    route = Route(name, aliases, "fake", _Deployment(f"{name}-{tag}"), fallbacks=fallbacks, cooldown_s=10)
    route.phase = "serving"
    return route


def _tags(routes: list[Route]) -> list[str]:
    return [route.backend.model_name for route in routes]


def test_health_cools_down_then_probes_once() -> None:
    health = Health()
    assert health.standing(0) == "healthy" and not health.begin(0)
    health.failed(100, 10, "connect refused")
    assert health.standing(105) == "cooling" and not health.begin(105)
    assert health.standing(110) == "probe"
    assert health.begin(110)  # the one probe
    assert health.standing(111) == "cooling" and not health.begin(111)  # others wait for its verdict
    health.settle(True)  # no verdict (the client left): the next request probes
    assert health.begin(112)
    health.failed(112, 10, "still down")
    assert health.standing(115) == "cooling" and health.num_failures == 2
    assert health.begin(122)
    health.succeeded()
    assert health.standing(122) == "healthy" and health.reason == ""
    health.failed(130, 0, "no cooldown")  # cooldown_s = 0: never cooled
    assert health.standing(130) == "healthy"


def test_least_in_flight_then_round_robin() -> None:
    a, b, c = _route("m", "a"), _route("m", "b"), _route("m", "c")
    router = Router([a, b, c])
    chain = router.chain("m")
    firsts = [_tags(candidates(chain, 0))[0] for _ in range(6)]
    assert sorted(firsts) == ["m-a", "m-a", "m-b", "m-b", "m-c", "m-c"]  # ties in turn
    a.num_in_flight, b.num_in_flight, c.num_in_flight = 2, 0, 1
    assert _tags(candidates(chain, 0)) == ["m-b", "m-c", "m-a"]
    # every pick counts itself in: requests spread one at a time
    spread = []
    for _ in range(3):
        route = pick(chain, (), 0)
        assert route is not None
        route.acquire()
        spread.append(route.backend.model_name)
    assert sorted(spread) == ["m-b", "m-b", "m-c"] or sorted(spread) == ["m-b", "m-c", "m-c"]
    assert max(r.num_in_flight for r in (a, b, c)) - min(r.num_in_flight for r in (a, b, c)) <= 1


def test_cooling_down_is_tried_last_and_probed_back() -> None:
    a, b = _route("m", "a"), _route("m", "b")
    chain = Router([a, b]).chain("m")
    a.health.failed(0, 10, "502")
    for _ in range(4):
        assert _tags(candidates(chain, 5)) == ["m-b", "m-a"]  # still a last resort
    b.num_in_flight = 3
    assert _tags(candidates(chain, 5))[0] == "m-b"  # even when busier
    # after the cooldown: the next request probes it first, the others stay on b meanwhile
    assert _tags(candidates(chain, 10)) == ["m-a", "m-b"]
    assert a.health.begin(10)
    assert _tags(candidates(chain, 10)) == ["m-b", "m-a"]
    a.health.succeeded()
    assert _tags(candidates(chain, 10))[0] == "m-a"  # healthy, fewer in flight


def test_not_ready_unloaded_failed_and_backend_cooldown() -> None:
    a, b, c, d = _route("m", "a"), _route("m", "b"), _route("m", "c"), _route("m", "d")
    chain = Router([a, b, c, d]).chain("m")
    a.backend.state = ReadyState(ready=False, detail="loading")  # type: ignore[attr-defined]
    b.phase = "stopped"
    c.backend.state = ReadyState(ready=False, failed=True, detail="no file")  # type: ignore[attr-defined]
    assert _tags(candidates(chain, 0)) == ["m-d", "m-a", "m-c"]  # loading after ready; failed last
    d.backend.cooling_until = 50.0  # type: ignore[attr-defined]  # its own breaker
    assert _tags(candidates(chain, 0)) == ["m-a", "m-c", "m-d"]
    assert pick(chain, [a, c, d], 0) is None


def test_fallback_chain_breadth_first_each_once() -> None:
    a1, a2 = _route("a", "1", fallbacks=("b",)), _route("a", "2", fallbacks=("c", "b"))
    b = _route("b", "1", fallbacks=("a-alias",))  # a cycle back to a: each candidate tried once
    c = _route("c", "1", fallbacks=("d",), aliases=())
    d = _route("d", "1")
    a1.aliases = ("a-alias",)
    router = Router([a1, a2, b, c, d])
    assert [g.name for g in router.chain("a-alias")] == ["a", "b", "c", "d"]
    assert [g.name for g in router.chain("b")] == ["b", "a", "c", "d"]
    a1.num_in_flight = 1
    assert _tags(candidates(router.chain("a"), 0)) == ["a-2", "a-1", "b-1", "c-1", "d-1"]
    # a cooling deployment of the group goes after the fallbacks
    a2.health.failed(0, 10, "504")
    assert _tags(candidates(router.chain("a"), 1)) == ["a-1", "b-1", "c-1", "d-1", "a-2"]
    assert [name for name, _ in router.names()] == ["a", "a-alias", "b", "c", "d"]  # a group once
    assert router.resolve("a") is a1 and router.get("nope") is None
