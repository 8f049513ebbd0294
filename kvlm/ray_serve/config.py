"""`ServeAppConfig`: everything the Ray Serve application needs, checked before Ray starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvlm.engine.config import EngineConfig
from kvlm.ray_serve.affinity import DEFAULT_MAX_TRACKED_BLOCKS
from kvlm.ray_serve.router import DEFAULT_MAX_IMBALANCE

ROUTERS = {
    "prefix": "kvlm.ray_serve.router:PrefixAffinityRouter",
    "round_robin": "kvlm.ray_serve.router:RoundRobinRouter",
    # Serve's default: two random replicas, the less loaded one.
    "pow2": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
}
APP_NAME = "kvlm"
ENGINE_DEPLOYMENT = "KVLMReplica"


class ServeAppConfigError(ValueError):
    """A Ray Serve option is invalid; the message names the option and the fix."""


@dataclass(frozen=True)
class ServeAppConfig:
    """One engine per replica, all with `engine` (the same model, cache flags and `kv_offload`
    tiers, so a block one replica wrote to Redis is a hit in every other).

    Exactly one of `num_replicas` (fixed) and `autoscaling` (Serve's `autoscaling_config`
    fields, passed through: min_replicas, max_replicas, target_ongoing_requests, ...) is set.
    """

    engine: EngineConfig
    served_model_name: str
    api_key: str | None = None
    max_request_bytes: int = 8 * 1024 * 1024
    session_dir: str | None = None  # shared by all replicas: put it on a shared filesystem
    num_replicas: int | None = None
    autoscaling: dict[str, Any] | None = None
    replica_cpus: float = 1.0  # Ray logical CPUs each engine replica reserves
    replica_gpus: float = 0.0
    routing: str = "prefix"
    max_imbalance: int = DEFAULT_MAX_IMBALANCE
    max_tracked_blocks: int = DEFAULT_MAX_TRACKED_BLOCKS
    ray_actor_options: dict[str, Any] = field(default_factory=dict)  # e.g. runtime_env

    def __post_init__(self) -> None:
        if (self.num_replicas is None) == (self.autoscaling is None):
            given = "neither" if self.num_replicas is None else "both"
            raise ServeAppConfigError(
                "give either a fixed number of replicas (--replicas N) or an autoscaling "
                f"config (--autoscaling-config), not {given}"
            )
        if self.num_replicas is not None and self.num_replicas < 1:
            raise ServeAppConfigError(f"--replicas must be >= 1, got {self.num_replicas}")
        if self.replica_cpus <= 0:
            raise ServeAppConfigError(f"--replica-cpus must be > 0, got {self.replica_cpus}")
        if self.replica_gpus < 0:
            raise ServeAppConfigError(f"--replica-gpus must be >= 0, got {self.replica_gpus}")
        if self.routing not in ROUTERS:
            raise ServeAppConfigError(
                f"unknown --routing {self.routing!r}: choose one of {', '.join(ROUTERS)}"
            )
        if self.max_imbalance < 0:
            raise ServeAppConfigError(f"--max-imbalance must be >= 0, got {self.max_imbalance}")
        if self.max_tracked_blocks < 1:
            raise ServeAppConfigError(
                f"max_tracked_blocks must be >= 1, got {self.max_tracked_blocks}"
            )
        if self.autoscaling is not None:
            from ray.serve.config import AutoscalingConfig  # Serve checks its own fields

            try:
                AutoscalingConfig(**self.autoscaling)
            except Exception as e:  # pydantic's ValidationError, or a TypeError
                raise ServeAppConfigError(f"invalid --autoscaling-config: {e}") from e

    @property
    def max_replicas(self) -> int:
        """The most engine replicas that can run at once (fixed, or autoscaling's bound)."""
        if self.num_replicas is not None:
            return self.num_replicas
        from ray.serve.config import AutoscalingConfig

        return AutoscalingConfig(**self.autoscaling).max_replicas

    def engine_deployment_options(self) -> dict[str, Any]:
        """`Deployment.options(...)` for the engine replicas."""
        router: dict[str, Any] = {"request_router_class": ROUTERS[self.routing]}
        if self.routing == "prefix":
            router["request_router_kwargs"] = {
                "max_imbalance": self.max_imbalance,
                "max_tracked_blocks": self.max_tracked_blocks,
            }
        actor_options = {
            **self.ray_actor_options,
            "num_cpus": self.replica_cpus,
            "num_gpus": self.replica_gpus,
        }
        options: dict[str, Any] = {
            "name": ENGINE_DEPLOYMENT,
            "ray_actor_options": actor_options,
            # The engine batches max_num_seqs requests; more would only wait in its queue,
            # where the router can no longer move them to an idle replica.
            "max_ongoing_requests": self.engine.max_num_seqs,
            "request_router_config": router,
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling
        else:
            options["num_replicas"] = self.num_replicas
        return options
