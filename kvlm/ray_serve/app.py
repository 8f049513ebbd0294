"""The Ray Serve application graph: an ingress, N engine replicas, and the replica board.

    HTTP -> Serve proxy -> KVLMIngress --(prefix router)--> KVLMReplica x N --> Redis tier
                               └──────── ReplicaBoard <── heartbeats ──┘

`build_application(config)` is what `kvlm serve --replicas N` runs on a local Ray; for an
existing cluster, `app_builder` is the import path of a Serve config file (`serve run
config.yaml`, see docs/scaling.md), whose `args` are `ServeAppConfig`'s fields with `engine`
holding `EngineConfig`'s.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from kvlm.engine.config import EngineConfig
from kvlm.ray_serve.board import ReplicaBoard
from kvlm.ray_serve.config import ServeAppConfig
from kvlm.ray_serve.ingress import KVLMIngress
from kvlm.ray_serve.replica import KVLMReplica

# The ingress only forwards bytes and waits: it holds every request in flight at once.
INGRESS_MAX_ONGOING_REQUESTS = 4096


def build_application(config: ServeAppConfig) -> Application:
    # The board and the ingress reserve no CPU: the engine replicas get the cores.
    board = serve.deployment(
        ReplicaBoard, name="ReplicaBoard", ray_actor_options={"num_cpus": 0}
    ).bind()
    engines = (
        serve.deployment(KVLMReplica)
        .options(**config.engine_deployment_options())
        .bind(config, board)
    )
    ingress = serve.deployment(
        KVLMIngress,
        name="KVLMIngress",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
    )
    return ingress.bind(config, engines, board)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's application builder: `args` from the config file (see module doc)."""
    fields = dict(args)
    engine = EngineConfig(**fields.pop("engine", {}))
    return build_application(ServeAppConfig(engine=engine, **fields))
