"""Start the application on Ray from this process (`kvlm serve --replicas N`, tests).

Without an address, a local Ray is started sized for the replicas (logical CPUs = replicas x
`replica_cpus`, so they always fit; the cores are shared by the OS as usual), with a small
object store and no dashboard: kvlm moves only request bytes and token deltas through Ray.
"""

from __future__ import annotations

import ray
from ray import serve

from kvlm.ray_serve.app import build_application
from kvlm.ray_serve.config import APP_NAME, ServeAppConfig

OBJECT_STORE_BYTES = 300 * 1024 * 1024


def start(config: ServeAppConfig, host: str, port: int, address: str | None = None) -> str:
    """Start Ray (or join `address`), Serve's HTTP proxy on host:port and the application;
    return the URL once every replica has loaded its model."""
    if address is None:
        max_replicas = config.max_replicas
        ray.init(
            num_cpus=max(1, round(max_replicas * config.replica_cpus)),
            num_gpus=round(max_replicas * config.replica_gpus),
            object_store_memory=OBJECT_STORE_BYTES,
            include_dashboard=False,
            log_to_driver=False,
        )
    else:
        ray.init(address=address, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(config), name=APP_NAME, route_prefix="/")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def stop() -> None:
    """Delete the application, stop Serve and leave Ray (stopping it if `start` started it)."""
    serve.shutdown()
    ray.shutdown()
