"""Broken YAML configs get one clear message naming the file and every bad key or value, and exit
code 2: no traceback, nothing started. Each `yaml/*.yaml` starts with one `# expect: ...` line per
problem it holds: the text that problem's line must contain. One problem is one line; several
are listed under "<file>: N problems:", one per line, all in one run."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbrx_train.training.train import main
from tests.launches import run_training
from tests.training.test_train_e2e import ROOT

CASES = Path(__file__).parent / "yaml"


def expected(path: Path) -> list[str]:
    lines = path.read_text(errors="replace").splitlines()
    expect = [line.removeprefix("# expect: ") for line in lines if line.startswith("# expect: ")]
    assert lines[0].startswith("# expect: "), f"{path.name}: the first line must say `# expect: <error text>`"
    return expect


def config_error(argv: list[str], capsys) -> str:
    """`python train.py <argv>` run in this process: the one error line it prints."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "Traceback" not in err
    assert err.startswith("dbrx-train: config error: "), err
    return err


@pytest.mark.parametrize("path", sorted(CASES.glob("*.yaml")), ids=lambda path: path.stem)
def test_broken_yaml_gets_one_clear_error(path, capsys):
    err = config_error([str(path)], capsys)
    expect = expected(path)
    for text in expect:
        assert text in err, err
    if len(expect) == 1:
        assert len(err.strip().splitlines()) <= 4, err  # the YAML parser's own message spans a few lines
    else:
        head, *problems = err.strip().splitlines()
        assert head == f"dbrx-train: config error: {path}: {len(expect)} problems:", err
        assert len(problems) == len(expect) and all(p.startswith("  - ") for p in problems), err
        assert all(sum(text in p for p in problems) == 1 for text in expect), err


def test_files_that_are_not_yaml_configs(tmp_path, capsys):
    missing = tmp_path / "typo.yaml"
    assert f"config file '{missing}' does not exist" in config_error([str(missing)], capsys)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    assert "is not valid YAML" in config_error([str(binary)], capsys)
    override = config_error([str(CASES / "missing-data-folder.yaml"), "optimizer.lr"], capsys)
    assert "override 'optimizer.lr' must look like key=value" in override


@pytest.mark.slow
def test_two_rank_launch_of_a_broken_yaml_prints_its_error_once_and_exits_2(tmp_path):
    path = CASES / "syntax-unclosed-bracket.yaml"
    proc = run_training(2, [str(path)])
    # Rank 0 prints it and exits 2; the launcher stops rank 1 while it waits to print its copy.
    assert proc.returncode == 2
    output = proc.stdout + proc.stderr
    assert f"dbrx-train: config error: config file '{path}' {expected(path)[0]}" in output
    assert output.count("config error") == 1, output
    assert "Traceback" not in output


MB = "model.ffn_config.moe_backend"


@pytest.mark.parametrize("precision", ["fp32", "amp_fp16"])
def test_megablocks_backend_outside_bf16_is_refused_before_the_run(precision):
    """On a GPU run (device checked first on CPU, as the megablocks-on-cpu case shows)."""
    from dbrx_train.config.run import load_config
    from dbrx_train.config.schema import ConfigError
    from dbrx_train.training.preflight import check_moe_backend

    path = CASES / "megablocks-on-cpu.yaml"
    cfg = load_config(str(path), ["device=auto", f"precision={precision}"])
    with pytest.raises(
        ConfigError, match=rf"megablocks computes the experts in bf16 only .*, but precision is {precision}"
    ):
        check_moe_backend(cfg, "gpu")
    backend = check_moe_backend(load_config(str(path), ["device=auto", "precision=amp_bf16"]), "gpu")
    assert backend.name == "megablocks" and not backend.torch_fallback  # accepted, resolved for the GPU
    # Expert parallelism runs the torch backend's experts: megablocks by name is refused with it.
    ep = ["device=auto", "precision=amp_bf16", "fsdp_config.expert_parallel_degree=2"]
    with pytest.raises(ConfigError, match=r"expert_parallel_degree runs the torch backend's experts"):
        check_moe_backend(
            load_config(str(CASES / "expert-parallel-degree.yaml"), [*ep, f"{MB}=megablocks"]), "gpu"
        )
    check_moe_backend(load_config(str(CASES / "expert-parallel-degree.yaml"), [*ep, f"{MB}=auto"]), "gpu")


def test_compile_on_cpu_without_a_cxx_compiler_is_refused_before_the_run(monkeypatch, tmp_path):
    from dbrx_train.config.run import load_config
    from dbrx_train.config.schema import ConfigError
    from dbrx_train.training.preflight import check_compile

    cfg = load_config(str(CASES / "missing-data-folder.yaml"), ["compile_config={}"])
    check_compile(cfg, "cpu")  # this machine has one
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no g++, c++ or clang++
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match=r"compile_config: torch.compile on CPU needs a C\+\+ compiler"):
        check_compile(cfg, "cpu")
    check_compile(load_config(str(CASES / "missing-data-folder.yaml"), []), "cpu")  # no compile: no check


@pytest.mark.parametrize(
    "overrides,world_size,message",
    [
        (
            ["model.ffn_config.moe_num_experts=6"],
            4,
            r"expert_parallel_degree=4 must divide model.ffn_config.moe_num_experts \(6\)",
        ),
        (["fsdp_config.sharding_strategy=HYBRID_SHARD"], 2, r"FULL_SHARD or SHARD_GRAD_OP, not HYBRID_SHARD"),
        (["model.init_device=mixed"], 2, r"needs model.init_device: cpu"),
    ],
)
def test_expert_parallel_misconfigurations_are_refused_before_the_run(overrides, world_size, message):
    from dbrx_train.config.run import load_config
    from dbrx_train.config.schema import ConfigError
    from dbrx_train.training.parallelize import check_expert_parallel

    path = CASES / "expert-parallel-degree.yaml"
    degree = [f"fsdp_config.expert_parallel_degree={world_size}"]
    check_expert_parallel(load_config(str(path), degree), world_size)  # the base config is accepted
    with pytest.raises(ConfigError, match=message):
        check_expert_parallel(load_config(str(path), degree + overrides), world_size)


def test_the_readme_shows_what_a_typo_prints(capsys, monkeypatch):
    """README's example config error is the code's own output, character for character."""
    readme = (ROOT / "README.md").read_text()
    command = "$ python train.py yamls/pretrain/dbrx-tiny.yaml optimizer.learning_rate=1\n"
    assert command in readme
    shown = readme.split(command, 1)[1].splitlines()[0]
    monkeypatch.chdir(ROOT)
    assert (
        config_error(["yamls/pretrain/dbrx-tiny.yaml", "optimizer.learning_rate=1"], capsys).strip() == shown
    )
