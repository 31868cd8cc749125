"""Config loading, overrides, errors and golden files of every experiment."""

import json
import os
import pathlib

import pytest

from vidsim import config as config_lib
from vidsim.errors import UsageError

REPO = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((REPO / "experiments").glob("*.py"))
GOLDEN_DIR = REPO / "tests" / "golden" / "configs"


def _load(overrides=()):
  return config_lib.load_config(str(REPO / "experiments" / "digits_tiny.py"), overrides)


def test_override_types_are_parsed_from_the_default():
  c = _load(["--config.dit.depth=3", "--config.flow.shift_max=2", "--config.dit.qk_norm=false",
             "--config.data.buckets=((1, 8, 8), (5, 8, 16))", "--config.dit.mlp=swiglu"])
  assert c.dit.depth == 3 and isinstance(c.dit.depth, int)
  assert c.flow.shift_max == 2.0 and isinstance(c.flow.shift_max, float)
  assert c.dit.qk_norm is False
  assert c.data.buckets == ((1, 8, 8), (5, 8, 16))
  assert c.dit.mlp == "swiglu"


def test_unknown_key_names_it_and_the_closest_keys():
  with pytest.raises(UsageError) as e:
    _load(["--config.dit.dept=3"])
  assert "'dit.dept'" in str(e.value) and "dit.depth" in str(e.value)
  with pytest.raises(UsageError) as e:
    _load(["--config.dit.no_such_key=1"])
  assert "dit.no_such_key" in str(e.value) and "closest valid keys: dit." in str(e.value)


def test_wrong_type_fails_with_the_expected_type():
  with pytest.raises(UsageError, match="dit.depth.*expects int.*'abc'"):
    _load(["--config.dit.depth=abc"])
  with pytest.raises(UsageError, match="qk_norm.*expects bool"):
    _load(["--config.dit.qk_norm=maybe"])


def test_section_is_not_a_value():
  with pytest.raises(UsageError, match="is a section"):
    _load(["--config.dit=1"])


def test_experiment_setting_an_unknown_key_fails(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from vidsim.config import base_config\n"
                 "def get_config():\n  c = base_config()\n  c.dit.dpeth = 3\n  return c\n")
  with pytest.raises(UsageError, match="dpeth"):
    config_lib.load_config(str(bad))


def test_missing_file_and_missing_get_config(tmp_path):
  with pytest.raises(UsageError, match="not found"):
    config_lib.load_config(str(tmp_path / "nope.py"))
  empty = tmp_path / "empty.py"
  empty.write_text("x = 1\n")
  with pytest.raises(UsageError, match="no get_config"):
    config_lib.load_config(str(empty))


def test_every_base_key_has_a_one_line_comment():
  source = (REPO / "vidsim" / "config.py").read_text()
  body = source[source.index("def base_config"):source.index("c.lock()")]
  lines = [line.strip() for line in body.splitlines()]
  for previous, stripped in zip([""] + lines, lines):
    if stripped.startswith("c.") and "=" in stripped and "ConfigDict(" not in stripped:
      # The comment sits at the end of the line, or on the line above for long values.
      assert "#" in stripped or previous.startswith("#"), f"config key without a comment: {stripped}"


def test_json_round_trip():
  c = _load(["--config.dit.depth=5"])
  again = config_lib.from_json(config_lib.to_json(c))
  assert again.to_dict() == c.to_dict()


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_matches_its_golden(path):
  """A config change is a reviewed diff: regenerate with VIDSIM_UPDATE_GOLDENS=1."""
  resolved = json.loads(config_lib.to_json(config_lib.load_config(str(path))))
  golden = GOLDEN_DIR / f"{path.stem}.json"
  if os.environ.get("VIDSIM_UPDATE_GOLDENS"):
    golden.parent.mkdir(parents=True, exist_ok=True)
    golden.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")
  assert golden.exists(), f"no golden for {path.name}: run VIDSIM_UPDATE_GOLDENS=1 pytest {__file__}"
  assert resolved == json.loads(golden.read_text()), (
      f"{path.name} resolves differently from {golden}; if intended, regenerate with VIDSIM_UPDATE_GOLDENS=1"
  )


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_docstring_says_command_runtime_and_result(path):
  import ast

  doc = ast.get_docstring(ast.parse(path.read_text())) or ""
  assert "vidsim " in doc, f"{path.name}: docstring must give the command to run it"
  assert "runtime" in doc.lower(), f"{path.name}: docstring must give the expected runtime"
  assert "result" in doc.lower(), f"{path.name}: docstring must give the expected result"
