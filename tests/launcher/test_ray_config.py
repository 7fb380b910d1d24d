"""The ray launcher's settings, placement specs and addresses, without starting Ray."""

from __future__ import annotations

import pytest

from tandem.launcher.addresses import advertised_host, interface_of, restrict_ucx_to
from tandem.launcher.config import build_serve_config
from tandem.launcher.ray_config import PoolPlacement, RayConfig, parse_placement


def test_placement_from_k_v_pairs_and_json():
    assert parse_placement("prefill_node=1,zone=a", "x") == PoolPlacement(
        {"prefill_node": 1.0}, {"zone": "a"})
    assert parse_placement('{"decode_node": 0.5, "gpu-type": "H200"}', "x") == PoolPlacement(
        {"decode_node": 0.5}, {"gpu-type": "H200"})
    assert parse_placement("{'decode_node': 2}", "x") == PoolPlacement({"decode_node": 2.0})
    assert parse_placement("", "x") == PoolPlacement()


@pytest.mark.parametrize("text", ["prefill_node", "a=-1", '{"a": [1]}', "{oops", '["a"]'])
def test_bad_placement_is_refused(text):
    with pytest.raises(ValueError):
        parse_placement(text, "prefill_resources")


def test_serve_settings_reach_the_ray_config():
    config = build_serve_config({"launcher": "ray", "ray_address": "127.0.0.1:6379",
                                 "prefill_resources": "prefill_node=1",
                                 "ray_cpus_per_worker": "2", "internal_host": "0.0.0.0"},
                                environ={})
    assert config.launcher == "ray"
    assert config.ray == RayConfig("127.0.0.1:6379", "prefill_node=1", "", 2.0)
    assert config.ray.placement("prefill").resources == {"prefill_node": 1.0}
    assert config.frontend.control_host == "0.0.0.0"
    assert build_serve_config({}, environ={}).launcher == "local"
    assert build_serve_config({}, environ={}).frontend.control_host == "127.0.0.1"


def test_yaml_mapping_for_a_pool(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("launcher: ray\ndecode_resources: {decode_node: 1, zone: b}\n")
    config = build_serve_config({}, str(path), environ={})
    assert config.ray.placement("decode") == PoolPlacement({"decode_node": 1.0}, {"zone": "b"})


def test_bad_launcher_and_cpus_are_refused():
    with pytest.raises(ValueError, match="launcher"):
        build_serve_config({"launcher": "k8s"}, environ={})
    with pytest.raises(ValueError, match="ray_cpus_per_worker"):
        build_serve_config({"ray_cpus_per_worker": "0"}, environ={})


def test_advertised_host_and_ucx_interface():
    assert advertised_host("127.0.0.1", "10.0.0.7") == "127.0.0.1"
    assert advertised_host("0.0.0.0", "10.0.0.7") == "10.0.0.7"
    assert advertised_host("0.0.0.0") == "127.0.0.1"
    assert interface_of("127.0.0.1") == "lo"
    environ: dict[str, str] = {}
    assert restrict_ucx_to("127.0.0.1", environ) == "lo" and environ == {"UCX_NET_DEVICES": "lo"}
    user_set = {"UCX_NET_DEVICES": "mlx5_0:1"}
    assert restrict_ucx_to("127.0.0.1", user_set) is None
    assert user_set["UCX_NET_DEVICES"] == "mlx5_0:1"
    wildcard: dict[str, str] = {}
    assert restrict_ucx_to("0.0.0.0", wildcard) is None and wildcard == {}


def test_ray_launcher_without_ray_says_how_to_get_it(monkeypatch):
    import builtins

    from tandem.launcher import ray_deploy

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ValueError, match="pip install 'ray"):
        ray_deploy.import_ray()
