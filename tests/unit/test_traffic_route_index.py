"""The first-segment route index gives exactly the linear first-match answer (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from planemesh.agent.proxy.routing import CompiledVirtualHost
from planemesh.model.config import Route, RouteMatch, VirtualHost

segments = st.sampled_from(["a", "ab", "b", "svc1", "svc10", ""])
paths = st.lists(segments, min_size=0, max_size=3).map(lambda segs: "/" + "/".join(segs))
matches = st.one_of(
    paths.map(lambda p: RouteMatch(prefix=p)),
    paths.map(lambda p: RouteMatch(prefix=p + "/")),
    paths.map(lambda p: RouteMatch(prefix=None, path=p)),
    st.sampled_from([RouteMatch(prefix=None, regex="/a.*"), RouteMatch(prefix="/"), RouteMatch(prefix="/s")]),
)


def linear(vh: CompiledVirtualHost, path: str):
    for route in vh.routes:
        if route.matches(path, "", dict):
            return route.route
    return None


@settings(max_examples=200, deadline=None)
@given(st.lists(matches, min_size=9, max_size=30), st.lists(paths | st.just("*"), min_size=1, max_size=10))
def test_index_agrees_with_linear_first_match(route_matches, requests) -> None:
    vh = CompiledVirtualHost(VirtualHost(name="v", routes=tuple(
        Route(match=m, name=f"r{i}") for i, m in enumerate(route_matches))))
    assert vh.by_segment is not None
    for path in requests:
        assert vh.select(path, "", dict) is linear(vh, path)
