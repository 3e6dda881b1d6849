"""Shared fixtures: profiles, twins, machines, a RunEngine writing to an embedded Tiled catalogue."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("ACC_BLUESKY_OPERATOR", "pytest")
warnings.filterwarnings("ignore", module="at")


@pytest.fixture(scope="session")
def ebs():
    """The default profile."""
    from acc_bluesky.profile import load_profile

    return load_profile("ebs")


@pytest.fixture
def twin_ideal(ebs):
    from acc_bluesky.twin import Twin

    return Twin(ebs, seed=None)


@pytest.fixture
def twin_errors(ebs):
    """EBS twin with the profile's default errors, seed 1, noise on."""
    from acc_bluesky.twin import Twin

    return Twin(ebs, seed=1)


@pytest.fixture
def machine(ebs):
    """A fresh sim machine on the EBS twin with default errors (seed 1)."""
    from acc_bluesky.machine import connect

    return connect(ebs, mode="sim", seed=1)


@pytest.fixture
def machine_ideal(ebs):
    from acc_bluesky.machine import connect

    return connect(ebs, mode="sim", seed=None)


@pytest.fixture
def catalog_dir(tmp_path):
    return tmp_path / "catalog"


@pytest.fixture
def RE(catalog_dir):  # noqa: N802 - the bluesky name
    """A RunEngine with a TiledWriter into an embedded catalogue in tmp; ``RE(plan).plan_result`` is the uid."""
    from acc_bluesky.data import make_run_engine

    re = make_run_engine(catalog_dir=catalog_dir, progress=False)
    yield re
    if re.state != "idle":
        re.halt()


@pytest.fixture
def catalog(RE, catalog_dir):
    from acc_bluesky.data import open_catalog

    return open_catalog(catalog_dir=catalog_dir)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
