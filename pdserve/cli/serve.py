"""`pdserve serve`: the OpenAI API over HTTP, on workers it starts (or a deployment's)."""

from __future__ import annotations

import argparse

from pdserve.cli import flags


def add_parser(sub) -> None:
    sv = sub.add_parser("serve", help="serve the OpenAI API (chat, completions, streaming) over HTTP")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    sv.add_argument("--admission", default="always", choices=("always", "slo"),
                    help="slo: refuse at once (429 + Retry-After) a request whose predicted TTFT exceeds its SLO")
    sv.add_argument("--admission-headroom", type=float, default=0.8,
                    help="slo: admit while the predicted TTFT is within this share of the TTFT SLO")
    sv.add_argument("--max-queue", type=int, default=1024,
                    help="requests waiting for prefill at once; beyond it 503 + Retry-After")
    sv.add_argument("--request-timeout", type=float, default=600.0,
                    help="a request not finished after this many seconds is aborted (504)")
    sv.add_argument("--default-max-tokens", type=int, default=512,
                    help="max_tokens for requests that set none (KV is reserved for prompt + max_tokens)")
    sv.add_argument("--deployment", default=None,
                    help="serve through this running deployment (`pdserve up`) instead of starting workers")
    flags.slo_args(sv)
    flags.engine_args(sv)
    flags.cluster_args(sv)
    sv.set_defaults(func=cmd_serve, online_router=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from pdserve.serve.admission import AdmissionConfig
    from pdserve.serve.server import ServeOptions, serve_forever

    engine = flags.engine_config(args)
    options = ServeOptions(host=args.host, port=args.port, api_key=args.api_key,
                           admission=AdmissionConfig(args.admission, args.max_queue, args.admission_headroom),
                           slo=flags.slo_config(args), default_max_tokens=args.default_max_tokens,
                           request_timeout_s=args.request_timeout)
    if args.deployment and args.batch_admissions != "auto":
        raise ValueError(f"--batch-admissions {args.batch_admissions}: the deployment's router was configured "
                         f"by `pdserve up`; pass --batch-admissions there")
    serve_forever(engine, flags.cluster_config(args), flags.router_config(args, engine), options,
                  deployment=args.deployment)
    return 0
