"""`vllm-recroute` command line: serve | make-tiny-model | show-config."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from vllm_recroute.config import RoutingConfigError
from vllm_recroute.defaults import DEFAULT_ROUTING, parse_routing_arg


def default_model() -> Path:
    """The embedded default model: the trained demo checkpoint, else a cached tiny model."""
    checkpoint = Path(__file__).parent / "demo" / "checkpoint"
    if (checkpoint / "config.json").exists():
        return checkpoint
    from vllm_recroute.tiny import cached_tiny_model

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
    from vllm_recroute.tiny import ARCHS, PRESETS

    t.add_argument(
        "--arch",
        default="idefics3",
        choices=list(ARCHS),
        help="serve keye, phi3v and minicpmv with --trust-remote-code (their config and "
        "processors are remote code, as the published checkpoints' are)",
    )
    t.add_argument("--preset", default="tiny", choices=list(PRESETS))
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


# the files in which transformers finds a checkpoint's remote classes (their `auto_map`)
_REMOTE_CODE_FILES = (
    "config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer_config.json",
)


def remote_code_files(model_dir: str | Path) -> list[str]:
    """The files of a local checkpoint that name remote code (a top-level ``auto_map``)."""
    found = []
    for name in _REMOTE_CODE_FILES:
        path = Path(model_dir) / name
        if path.is_file() and "auto_map" in json.loads(path.read_text()):
            found.append(name)
    return found


def check_remote_code(model: str | Path, vllm_args: Sequence[str]) -> str | None:
    """What is missing to load ``model``, or None. Without --trust-remote-code vLLM fails on
    such a checkpoint only after its startup is under way, in a traceback that names the
    Python keyword (``trust_remote_code=True``), not the flag."""
    if any(a == "--trust-remote-code" or a.startswith("--trust-remote-code=") for a in vllm_args):
        return None
    files = remote_code_files(model)
    if not files:
        return None
    return (
        f"{model}: its {', '.join(files)} name remote code (auto_map), which vLLM runs "
        "only with --trust-remote-code; add that flag"
    )


def serve_command(model: str | Path) -> str:
    """The command that serves a checkpoint (the flags it needs, nothing else)."""
    flag = " --trust-remote-code" if remote_code_files(model) else ""
    return f"vllm-recroute serve {model} --routing pdrop{flag}"


def _serve(model: str, args: argparse.Namespace, rest: list[str]) -> int:
    from vllm_recroute.server.launcher import LaunchError, serve

    missing = check_remote_code(model, rest)
    if missing:
        print(f"vllm-recroute: {missing}", file=sys.stderr)
        return 2
    try:
        serve(model, args.routing, args.keep, rest)
    except LaunchError as err:
        print(f"vllm-recroute: {err}", file=sys.stderr)
        return 2
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from vllm_recroute.tiny import build_tiny_model, get_arch

    try:  # an architecture without the preset: refused before anything is written
        get_arch(args.arch, args.preset)
    except ValueError as err:
        print(f"vllm-recroute make-tiny-model: --arch {args.arch} --preset {args.preset}: "
              f"{err}", file=sys.stderr)  # fmt: skip
        return 2
    out = build_tiny_model(args.out_dir, arch=args.arch, seed=args.seed, preset=args.preset)
    print(out)
    print(f"serve it: {serve_command(out)}", file=sys.stderr)
    return 0


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
            return _serve(str(args.model or default_model()), args, rest)
        elif args.command == "make-tiny-model":
            return _make_tiny_model(args)
        elif args.command == "show-config":
            print(parse_routing_arg(args.routing, args.keep).model_dump_json(indent=2))
    except RoutingConfigError as err:
        print(f"vllm-recroute: invalid routing config: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
