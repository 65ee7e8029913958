"""The parameters an audited node started an epoch from, served peer to peer to validators by ``params_hash``.

A validator recomputes an audited micro-batch bitwise only with the very parameters the node used. In a real
swarm honest peers hold slightly different copies (hivemind adds the averaged delta to each peer's own tensors;
partial rounds), so the validator's own copy of the epoch is rarely the node's. The node therefore keeps the
parameters of each epoch the coordinator audits (it learns *that* it is audited in the reply to its
contribution, before any validator asks) and serves them over hivemind's P2P — the libp2p connection it already
has to the swarm, not the coordinator — to peers holding a valid token of the run::

    server = ParamsServer.start(dht, spec)                  # the node, after start_dht
    server.hold(started_hash, snapshot(model))              # when its contribution of an epoch is audited
    state = fetch_params(dht, spec, node_peer_id, digest)   # a validator; None if the node did not serve them

The validator checks that what it receives hashes to the ``params_hash`` the node signed in its contribution,
so a node cannot swap parameters after the fact; and it measures their distance to its own copy of the epoch,
so a node cannot compute on parameters of its own choosing (docs/verification.md).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any, AsyncIterator  # noqa: UP035 (hivemind matches typing.AsyncIterator)

import hivemind
import torch
from hivemind.p2p import P2PContext, PeerID, ServicerBase
from hivemind.utils.asyncio import aiter_with_timeout
from omi.protos import pb
from omi.swarm.access import PeerAccessGate
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # one P2P message; hivemind's own state download uses parts of the same order
HELD_EPOCHS = 4  # audited epochs whose parameters a node keeps (validators ask within minutes)
FETCH_TIMEOUT = 60.0  # seconds a validator waits for the next chunk


def namespace(spec: pb.RunSpec) -> str:
    return f"{spec.dht_prefix}_audit_params"


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's parameters (what :func:`omi.models.params_hash` hashes), by name."""
    return {name: param.detach().to("cpu", copy=True).contiguous() for name, param in model.named_parameters()}


class EventLoopThread:
    """An asyncio loop in a daemon thread, for hivemind's P2P calls from synchronous code."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, p2p=None) -> None:
        """Shut ``p2p`` (a replica made on this loop) down, cancel what still runs, then stop and close the loop."""

        async def cancel_all():
            if p2p is not None:
                try:
                    await p2p.shutdown()
                except Exception as e:  # the daemon may be gone already
                    logger.debug("closing the P2P replica: %r", e)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_all(), timeout=5)
        except Exception as e:  # the loop is going away anyway
            logger.debug("cancelling the loop's tasks: %r", e)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


class ParamsServer(ServicerBase):
    """A node's P2P service handing out the parameters of its audited epochs to token holders.

    :param dht: the node's DHT (token registry lookups)
    :param access: the run's :class:`PeerAccessGate`
    :param keep: audited epochs kept; the oldest is dropped first
    """

    def __init__(self, dht: hivemind.DHT, access: PeerAccessGate, keep: int = HELD_EPOCHS):
        self.dht, self.access, self.keep = dht, access, keep
        self._held: OrderedDict[bytes, bytes] = OrderedDict()  # params_hash -> safetensors bytes
        self._lock = threading.Lock()
        self._loop: EventLoopThread | None = None
        self._p2p = None
        self.served = 0

    @classmethod
    def start(cls, dht: hivemind.DHT, spec: pb.RunSpec, keep: int = HELD_EPOCHS) -> ParamsServer:
        """Serve on the DHT's libp2p daemon under the run's namespace (from any thread of the node's process)."""
        server = cls(dht, PeerAccessGate(spec.coordinator_public_key, spec.run_id, spec.dht_prefix), keep)
        server._loop = EventLoopThread("omi-audit-params")

        async def register():
            server._p2p = await dht.replicate_p2p()
            await server.add_p2p_handlers(server._p2p, namespace=namespace(spec))

        server._loop.run(register(), timeout=60)
        return server

    def hold(self, digest: bytes, state: dict[str, torch.Tensor]) -> None:
        """Keep ``state`` (parameters hashing to ``digest``) for validators."""
        data = save_safetensors(state)
        with self._lock:
            self._held[digest] = data
            self._held.move_to_end(digest)
            while len(self._held) > self.keep:
                self._held.popitem(last=False)

    def held(self) -> list[bytes]:
        with self._lock:
            return list(self._held)

    def get(self, digest: bytes) -> bytes | None:
        """The safetensors bytes of the parameters with ``digest``, if held."""
        with self._lock:
            return self._held.get(digest)

    async def rpc_get_params(self, request: pb.ParamsRequest, context: P2PContext) -> AsyncIterator[pb.ParamsChunk]:
        if not await self.access.is_allowed(self.dht, context.remote_id):
            yield pb.ParamsChunk(error="no valid access token for this run")
            return
        data = self.get(request.params_hash)
        if data is None:
            logger.warning("peer %s asked for parameters %s, which this node does not hold", context.remote_id,
                           request.params_hash.hex()[:12])
            yield pb.ParamsChunk(error="parameters not held (not an audited epoch, or dropped)")
            return
        logger.info("serving the parameters %s (%d bytes) to validator peer %s", request.params_hash.hex()[:12],
                    len(data), context.remote_id)
        self.served += 1
        for offset in range(0, len(data), CHUNK_BYTES):
            yield pb.ParamsChunk(data=data[offset:offset + CHUNK_BYTES], total_bytes=len(data))

    def shutdown(self) -> None:
        if self._loop is not None:
            self._loop.stop(self._p2p)
            self._loop = None


class ParamsUnavailable(Exception):
    """The node could not be asked (unreachable, timed out) — nothing is known about its honesty."""


class ParamsRefused(Exception):
    """The node answered but did not hand over parameters (not held, or it refused us)."""


class ParamsFetcher:
    """A validator's client of :class:`ParamsServer` (one background loop for all fetches).

    :param dht: the validator's DHT (its libp2p daemon dials the node)
    :param spec: the run (namespace)
    :param timeout: seconds to wait for each chunk
    """

    def __init__(self, dht: hivemind.DHT, spec: pb.RunSpec, timeout: float = FETCH_TIMEOUT):
        self.dht, self.namespace, self.timeout = dht, namespace(spec), timeout
        self._loop = EventLoopThread("omi-params-fetch")
        self._p2p = None

    def fetch(self, peer_id: str, digest: bytes, max_bytes: int) -> dict[str, torch.Tensor]:
        """The node's parameters with ``digest``; raises :class:`ParamsUnavailable` or :class:`ParamsRefused`.

        :param max_bytes: refuse a stream announcing more (the model's size plus the file's header)
        """
        try:
            peer = PeerID.from_base58(peer_id)
        except Exception as e:
            raise ParamsRefused(f"bad peer id {peer_id!r}") from e
        try:
            data = self._loop.run(self._fetch(peer, digest, max_bytes), timeout=self.timeout * 4)
        except (ParamsRefused, ParamsUnavailable):
            raise
        except Exception as e:
            raise ParamsUnavailable(f"{type(e).__name__}: {e}") from e
        try:
            return load_safetensors(data)
        except Exception as e:  # the node sent bytes that are not a safetensors file
            raise ParamsRefused(f"malformed parameters: {e}") from e

    async def _fetch(self, peer: PeerID, digest: bytes, max_bytes: int) -> bytes:
        if self._p2p is None:
            self._p2p = await self.dht.replicate_p2p()
        p2p = self._p2p
        stub = ParamsServer.get_stub(p2p, peer, namespace=self.namespace)
        stream = await stub.rpc_get_params(pb.ParamsRequest(params_hash=digest))
        parts, total = [], None
        async for chunk in aiter_with_timeout(stream, timeout=self.timeout):
            if chunk.error:
                raise ParamsRefused(chunk.error)
            total = chunk.total_bytes if total is None else total
            if total > max_bytes:
                raise ParamsRefused(f"the node announced {total} bytes, more than the model's {max_bytes}")
            parts.append(chunk.data)
            if sum(map(len, parts)) > total:
                raise ParamsRefused("the node sent more bytes than it announced")
        data = b"".join(parts)
        if total is None or len(data) != total:
            raise ParamsUnavailable(f"stream ended after {len(data)} of {total} bytes")
        return data

    def shutdown(self) -> None:
        self._loop.stop(self._p2p)
