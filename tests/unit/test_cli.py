"""CLI and launcher: argv given to vLLM's server, errors for bad input, make-tiny-model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from vllm_recroute.cli import main
from vllm_recroute.config import RoutingConfig
from vllm_recroute.server.launcher import LaunchError, routed_architecture, server_argv


def _model_dir(tmp_path: Path, archs: list[str]) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": archs}))
    return tmp_path


def test_server_argv_selects_routed_arch_and_routing(tmp_path):
    model = _model_dir(tmp_path, ["Idefics3ForConditionalGeneration"])
    cfg = RoutingConfig(schedule="pdrop", keep=0.4)
    argv = server_argv(str(model), cfg, ["--port", "9000"], on_cpu=True)
    assert argv[:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    overrides = json.loads(argv[argv.index("--hf-overrides") + 1])
    assert overrides == {"architectures": ["RecrouteIdefics3ForConditionalGeneration"]}
    extra = json.loads(argv[argv.index("--additional-config") + 1])
    assert RoutingConfig.from_additional_config(extra) == cfg
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(1 << 30)
    # the shared-memory processor cache (see launcher.MM_CACHE_FLAGS)
    assert argv[argv.index("--mm-processor-cache-type") + 1] == "shm"
    assert argv[-2:] == ["--port", "9000"]
    own = server_argv(str(model), cfg, ["--mm-processor-cache-gb", "4"], on_cpu=True)
    assert "--mm-processor-cache-type" not in own and own[-1] == "4"  # the operator's wins
    for dp in (["--data-parallel-size", "2"], ["-dp=2"]):  # shm does not start DP engines
        assert "--mm-processor-cache-type" not in server_argv(str(model), cfg, dp, on_cpu=True)


def test_user_kv_bytes_wins_and_gpu_gets_none(tmp_path):
    model = _model_dir(tmp_path, ["PaliGemmaForConditionalGeneration"])
    argv = server_argv(str(model), RoutingConfig(), ["--kv-cache-memory-bytes=5"], on_cpu=True)
    assert argv.count("--kv-cache-memory-bytes") == 0 and "--kv-cache-memory-bytes=5" in argv
    assert "--kv-cache-memory-bytes" not in server_argv(str(model), RoutingConfig(), on_cpu=False)


def test_launcher_errors(tmp_path):
    with pytest.raises(LaunchError, match=r"no config\.json"):
        routed_architecture(tmp_path)
    model = _model_dir(tmp_path, ["GPT2LMHeadModel"])
    with pytest.raises(LaunchError, match="not routable; supported: Idefics3"):
        routed_architecture(model)
    model = _model_dir(tmp_path, ["Idefics3ForConditionalGeneration"])
    with pytest.raises(LaunchError, match="--hf-overrides is set by vllm-recroute"):
        server_argv(str(model), RoutingConfig(), ["--hf-overrides", "{}"], on_cpu=False)


def test_serve_bad_routing_exits_2_with_field(capsys, tmp_path):
    model = _model_dir(tmp_path, ["Idefics3ForConditionalGeneration"])
    assert main(["serve", str(model), "--routing", "fastv", "--keep", "3"]) == 2
    assert "recroute.keep" in capsys.readouterr().err
    assert main(["serve", str(model), "--routing", "sometimes"]) == 2
    assert "--routing" in capsys.readouterr().err


def test_show_config(capsys):
    assert main(["show-config", "--routing", "fastv", "--keep", "0.25"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["schedule"], shown["keep"], shown["mode"]) == ("fastv", 0.25, "reroute")


def _digest(d: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.iterdir())
        if p.is_file()
    }


def test_make_tiny_model_is_deterministic(tmp_path, capsys):
    assert main(["make-tiny-model", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert main(["make-tiny-model", str(tmp_path / "b"), "--seed", "3"]) == 0
    assert main(["make-tiny-model", str(tmp_path / "c"), "--seed", "4"]) == 0
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= set(a)
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]


def test_serve_model_is_only_the_first_token(monkeypatch, tmp_path):
    """`--port 8000` must reach vLLM, not be taken as MODEL (argparse would)."""
    import vllm_recroute.server.launcher as launcher

    calls = []
    monkeypatch.setattr(launcher, "serve", lambda *a: calls.append(a))
    model = _model_dir(tmp_path, ["Idefics3ForConditionalGeneration"])
    assert main(["serve", "--port", "8011", "--routing", "fastv"]) == 0
    assert main(["serve", str(model), "--port", "8011"]) == 0
    (m1, r1, _, rest1), (m2, _, _, rest2) = calls
    assert rest1 == ["--port", "8011"] and r1 == "fastv" and m1 != "8011"
    assert m2 == str(model) and rest2 == ["--port", "8011"]


def test_serve_defaults_to_the_savings_on(monkeypatch, tmp_path, capsys):
    """No --routing: pdrop reroute, kv_release and the parked tier sized from the host's
    available memory (5%, 64 MiB..4 GiB), printed at startup; the argv carries it."""
    import vllm_recroute.server.launcher as launcher
    from vllm_recroute.defaults import default_parked_bytes

    execs = []
    monkeypatch.setattr(launcher.os, "execv", lambda exe, argv: execs.append(argv))
    model = _model_dir(tmp_path, ["Idefics3ForConditionalGeneration"])
    assert main(["serve", str(model), "--port", "8011"]) == 0
    argv = execs[-1]
    extra = json.loads(argv[argv.index("--additional-config") + 1])
    cfg = RoutingConfig.from_additional_config(extra)
    assert (cfg.mode, cfg.schedule, cfg.kv_release, cfg.reroute_every) == (
        "reroute",
        "pdrop",
        True,
        8,
    )
    # (available memory moves while the test runs)
    assert cfg.parked_bytes > 0 and abs(cfg.parked_bytes - default_parked_bytes()) <= 64 << 20
    out = capsys.readouterr().out
    assert "default routing: reroute pdrop, kv_release on" in out and "MiB" in out
    # the rule: 5% of what is available, floored and capped
    assert default_parked_bytes(1 << 30) == 64 << 20
    assert default_parked_bytes(40 << 30) == 2 << 30
    assert default_parked_bytes(1 << 40) == 4 << 30
    # the named schedules keep meaning compute savings only
    assert main(["serve", str(model), "--routing", "pdrop"]) == 0
    named = RoutingConfig.from_additional_config(
        json.loads(execs[-1][execs[-1].index("--additional-config") + 1])
    )
    assert not named.kv_release and named.parked_bytes == 0


def test_remote_code_checkpoint_without_the_flag_is_refused_before_vllm(
    monkeypatch, tmp_path, capsys
):
    """A checkpoint whose config names remote code (auto_map: Keye-VL, Phi-3-Vision,
    MiniCPM-V, real and tiny) needs --trust-remote-code: said before vLLM starts."""
    import vllm_recroute.server.launcher as launcher

    execs = []
    monkeypatch.setattr(launcher.os, "execv", lambda exe, argv: execs.append(argv))
    config = {"architectures": ["KeyeForConditionalGeneration"], "auto_map": {"AutoConfig": "x.C"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["serve", str(tmp_path), "--routing", "pdrop"]) == 2
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and "config.json" in err and not execs
    assert main(["serve", str(tmp_path), "--routing", "pdrop", "--trust-remote-code"]) == 0
    assert "--trust-remote-code" in execs[-1]


def test_make_tiny_model_prints_how_to_serve_it(tmp_path, capsys):
    from vllm_recroute.cli import serve_command

    assert main(["make-tiny-model", str(tmp_path / "m")]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(tmp_path / "m")  # stdout: the directory only
    assert f"vllm-recroute serve {tmp_path / 'm'} --routing pdrop\n" in out.err
    (tmp_path / "m" / "preprocessor_config.json").write_text('{"auto_map": {}}')
    assert serve_command(tmp_path / "m").endswith("--routing pdrop --trust-remote-code")


def test_make_tiny_model_refuses_a_preset_the_architecture_lacks(tmp_path, capsys):
    from vllm_recroute.tiny import get_arch

    get_arch("idefics3", "smolvlm-256m")  # guard: the preset exists, for another architecture
    out = tmp_path / "k"
    assert main(["make-tiny-model", str(out), "--arch", "keye", "--preset", "smolvlm-256m"]) == 2
    err = capsys.readouterr().err
    assert "--arch keye --preset smolvlm-256m" in err and "only the 'tiny' preset" in err
    assert "Traceback" not in err and not out.exists()  # nothing written
