"""Each worker class answers exactly the calls its protocol in proto/workers.py declares: every method,
with the protocol's parameters (names, order, defaults) and return annotation."""

from __future__ import annotations

import inspect

import pytest

from decode_worker.colocated import ColocatedWorker
from decode_worker.worker import DecodeWorker
from prefill_worker.worker import PrefillWorker
from proto import workers as api


def _protocol_methods(protocol: type) -> dict[str, inspect.Signature]:
    names = {n for klass in protocol.__mro__ if klass.__module__ == api.__name__
             for n, v in vars(klass).items() if callable(v) and not n.startswith("_")}
    return {n: inspect.signature(getattr(protocol, n)) for n in names}


def _shape(sig: inspect.Signature) -> list[tuple[str, object, bool]]:
    # Ray's tracing adds a keyword-only `_ray_trace_ctx` to the signatures of actor classes' methods.
    return [(p.name, p.kind, p.default is not inspect.Parameter.empty)
            for p in sig.parameters.values() if p.name != "self" and not p.name.startswith("_ray")]


@pytest.mark.parametrize(("worker", "protocol"), [
    (PrefillWorker, api.PrefillWorkerAPI),
    (DecodeWorker, api.DecodeWorkerAPI),
    (ColocatedWorker, api.ColocatedWorkerAPI),
])
def test_worker_class_matches_its_protocol(worker, protocol):
    methods = _protocol_methods(protocol)
    assert methods, protocol
    for name, want in methods.items():
        assert hasattr(worker, name), f"{worker.__name__} lacks {protocol.__name__}.{name}"
        got = inspect.signature(getattr(worker, name))
        assert _shape(got) == _shape(want), f"{worker.__name__}.{name}{got} != {protocol.__name__}.{name}{want}"
        assert got.return_annotation == want.return_annotation, f"{worker.__name__}.{name} returns"


def test_actor_info_matches_its_protocol():
    from pdserve.runtime.actors import _ActorInfo

    for name, want in _protocol_methods(api.WorkerInfoAPI).items():
        got = inspect.signature(getattr(_ActorInfo, name))
        assert _shape(got) == _shape(want) and got.return_annotation == want.return_annotation, name
