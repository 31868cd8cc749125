"""The dataset registry: entries, capabilities, the shared record schema, and adding a
dataset as docs/data.md shows it (its example is taken from the page and run)."""

import ast
import dataclasses
import pathlib
import re
import textwrap

import numpy as np
import pytest

import vidsim.data as data_lib
from vidsim.data import DatasetSpec, dataset_spec, pipeline, records, registry
from vidsim.errors import UsageError

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "data.md"


def test_entries_declare_builders_and_capabilities(tiny_config):
  assert data_lib.BUILDERS == tuple(registry.DATASETS) == ("moving_digits", "video_folder")
  spec = dataset_spec(tiny_config)
  assert spec.name == "moving_digits" and spec.world_truth and spec.build_on_the_fly
  assert spec.presets() == ("fixed", "mixed", "images", "occlusion")
  folder = dataset_spec("video_folder")
  assert not folder.world_truth and not folder.build_on_the_fly and folder.presets() == ()
  for spec in registry.DATASETS.values():
    assert callable(spec.builder_module().make_builder)


def test_unknown_builder_lists_the_valid_names(tiny_config):
  with tiny_config.unlocked():
    tiny_config.data.builder = "moving_digit"
  for call in (dataset_spec, data_lib.builder_for):
    with pytest.raises(UsageError, match=r"data.builder='moving_digit'; valid: \['moving_digits', 'video_folder'\]"):
      call(tiny_config)


def test_unknown_preset_lists_the_presets(tiny_config):
  with pytest.raises(UsageError, match="valid: \\['fixed', 'mixed', 'images', 'occlusion'\\]"):
    data_lib.builder_for(tiny_config, "nonsense")


def test_prepare_presets_expands_all_only_for_datasets_with_presets(tiny_config):
  assert data_lib.prepare_presets(tiny_config) == [""]
  with tiny_config.unlocked():
    tiny_config.data.builder_config = "all"
  assert data_lib.prepare_presets(tiny_config) == ["fixed", "mixed", "images", "occlusion"]
  with tiny_config.unlocked():
    tiny_config.data.builder = "video_folder"
  assert data_lib.prepare_presets(tiny_config) == [""]


def _imported_modules(path: pathlib.Path):
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def test_builders_share_the_record_schema_and_import_no_other_builder():
  modules = {spec.module for spec in registry.DATASETS.values()}
  for spec in registry.DATASETS.values():
    module = spec.builder_module()
    imported = _imported_modules(pathlib.Path(module.__file__))
    assert "vidsim.data.records" in imported
    assert not imported & (modules - {spec.module}), f"{spec.module} imports another builder"
    builder_classes = [v for v in vars(module).values()
                       if isinstance(v, type) and issubclass(v, records.PixelDatasetBuilder)
                       and v is not records.PixelDatasetBuilder]
    assert builder_classes, spec.module


def _docs_section() -> str:
  text = DOCS.read_text()
  start = text.index("\n## Adding a dataset")
  end = text.find("\n## ", start + 1)
  return text[start:] if end < 0 else text[start:end]


def _python_blocks(section: str):
  return [textwrap.dedent(block) for block in re.findall(r"```python\n(.*?)\n *```", section, re.S)]


def test_the_docs_example_adds_a_dataset_with_one_entry(tiny_config, tmp_path, monkeypatch, caplog, capsys):
  blocks = _python_blocks(_docs_section())
  (module_code,) = [b for b in blocks if "def make_builder" in b]
  (entry_code,) = [b for b in blocks if b.lstrip().startswith("DatasetSpec(")]
  (tmp_path / "solid_colors_doc.py").write_text(module_code)
  monkeypatch.syspath_prepend(str(tmp_path))
  spec = eval(entry_code.strip().rstrip(","), {"DatasetSpec": DatasetSpec})  # pylint: disable=eval-used
  monkeypatch.setitem(registry.DATASETS, spec.name, dataclasses.replace(spec, module="solid_colors_doc"))

  with tiny_config.unlocked():
    tiny_config.data.builder = "solid_colors"
    tiny_config.data.data_dir = str(tmp_path / "datasets")
  assert not data_lib.builder_for(tiny_config).is_prepared()
  source = pipeline.data_source(tiny_config, "train")  # build_on_the_fly: the reader builds it.
  examples = [pipeline.decode_example(source[i]) for i in range(len(source))]
  assert len(examples) == 6 and {e["caption"] for e in examples} == {"a red screen", "a green screen", "a blue screen"}
  red = next(e for e in examples if e["metadata"]["color"] == "red")
  assert red["video"].shape == (5, 16, 16, 3) and (red["video"] == (220, 40, 40)).all()
  assert len(pipeline.data_source(tiny_config, "validation")) == 6
  assert "building dataset solid_colors/default-" in caplog.text and "6 clips per split" in caplog.text
  assert "Downloading and preparing" not in capsys.readouterr().out
  batch = next(iter(pipeline.pixel_dataset(tiny_config, "train", process_index=0, process_count=1)))
  assert batch["video"].shape[1:] == (5, 16, 16, 3) and np.abs(batch["video"]).max() <= 1.0
