"""`kvlm serve --replicas ...` options: bad ones fail with `error: ...` and exit 2 before Ray
or a model starts; good ones become the Serve deployment's options."""

from __future__ import annotations

import pytest
from ray_app import NEEDS_RAY

from kvlm.cli.main import main
from kvlm.engine.config import EngineConfig

pytest.importorskip("ray.serve", reason=NEEDS_RAY)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--replicas", "0"], ["--replicas must be >= 1, got 0"]),
        (["--replicas", "2", "--autoscaling-config", "{}"], ["not both"]),
        (["--autoscaling-config", "{nope"], ["--autoscaling-config is not JSON"]),
        (["--autoscaling-config", '{"min_replicas": 3, "max_replicas": 1}'], ["autoscaling"]),
        (["--replicas", "2", "--replica-cpus", "0"], ["--replica-cpus must be > 0"]),
        (["--replicas", "2", "--max-imbalance", "-1"], ["--max-imbalance must be >= 0"]),
        (["--replicas", "2", "--port", "0"], ["--port 0 is not supported with --replicas"]),
    ],
)
def test_bad_ray_options_fail_before_starting(
    argv: list[str], words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err


def test_options_reach_the_engine_deployment() -> None:
    from kvlm.ray_serve.config import ServeAppConfig

    config = ServeAppConfig(
        engine=EngineConfig(max_num_seqs=16, kv_offload="redis://kv:6379"),
        served_model_name="m",
        num_replicas=None,
        autoscaling={"min_replicas": 1, "max_replicas": 6},
        replica_cpus=4,
        replica_gpus=0.5,
        max_imbalance=2,
    )
    options = config.engine_deployment_options()
    assert options["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 0.5}
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 6}
    assert "num_replicas" not in options
    assert options["max_ongoing_requests"] == 16
    router = options["request_router_config"]
    assert router["request_router_class"] == "kvlm.ray_serve.router:PrefixAffinityRouter"
    assert router["request_router_kwargs"]["max_imbalance"] == 2
    assert config.max_replicas == 6


def test_a_serve_config_files_args_build_the_application() -> None:
    from ray.serve import Application

    from kvlm.ray_serve.app import app_builder

    args = {"served_model_name": "m", "num_replicas": 3, "engine": {"max_num_seqs": 8}}
    assert isinstance(app_builder(args), Application)
    with pytest.raises(TypeError, match="replicas"):
        app_builder({"served_model_name": "m", "replicas": 3})
