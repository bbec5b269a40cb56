"""`pdserve up`, `status`, `down` and `dashboard`: a long-lived deployment on a running Ray cluster."""

from __future__ import annotations

import argparse

from pdserve.cli import flags
from proto.kinds import Mode


def add_parser(sub) -> None:
    up = sub.add_parser("up", help="start a long-lived deployment (router + workers) on a running Ray cluster")
    up.add_argument("--name", default="pdserve", help="deployment name")
    flags.engine_args(up)
    flags.cluster_args(up)
    flags.slo_args(up)
    up.set_defaults(func=cmd_up, address_default="auto")

    for cmd, fn, text in (("status", cmd_status, "show a deployment's workers, nodes, devices and KV use"),
                          ("down", cmd_down, "stop a deployment")):
        p = sub.add_parser(cmd, help=text)
        p.add_argument("--name", default="pdserve")
        p.add_argument("--address", default="auto")
        p.set_defaults(func=fn)

    db = sub.add_parser("dashboard", help="serve the live dashboard of a running deployment")
    db.add_argument("--name", default="pdserve")
    db.add_argument("--address", default="auto")
    db.add_argument("--dashboard-host", default="127.0.0.1")
    db.add_argument("--dashboard-port", type=int, default=8470)
    db.set_defaults(func=cmd_dashboard)


def cmd_up(args: argparse.Namespace) -> int:
    from pdserve.runtime.deployment import DeploymentSpec, deploy

    engine = flags.engine_config(args)
    if args.mode != Mode.PD:
        raise ValueError("`pdserve up` deploys --mode pd only for now")
    spec = DeploymentSpec(name=args.name, engine=engine, cluster=flags.cluster_config(args),
                          router=flags.router_config(args, engine), slo=flags.slo_config(args))
    actor = deploy(spec, args.address)
    print_status(_ray_get(actor.status.remote()))
    print(f"deployment {args.name!r} is up; use it with `pdserve run-batch --deployment {args.name} ...`")
    return 0


def _ray_get(ref, timeout: float = 120):
    import ray

    return ray.get(ref, timeout=timeout)


def print_status(st: dict) -> None:
    print(f"deployment {st['name']}: model {st['model']} ({st['dtype']}), up {st['uptime_s']:.0f} s, "
          f"{st['in_flight']} requests in flight, {st['queued']} queued")
    print(f"{'worker':<12} {'node':<16} {'pid':>8} {'device':<8} {'dtype':<9} {'threads':>7} {'KV blocks used':>16} "
          f"{'running':>8}")
    for w in sorted(st["workers"], key=lambda w: w["worker_id"]):
        kv = f"{w['num_blocks'] - w['free_blocks']}/{w['num_blocks']}" if "num_blocks" in w else "-"
        device = w["gpu"] or w["device"]
        print(f"{w['worker_id']:<12} {w['node_ip']:<16} {w['pid']:>8} {device:<8} {w.get('dtype', '-'):<9} "
              f"{w['threads']:>7} {kv:>16} {w.get('running', '-'):>8}")
    for cpu in sorted({w["cpu"] for w in st["workers"] if w.get("cpu")}):  # one line per kind of CPU
        print(cpu)


def cmd_status(args: argparse.Namespace) -> int:
    from pdserve.runtime.deployment import find

    print_status(_ray_get(find(args.name, args.address).status.remote()))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from pdserve.runtime.deployment import teardown

    teardown(args.name, args.address)
    print(f"deployment {args.name!r} stopped")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    import time

    from pdserve.observability.dashboard.server import DashboardServer
    from pdserve.runtime.deployment import find

    actor = find(args.name, args.address)

    class Remote:  # the collector interface, answered by the deployment's router
        def state(self):
            return _ray_get(actor.dashboard_state.remote())

        def prometheus(self):
            return _ray_get(actor.prometheus.remote())

    server = DashboardServer(Remote(), host=args.dashboard_host, port=args.dashboard_port)
    print(f"dashboard of deployment {args.name!r}: {server.url}  (Prometheus: {server.url}metrics); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0
