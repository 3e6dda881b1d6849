"""FAIR metadata: the start document a plan builds, and the validator that refuses incomplete ones."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from data_fixtures import _isolated_data_env, fake_machine, machine  # noqa: F401 - fixtures

from acc_bluesky.data.metadata import (
    REQUIRED_KEYS,
    MetadataError,
    json_safe,
    missing_metadata,
    software_versions,
    tool_metadata,
    validate_metadata,
)


def measure_something(machine, delta):
    return tool_metadata("orbit_response", machine, delta=delta, weights=np.ones(3), path=pathlib.Path("/x"))


def test_tool_metadata_is_complete_and_json_safe(machine):
    md = measure_something(machine, 1e-5)
    validate_metadata(md)  # does not raise
    assert set(REQUIRED_KEYS) <= set(md)
    assert md["facility"] == "ESRF" and md["accelerator"] == "EBS" and md["tool"] == "orbit_response"
    assert md["profile"] == {"name": "ebs", "sha256": "a" * 64, "file": str(machine.profile.path)}
    assert md["lattice"] == {"file": str(machine.profile.lattice_path), "sha256": "b" * 64}
    assert md["mode"] == "sim" and md["seed"] == 1
    assert md["operator"] == "tester"  # $ACC_BLUESKY_OPERATOR
    assert md["license"] == "CC-BY-4.0"
    assert md["plan_name"] == "measure_something"  # the calling plan
    assert md["parameters"] == {"delta": 1e-5, "weights": [1.0, 1.0, 1.0], "path": "/x"}
    for dist in ("acc-bluesky", "accelerator-toolbox", "bluesky", "ophyd-async", "tiled"):
        assert md["software"][dist]
    json.dumps(md)  # JSON-safe throughout


def test_epics_mode_has_no_seed_and_license_override(tmp_path, monkeypatch):
    monkeypatch.setenv("ACC_BLUESKY_LICENSE", "CC0-1.0")
    md = tool_metadata("tune", fake_machine(tmp_path, mode="epics", seed=None), plan_name="measure_tune")
    assert "seed" not in md and md["license"] == "CC0-1.0" and md["plan_name"] == "measure_tune"
    validate_metadata(md)


def test_validator_names_every_missing_key(machine):
    md = tool_metadata("orbit_response", machine)
    for key in ("facility", "operator"):
        del md[key]
    del md["profile"]["sha256"]
    del md["software"]["bluesky"]
    del md["seed"]
    with pytest.raises(MetadataError) as err:
        validate_metadata(md)
    assert isinstance(err.value, ValueError)
    assert err.value.missing == ["facility", "profile.sha256", "operator", "software.bluesky", "seed"]
    for key in err.value.missing:
        assert key in str(err.value)


def test_validator_checks_values(machine):
    md = tool_metadata("orbit_response", machine)
    missing, problems = missing_metadata(md | {"mode": "twin", "seed": 1.5, "lattice": "esrf.m"})
    assert not missing
    assert any("'mode'" in p for p in problems)
    assert any("'seed'" in p for p in problems)
    assert any("'lattice'" in p for p in problems)
    with pytest.raises(MetadataError, match="missing metadata keys: facility, accelerator, profile, lattice, "
                                           "mode, tool, operator, license, software"):
        validate_metadata({})


def test_json_safe_and_versions():
    assert json_safe({"a": np.float32(1.5), "b": (1, 2), "c": np.arange(2)}) == {"a": 1.5, "b": [1, 2], "c": [0, 1]}
    versions = software_versions()
    assert versions["python"].count(".") == 2
