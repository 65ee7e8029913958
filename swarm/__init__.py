"""Everything that touches hivemind: tokens on the DHT, the access gate, averagers, CenteredClip, the round
optimizer, the witness, followers and the peer-to-peer state hand-over. One import place for node and coordinator::

    from omi import swarm
    dht = swarm.start_dht(spec, swarm.TokenFile(path), swarm_key=swarm.load_or_create_swarm_key(key_path))

Create DHTs, averagers and optimizers in the main thread of a process: hivemind forks them from there.
"""

from omi.protos.tokens import TokenFile, TokenProvider, is_valid_access_token, mint_access_token
from omi.swarm.access import (
    PeerAccessGate,
    RevocationValidator,
    TokenRegistryValidator,
    publish_revocations,
    revocation_key,
    start_token_publisher,
    token_registry_key,
)
from omi.swarm.averagers import AccessControlledAveragerMixin, AllReduceRefused
from omi.swarm.compression import COMPRESSIONS
from omi.swarm.dht import exit_with_parent, make_dht, start_bootstrap_dht, start_dht
from omi.swarm.follower import SwarmFollower
from omi.swarm.keys import load_or_create_peer_identity, load_or_create_swarm_key, swarm_public_key
from omi.swarm.params_p2p import ParamsFetcher, ParamsRefused, ParamsServer, ParamsUnavailable, snapshot
from omi.swarm.reduce import CenteredClipAllReduceRunner, CenteredClipReducer, centered_clip
from omi.swarm.rounds import RoundOptimizer, RoundResult
from omi.swarm.signals import install_stop_signals
from omi.swarm.tokens import (
    AccessDenied,
    CoordinatorTokenAuthorizer,
    MintingTokenProvider,
    from_hivemind_token,
    to_hivemind_token,
)
from omi.swarm.witness import RoundWitness, Witnessed, swarm_round, trainer_rounds

__all__ = [
    "AccessControlledAveragerMixin",
    "AccessDenied", "AllReduceRefused", "COMPRESSIONS", "CenteredClipAllReduceRunner", "CenteredClipReducer",
    "CoordinatorTokenAuthorizer", "MintingTokenProvider", "ParamsFetcher", "ParamsRefused", "ParamsServer",
    "ParamsUnavailable", "PeerAccessGate", "RevocationValidator", "RoundOptimizer", "RoundResult", "RoundWitness",
    "SwarmFollower", "Witnessed",
    "swarm_round", "trainer_rounds",
    "TokenFile", "TokenProvider", "TokenRegistryValidator", "centered_clip", "exit_with_parent",
    "from_hivemind_token", "install_stop_signals", "is_valid_access_token", "load_or_create_peer_identity",
    "load_or_create_swarm_key", "make_dht", "mint_access_token", "publish_revocations",
    "revocation_key", "snapshot", "start_bootstrap_dht", "start_dht", "start_token_publisher", "swarm_public_key",
    "to_hivemind_token", "token_registry_key",
]
