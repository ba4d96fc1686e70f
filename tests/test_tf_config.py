"""`tfp_naf.distribute`: reading `TF_CONFIG`, and its one-line errors (one process)."""

import json
import re
import sys
import tempfile
import textwrap

import pytest

from tfp_naf import distribute
from tfp_naf.cli import main

TWO = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}


def env(config):
    return {"TF_CONFIG": config if isinstance(config, str) else json.dumps(config)}


@pytest.mark.parametrize("config, workers, chief", [
    ("", 1, True),
    ({"cluster": {"worker": ["a:1"]}}, 1, True),
    ({"cluster": TWO, "task": {"type": "worker", "index": 0}}, 2, True),
    ({"cluster": TWO, "task": {"type": "worker", "index": 1}}, 2, False),
    ({"cluster": {"chief": ["c:1"], **TWO}, "task": {"type": "chief", "index": 0}}, 3, True),
    ({"cluster": {"chief": ["c:1"], **TWO}, "task": {"type": "worker", "index": 0}}, 3, False),
])
def test_workers_and_chief(config, workers, chief):
    assert distribute.num_workers(env(config)) == workers
    assert distribute.is_chief(env(config)) is chief
    assert distribute.num_workers({}) == 1 and distribute.is_chief({})


@pytest.mark.parametrize("config, match", [
    ("{not json", "TF_CONFIG is not valid JSON"),
    ("[1, 2]", 'must be a JSON object with a "cluster" object'),
    ({"task": {"type": "worker", "index": 0}}, 'with a "cluster" object'),
    ({"cluster": {"ps": ["a:1"], **TWO}}, "jobs ['ps']"),
    ({"cluster": {"worker": "a:1"}}, 'list of "host:port"'),
    ({"cluster": {"worker": []}}, 'list of "host:port"'),
    ({"cluster": {"chief": ["a:1", "b:2"]}}, "2 chiefs"),
    ({"cluster": TWO}, 'describes 2 workers but no "task"'),
    ({"cluster": TWO, "task": {"type": "worker", "index": 2}}, "is not in its cluster"),
    ({"cluster": TWO, "task": {"type": "chief", "index": 0}}, "is not in its cluster"),
    ({"cluster": TWO, "task": {"type": "worker", "index": "0"}}, "is not in its cluster"),
])
def test_malformed_tf_config_is_a_one_line_value_error(config, match):
    with pytest.raises(ValueError, match=re.escape(match)) as info:
        distribute.cluster_spec(env(config))
    assert "\n" not in str(info.value)


def test_strategy_without_a_cluster_is_the_default(monkeypatch):
    import tensorflow as tf

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert distribute.strategy_from_environment() is tf.distribute.get_strategy()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]}}))
    assert distribute.strategy_from_environment() is tf.distribute.get_strategy()
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0"])
    with mirrored.scope():  # The strategy in scope, as tf.distribute.get_strategy() says.
        assert distribute.strategy_from_environment() is mirrored
    with pytest.raises(ValueError, match="communication"):
        distribute.strategy_from_environment("grpc")


def test_importing_the_module_does_not_import_tensorflow(tmp_path):
    import subprocess

    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('d', {distribute.__file__!r})\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "assert 'tensorflow' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=60)


def test_chief_path(monkeypatch, tmp_path):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with distribute.chief_path(tmp_path / "model") as path:
        assert path == str(tmp_path / "model")
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": TWO, "task": {"type": "worker", "index": 1}}))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with distribute.chief_path(tmp_path / "model") as path:
        assert path.endswith("/model") and path.startswith(str(tmp_path / "tmp"))
        open(path, "w").close()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_command_line_fit_rejects_a_bad_tf_config(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": TWO}))
    code = main(["fit", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 1 and err.strip().splitlines() == [
        'tfp-naf: error: TF_CONFIG describes 2 workers but no "task": give each process its '
        'own, e.g. "task": {"type": "worker", "index": 0}.']


def test_docstring_example_runs_in_one_process(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    doc = distribute.strategy_from_environment.__doc__
    blocks = re.findall(r"#### Examples.*?```python\n(.*?)```", doc, flags=re.S)
    assert len(blocks) == 1
    exec(compile(textwrap.dedent(blocks[0]), "strategy_from_environment example", "exec"), {})
