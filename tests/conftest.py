"""Shared fixtures: profiles, twins, machines, a RunEngine writing to an embedded Tiled catalogue."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("ACC_BLUESKY_OPERATOR", "pytest")
os.environ.setdefault("ACC_BLUESKY_SERVER_IDLE", "30")  # a test's catalogue server stops soon after its last use
warnings.filterwarnings("ignore", module="at")


def pytest_configure(config):
    """The default catalogue, the backups and the figures of the test session go to a temporary folder, never the
    user's."""
    import tempfile

    root = tempfile.mkdtemp(prefix="acc-bluesky-tests-")
    os.environ.setdefault("ACC_BLUESKY_CATALOG", os.path.join(root, "default-catalog"))
    os.environ.setdefault("ACC_BLUESKY_FIGURE_DIR", os.path.join(root, "figures"))
    os.environ.setdefault("ACC_BLUESKY_BACKUP", os.path.join(root, "backup"))  # runs Tiled refused: not in ~


#: Modules that share one expensive session resource run on the same xdist worker (``--dist loadgroup``): the EBS twin
#: IOC of ``ioc_fixtures`` (one IOC and one connected epics machine per worker session, not one per worker).
GROUPS = {m: "twin-ioc" for m in ("test_ioc", "test_epics_backend", "test_epics_backend_plans", "test_shadow",
                                  "test_queue_epics")}

#: Seconds each module (or group) takes in a full run (``--durations``, two workers), to hand the longest out first:
#: the workers take the next group when they are nearly done, so longest-first keeps a long module from starting
#: last and running alone. Modules not listed count as short. Rough figures are enough (measured 2026-12-02, two
#: workers; a third worker on the two cores was slower: 444 s against 363 s).
WEIGHTS = {"twin-ioc": 103, "test_data_local": 73, "test_lattices": 61, "test_campaign": 50, "test_demo": 43,
           "test_queue": 32, "test_tango": 30, "test_data_shell": 25, "test_correct_orbit": 25, "test_data_server": 19,
           "test_bba": 19, "test_orm": 19, "test_chromaticity": 18, "test_tune": 15, "test_ioc_clients": 15,
           "test_generate": 14}


def _group(item) -> str:
    stem = item.path.stem
    return GROUPS.get(stem, stem)


@pytest.hookimpl(tryfirst=True)  # before xdist's worker hook, which reads the marks into the node ids
def pytest_collection_modifyitems(config, items):
    """Every test goes with its module (or its module's group, :data:`GROUPS`) to one worker, and the groups are
    queued longest first (:data:`WEIGHTS`; ``--dist loadgroup --no-loadscope-reorder``). The order of the tests
    inside a module is kept."""
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
    first = {}
    for i, item in enumerate(items):
        first.setdefault(_group(item), i)
    items.sort(key=lambda it: (-WEIGHTS.get(_group(it), 5), first[_group(it)]))


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


@pytest.fixture(scope="session")
def _ebs_machine(ebs):
    from acc_bluesky.machine import connect

    return connect(ebs, mode="sim", seed=1)


@pytest.fixture(scope="session")
def _ebs_machine_ideal(ebs):
    from acc_bluesky.machine import connect

    return connect(ebs, mode="sim", seed=None)


@pytest.fixture
def machine(_ebs_machine):
    """The sim machine on the EBS twin with default errors (seed 1), reset to its design setpoints, no anomaly, beam
    injected (one twin for the session: connecting EBS costs seconds)."""
    _ebs_machine.twin.reset()
    yield _ebs_machine
    _ebs_machine.twin.reset()


@pytest.fixture
def machine_ideal(_ebs_machine_ideal):
    _ebs_machine_ideal.twin.reset()
    yield _ebs_machine_ideal
    _ebs_machine_ideal.twin.reset()


@pytest.fixture
def catalog_dir(tmp_path):
    return tmp_path / "catalog"


_SESSION_CATALOG: list = []  # one catalogue folder (one local Tiled server) for every test's RE fixture


def _session_catalog(tmp_path_factory):
    if not _SESSION_CATALOG:
        import atexit

        from acc_bluesky.data import close_catalog

        folder = tmp_path_factory.mktemp("session-catalog")
        _SESSION_CATALOG.append(folder)
        atexit.register(close_catalog, folder)  # stop its server when the test session ends
    return _SESSION_CATALOG[0]


@pytest.fixture(scope="session")
def session_catalog_dir(tmp_path_factory):
    """The session's catalogue folder (its Tiled server is started once per worker and shared by every test that
    only reads its own runs back by uid: starting a server for a new folder costs ~5 s of CPU)."""
    return _session_catalog(tmp_path_factory)


@pytest.fixture
def RE(tmp_path_factory):  # noqa: N802 - the bluesky name
    """A RunEngine writing to the session's catalogue folder (its Tiled server starts once, not per test);
    ``RE(plan).plan_result`` is the uid. Its runs carry ``test_token`` (unique per test), which ``catalog`` selects."""
    import secrets

    from acc_bluesky.data import make_run_engine

    re = make_run_engine(catalog_dir=_session_catalog(tmp_path_factory), progress=False)
    re.md["test_token"] = secrets.token_hex(8)
    yield re
    if re.state != "idle":
        re.halt()


@pytest.fixture
def catalog(RE):  # noqa: N803 - the bluesky name
    """The runs of this test's ``RE`` (a search of the shared catalogue: ``list(catalog)`` is this test's runs)."""
    from acc_bluesky.data import find_runs, open_catalog

    return find_runs(open_catalog(catalog_dir=RE.recorder.target.root), test_token=RE.md["test_token"])


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
