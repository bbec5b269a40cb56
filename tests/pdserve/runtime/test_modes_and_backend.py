"""Modes and transports as enums that keep the CLI's words; the Backend a front end opens (no Ray here)."""

from __future__ import annotations

import json
import pickle

import pytest

from engine.config import EngineConfig
from kvtransfer.base import TRANSPORTS
from pdserve.cli import build_parser, cluster_config
from pdserve.runtime.backend import Backend
from pdserve.runtime.cluster import ClusterConfig
from proto.kinds import TRANSPORT_NAMES, Mode, Transport
from proto.workers import WorkerSet
from router.router import Router, RouterConfig


def test_the_enums_are_the_cli_words():
    assert TRANSPORT_NAMES == TRANSPORTS
    assert Mode.words() == ("pd", "colocated", "hybrid")
    for member in (*Mode, *Transport):
        assert member == member.value and str(member) == f"{member}" == member.value
        assert json.loads(json.dumps({"x": member})) == {"x": member.value}
        assert pickle.loads(pickle.dumps(member)) is member


def test_cluster_config_holds_members_whatever_it_was_given():
    cfg = ClusterConfig(mode="colocated", transport="grpc")
    assert cfg.mode is Mode.COLOCATED and cfg.transport is Transport.GRPC
    assert ClusterConfig().mode is Mode.PD and ClusterConfig().transport is Transport.AUTO
    cfg = cluster_config(build_parser().parse_args(["serve", "--mode", "colocated", "--transport", "shm"]))
    assert cfg.mode is Mode.COLOCATED and cfg.transport is Transport.SHM
    with pytest.raises(ValueError, match=r"--transport must be one of \('auto', 'shm', 'cuda_ipc', 'grpc'\)"):
        ClusterConfig(transport="carrier-pigeon")
    with pytest.raises(ValueError, match="--mode must be one of pd, colocated, hybrid, got 'both'"):
        ClusterConfig(mode="both")


def test_a_backend_over_workers_it_was_handed_leaves_them_running(monkeypatch):
    import pdserve.runtime.backend as backend_module

    stopped = []
    monkeypatch.setattr(backend_module, "stop_workers", stopped.append)
    workers = WorkerSet(prefill={}, decode={})
    backend = Backend.open(EngineConfig(), ClusterConfig(), RouterConfig(), workers=workers)
    router = backend.make_router(on_finished=lambda r: None)
    assert isinstance(router, Router) and router.workers is workers
    backend.close()
    assert stopped == []
    owned = Backend(RouterConfig(), workers, owns_workers=True)
    owned.close()
    assert stopped == [workers]


def test_a_backend_of_a_deployment_finds_it_only_for_the_router():
    backend = Backend.open(EngineConfig(), ClusterConfig(), RouterConfig(), deployment="prod")
    assert backend.workers is None and (backend.deployment, backend.address) == ("prod", "auto")
    backend.close()  # nothing started, nothing to stop
