"""kvlm on Ray Serve (the optional `ray` extra): engine replicas sharing the KV offload tiers,
behind one OpenAI-compatible ingress with prefix-affinity routing. See docs/scaling.md."""

from kvlm.ray_serve.app import app_builder, build_application
from kvlm.ray_serve.config import ServeAppConfig, ServeAppConfigError

__all__ = ["ServeAppConfig", "ServeAppConfigError", "app_builder", "build_application"]
