"""`edgecl device init`: one config file (mode 0600, atomic) that delta, push and pull read; flags
override it; bad values are refused with a one-line error."""

from __future__ import annotations

import os
import stat

import pytest
from edgecl_test_deltas import make_delta
from edgecl_test_server import ServerProcess, make_fleet
from typer.testing import CliRunner

from edgecl.cli.main import app
from edgecl.device.provision import DeviceConfig, init_device, load_device_config, set_bundle
from edgecl.errors import ConfigError
from edgecl.formats import delta as D

KEY = "ab" * 32
SERVER_KEY = "cd" * 32
runner = CliRunner()


def test_init_writes_a_private_config_that_loads_back(tmp_path):
    path = init_device(tmp_path / "cfg" / "device.toml", "http://fleet.local:8750/", "line3-cam1", "ecl_tok",
                       KEY, profile="devices/x86.toml", server_key=SERVER_KEY.upper(), bundle=str(tmp_path / "b"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name != "device.toml"], "no temp file left behind"
    cfg = load_device_config(path)
    assert cfg == DeviceConfig(server="http://fleet.local:8750", name="line3-cam1", token="ecl_tok", key=KEY,
                               server_key=SERVER_KEY, profile="devices/x86.toml", bundle=str(tmp_path / "b"),
                               source=str(path))
    set_bundle(path, tmp_path / "b.v2")
    assert load_device_config(path).bundle == str(tmp_path / "b.v2")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_env_var_and_default_path(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECL_DEVICE_CONFIG", str(tmp_path / "env.toml"))
    assert load_device_config() is None                    # no config: callers fall back to flags
    with pytest.raises(ConfigError, match="no device config"):
        load_device_config(required=True)
    init_device(None, "http://h:1", "d1", "t", KEY)
    assert load_device_config().name == "d1" and (tmp_path / "env.toml").exists()


@pytest.mark.parametrize("field,value,match", [("server", "fleet.local", "http"), ("name", "../x", "device name"),
                                               ("name", "merge", "device name"), ("key", "xyz", "64 hex"),
                                               ("server_key", "12", "64 hex"), ("token", "a\nb", "one-line")])
def test_bad_values_refused(tmp_path, field, value, match):
    args = dict(server="http://h:1", name="d", token="t", key=KEY, server_key="")
    args[field] = value
    with pytest.raises(ConfigError, match=match):
        init_device(tmp_path / "c.toml", **args)
    assert not (tmp_path / "c.toml").exists()


def test_hand_edited_config_is_checked_and_unknown_keys_warned(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('server = "http://h:1"\nname = "d"\ntokn = "typo"\n')
    path.chmod(0o600)
    with pytest.warns(UserWarning, match="tokn"):
        assert load_device_config(path).token == ""
    path.write_text('name = 3\n')
    with pytest.raises(ConfigError, match="name"):
        load_device_config(path)
    path.write_text('name = "unterminated\n')
    with pytest.raises(ConfigError, match="cannot read"):
        load_device_config(path)


def test_cli_init_then_push_uses_the_config(tmp_path):
    fleet = make_fleet(tmp_path / "store", 1)
    server = ServerProcess(tmp_path / "store").start()
    try:
        token, key = fleet.devices["dev-0"]
        cfg = tmp_path / "device.toml"
        result = runner.invoke(app, ["device", "init", "--server", server.url, "--name", "dev-0", "--token", token,
                                     "--key", key.hex(), "--outbox", str(tmp_path / "outbox"), "--config", str(cfg)])
        assert result.exit_code == 0 and "NO server key" in result.output, result.output
        delta = tmp_path / "d.safetensors"
        D.save_file(make_delta(fleet.manifest, "dev-0", 3), delta, key)
        sent = runner.invoke(app, ["push", str(delta), "--config", str(cfg)])
        assert sent.exit_code == 0 and "sent" in sent.output, sent.output
        again = runner.invoke(app, ["push", str(delta)], env={"EDGECL_DEVICE_CONFIG": str(cfg)})
        assert again.exit_code == 0 and "already there" in again.output
        # a flag overrides the config: a wrong token is refused by the server
        wrong = runner.invoke(app, ["push", str(delta), "--config", str(cfg), "--token", "ecl_wrong"])
        assert wrong.exit_code == 2 and "auth_invalid" in wrong.output
        bad = runner.invoke(app, ["device", "init", "--server", "nope", "--name", "d", "--token", "t", "--key", KEY,
                                  "--config", str(tmp_path / "x.toml")])
        assert bad.exit_code == 1 and bad.output.startswith("error: ") and len(bad.output.strip().splitlines()) == 1
        assert os.stat(cfg).st_mode & 0o077 == 0
    finally:
        server.stop()
        fleet.store.close()


def test_held_out_report_from_adapts_gate():
    """What `edgecl delta` carries from adapt's gate (report.gate in the generation's meta.json)."""
    from edgecl.device.deltafile import heldout_from_gate

    kept = {"head": "lda", "held_out_images": 8, "adapted_accuracy": 0.75, "prototypes_only_accuracy": 0.5,
            "kept": "adapted"}
    assert heldout_from_gate(kept) == {"before": {"accuracy": 0.5, "images": 8}, "after": {"accuracy": 0.75, "images": 8}}
    refused = {**kept, "adapted_accuracy": 0.25, "kept": "prototypes-only"}
    assert heldout_from_gate(refused)["after"] == {"accuracy": 0.5, "images": 8}, "after = what the device kept"
    evaluated = {"after": {"accuracy": 0.9, "images": 10, "per_class": {"bolt": {"accuracy": 1.0, "images": 5}}}}
    assert heldout_from_gate(evaluated) == {"after": {"accuracy": 0.9, "images": 10, "per_class": {"bolt": 1.0}}}
    assert heldout_from_gate(None) is None and heldout_from_gate({"kept": "adapted"}) is None
    with pytest.warns(UserWarning, match="not carried"):
        assert heldout_from_gate({"after": {"accuracy": 7.0}}) is None
