"""The declared dependency range is the tested range: fast-moving packages are capped, and what runs is inside."""

from __future__ import annotations

import configparser
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
FAST_MOVING = ("transformers", "lightning", "peft", "accelerate", "datasets", "torchmetrics", "deepspeed", "gguf",
               "jsonargparse", "safetensors", "lm-eval")


def _requirements() -> dict[str, Requirement]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser["options"]["install_requires"].splitlines()
    lines += [line for value in parser["options.extras_require"].values() for line in value.splitlines()]
    return {req.name: req for req in (Requirement(line) for line in lines if line.strip())}


def test_fast_moving_dependencies_are_capped_and_the_installed_releases_are_inside() -> None:
    requirements = _requirements()
    for name in FAST_MOVING:
        specifier = requirements[name].specifier
        assert any(spec.operator in ("<", "<=", "==") for spec in specifier), f"{name} has no upper bound"
        try:
            installed = version(name)
        except PackageNotFoundError:  # an extra that this environment did not install (deepspeed in the oldest one)
            continue
        assert specifier.contains(installed, prereleases=True), f"{name} {installed} is outside {specifier}"


def test_the_wheel_works_installed_outside_the_repository(tmp_path: Path, tiny_checkpoint: Path,
                                                          wikitext: Path) -> None:
    """Build the wheel, install it (no dependencies: this environment's torch and friends are reached through a
    path file, the repository is not) into a fresh venv outside the clone, and run it from there: ``--help``, a
    packaged config by its bare name, and a tiny prune."""
    import subprocess
    import sys
    import sysconfig

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT), "-w",
                    str(tmp_path / "dist")], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("gp_lightning-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # appended: the wheel's copy wins
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(Path.home()), "OMP_NUM_THREADS": "1"}
        return subprocess.run([str(venv / "bin" / "gp-lightning"), *args], cwd=work, env=env, capture_output=True,
                               text=True, timeout=300)

    where = subprocess.run([str(python), "-c", "import gp_lightning; print(gp_lightning.__file__)"], cwd=work,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(site), where  # the installed wheel, not the repository
    assert "--pruning_ratio" in run("prune", "--help").stdout
    shown = run("prune", "--config", "smollm2-135m", "--print_config")
    assert shown.returncode == 0 and "model: smollm2-135m" in shown.stdout, shown.stderr
    pruned = run("prune", "--model", str(tiny_checkpoint), "--dataset", str(wikitext / "valid.txt"), "--eval_dataset",
                 str(wikitext / "test.txt"), "--num_samples", "4", "--seq_len", "32", "--eval_seq_len", "32",
                 "--eval_max_windows", "4", "--pruning_ratio", "0.003", "--precision", "32-true", "--output", "run")
    assert pruned.returncode == 0, pruned.stderr[-2000:]
    assert (work / "run" / "model" / "config.json").is_file() and (work / "run" / "run.json").is_file()
