"""`vllm-recroute` command line: serve | make-tiny-model | show-config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vllm_recroute.config import DEFAULT_ROUTING, RoutingConfigError, parse_routing_arg


def default_model() -> Path:
    """The embedded default model: the trained demo checkpoint, else a cached tiny model."""
    checkpoint = Path(__file__).parent / "demo" / "checkpoint"
    if (checkpoint / "config.json").exists():
        return checkpoint
    from vllm_recroute.tiny_models import cached_tiny_model

    return cached_tiny_model("idefics3")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-recroute", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve",
        help="start vLLM's OpenAI-compatible server with routing on",
        usage="vllm-recroute serve [MODEL] [--routing R] [--keep X] [vLLM server flags...]",
        description="MODEL (first argument, optional): a local HF model directory; default: "
        "the embedded demo model. Unknown flags are passed to vLLM's server unchanged.",
    )
    s.add_argument(
        "--routing",
        default=DEFAULT_ROUTING,
        help="default (pdrop reroute + kv_release + parked tier sized from host memory) | "
        "off | fastv | pdrop (compute savings only) | JSON RoutingConfig",
    )
    s.add_argument("--keep", type=float, default=None, help="keep fraction (fastv) / ratio (pdrop)")

    t = sub.add_parser("make-tiny-model", help="build a deterministic random-weight VLM")
    t.add_argument("out_dir")
    from vllm_recroute.tiny_models import ARCHS

    t.add_argument("--arch", default="idefics3", choices=list(ARCHS))
    t.add_argument("--preset", default="tiny", choices=["tiny", "smolvlm-256m"])
    t.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("show-config", help="print the effective routing config as JSON")
    c.add_argument("--routing", default=DEFAULT_ROUTING)
    c.add_argument("--keep", type=float, default=None)
    return p


def _split_serve_model(argv: list[str]) -> tuple[list[str], str | None]:
    # With unknown vLLM flags allowed, argparse would take the value of `--port 8000` as
    # MODEL; MODEL is therefore only the token right after `serve`, if it is not a flag.
    if len(argv) >= 2 and argv[0] == "serve" and not argv[1].startswith("-"):
        return [argv[0], *argv[2:]], argv[1]
    return argv, None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, model = _split_serve_model(argv)
    args, rest = _parser().parse_known_args(argv)
    if args.command == "serve":
        args.model = model
    if args.command != "serve" and rest:
        _parser().error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "serve":
            from vllm_recroute_server.launcher import LaunchError, serve

            try:
                serve(str(args.model or default_model()), args.routing, args.keep, rest)
            except LaunchError as err:
                print(f"vllm-recroute: {err}", file=sys.stderr)
                return 2
        elif args.command == "make-tiny-model":
            from vllm_recroute.tiny_models import build_tiny_model

            out = build_tiny_model(args.out_dir, arch=args.arch, seed=args.seed, preset=args.preset)
            print(out)
        elif args.command == "show-config":
            print(parse_routing_arg(args.routing, args.keep).model_dump_json(indent=2))
    except RoutingConfigError as err:
        print(f"vllm-recroute: invalid routing config: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
