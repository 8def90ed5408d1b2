"""A non-editable install works on its own: the wheel holds the package and its named configs."""
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project's wheel (as `pip install .` builds it), unpacked as site-packages would hold
    it."""
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info/ beside the sources.
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "workdirs", "*.egg-info", "__pycache__", ".pytest_cache"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(out.glob("dalle_jax-*.whl"))
    site = out / "site-packages"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def test_the_wheel_ships_every_module_and_config(installed):
    for directory, _, names in os.walk(os.path.join(ROOT, "dalle_jax")):
        for name in names:
            if name.endswith((".py", ".html")):
                relative = os.path.relpath(os.path.join(directory, name), ROOT)
                assert (installed / relative).is_file(), relative
    configs = sorted(n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".py"))
    assert sorted(os.listdir(installed / "dalle_jax" / "configs")) >= configs


@pytest.mark.parametrize("cwd", ["checkout", "elsewhere"])
def test_named_configs_load_from_the_installed_package(installed, tmp_path, cwd):
    """From the checkout or any other directory, the installed package (not the checkout's
    sources: `python -P` keeps the current directory off the path) finds its named configs,
    including those a config loads by name (pipeline_mini loads dvae_mini and others)."""
    code = ("import dalle_jax, json; from dalle_jax import config_lib; "
            "c = config_lib.load('pipeline_mini'); "
            "print(json.dumps([dalle_jax.__file__, config_lib.configs_dir(), "
            "c.dvae.task.name, c.dalle.model.depth]))")
    result = subprocess.run([sys.executable, "-P", "-c", code],
                            cwd=ROOT if cwd == "checkout" else tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(installed)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    package_file, configs, task, depth = json.loads(result.stdout.strip().splitlines()[-1])
    assert package_file.startswith(str(installed))
    assert configs == str(installed / "dalle_jax" / "configs")
    assert (task, depth) == ("dvae", 4)
