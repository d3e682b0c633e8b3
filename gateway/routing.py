"""Which upstream answers a request: by the route's format and the request's ``model``.

``Router.chain(format, model)`` is the upstream to try first and those that stand in for it,
in order: the first of ``UPSTREAMS`` of that format whose ``MODELS`` patterns match the
model, then its fallbacks, each followed by its own (depth first, each upstream once). A
request without a model goes to the first upstream of its format. With one upstream
(``UPSTREAMS`` unset), it answers everything, as it always did.

The model comes from the parse capture already made of the body; the chain a model gets is
remembered, so a request costs one dictionary lookup.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.upstream import Upstream

OPENAI = "openai"
ANTHROPIC = "anthropic"
REMEMBERED = 4096  # model names whose chain is kept; more (a client making names up): forgotten


class Router:
    def __init__(self, upstreams: Sequence[Upstream]) -> None:
        if not upstreams:
            raise ValueError("a router needs at least one upstream")
        self.upstreams = tuple(upstreams)
        self.single = len(self.upstreams) == 1 and self.upstreams[0].name == "default"
        self._by_name = {upstream.name: upstream for upstream in self.upstreams}
        self._chains: dict[tuple[str, str | None], tuple[Upstream, ...]] = {}

    def of_format(self, format: str) -> tuple[Upstream, ...]:
        if self.single:
            return self.upstreams
        return tuple(upstream for upstream in self.upstreams if upstream.format == format)

    def chain(self, format: str, model: str | None) -> tuple[Upstream, ...]:
        """The upstreams to try in order; empty when none serves ``model``."""
        key = (format, model)
        found = self._chains.get(key)
        if found is None:
            found = self._find(format, model)
            if len(self._chains) >= REMEMBERED:
                self._chains.clear()
            self._chains[key] = found
        return found

    def _find(self, format: str, model: str | None) -> tuple[Upstream, ...]:
        candidates = self.of_format(format)
        if not candidates:
            return ()
        first = candidates[0]
        if model is not None and not self.single:
            matching = [upstream for upstream in candidates if upstream.serves(model)]
            if not matching:
                return ()
            first = matching[0]
        order: list[Upstream] = []
        self._follow(first, order)
        return tuple(order)

    def _follow(self, upstream: Upstream, order: list[Upstream]) -> None:
        if upstream in order:
            return
        order.append(upstream)
        for name in upstream.fallbacks:
            self._follow(self._by_name[name], order)


def format_of(path: str) -> str:
    """The format a ``/v1`` route speaks: Anthropic's Messages API, or OpenAI's."""
    return ANTHROPIC if path.startswith("/v1/messages") else OPENAI
