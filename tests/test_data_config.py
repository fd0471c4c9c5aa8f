"""A config's data section and annotation files: mistakes are ConfigErrors that name the dataset,
the file or the key and what was expected, found before a model loads; nothing is silently dropped."""

import json

import pytest

from vllama_jax.cli import apply_override, load_config_file
from vllama_jax.data.build import data_config, read_datasets
from vllama_jax.errors import ConfigError

HEADER = "videoid,page_dir,name\n"


def stage1(tmp_path, webvid_rows=HEADER + "1,p0,a dog runs\n", cc595k=None):
  """VL stage 1 (WebVid 100 : CC595k 24) with its annotations in tmp_path."""
  config = load_config_file("configs/vl_stage1.py")
  anno = tmp_path / "webvid"
  anno.mkdir(exist_ok=True)
  if webvid_rows is not None:
    (anno / "part0.csv").write_text(webvid_rows, encoding="utf-8")
  (tmp_path / "cc.json").write_text(json.dumps(cc595k if cc595k is not None else
                                               {"annotations": [{"image_id": "1", "caption": "a cat"}]}))
  for key, value in {"data.datasets.0.ann": anno, "data.datasets.0.media": tmp_path / "videos",
                     "data.datasets.1.ann": tmp_path / "cc.json", "data.datasets.1.media": tmp_path / "images"}.items():
    apply_override(config, key, str(value))
  return config


def test_both_datasets_are_read(tmp_path):
  datasets = read_datasets(stage1(tmp_path))
  assert [(spec["name"], len(records)) for spec, records in datasets] == [("webvid", 1), ("cc595k", 1)]
  assert datasets[0][1][0]["media"] == str(tmp_path / "videos" / "p0" / "1.mp4")


def test_a_dataset_without_records_is_an_error_not_dropped_from_the_mix(tmp_path):
  config = stage1(tmp_path, webvid_rows=None)
  (tmp_path / "webvid" / "part0.tsv").write_text(HEADER)  # the reference README's name; its code reads *.csv
  with pytest.raises(ConfigError, match=r"dataset 'webvid': cannot read .*no \*\.csv file in the folder, "
                                        r"which holds \['part0.tsv'\]\); expected a folder of \*\.csv files"):
    read_datasets(config)
  with pytest.raises(ConfigError, match=r"dataset 'cc595k': .*cc.json' holds no annotations; expected a JSON"):
    read_datasets(stage1(tmp_path, cc595k={"annotations": []}))


def test_annotation_files_of_the_wrong_shape_name_the_file_and_the_expected_shape(tmp_path):
  with pytest.raises(ConfigError, match=r"part0.csv has the columns \['video_id', 'page_dir', 'caption'\]\); "
                                        r"expected .*videoid, page_dir, name"):
    read_datasets(stage1(tmp_path, webvid_rows="video_id,page_dir,caption\n1,p0,x\n"))
  with pytest.raises(ConfigError, match=r"dataset 'cc595k': cannot read .*cc.json' \(its top level "
                                        r"is a JSON list, not a dict\)"):
    read_datasets(stage1(tmp_path, cc595k=[{"image_id": "1", "caption": "x"}]))
  config = stage1(tmp_path)
  (tmp_path / "cc.json").write_text('{"annotations": [')
  with pytest.raises(ConfigError, match=r"cannot read .*cc.json' \(JSONDecodeError"):
    read_datasets(config)
  (tmp_path / "webvid" / "part0.csv").write_bytes(HEADER.encode() + "1,p0,caf\xe9\n".encode("latin-1"))
  with pytest.raises(ConfigError, match=r"part0.csv is not UTF-8 text"):
    read_datasets(config)
  with pytest.raises(ConfigError, match=r"NotADirectoryError.*expected a folder of \*\.csv"):
    apply_override(config, "data.datasets.0.ann", str(tmp_path / "cc.json"))
    read_datasets(config)


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
  [(_, webvid), _] = read_datasets(stage1(tmp_path, webvid_rows="\ufeff" + HEADER + "1,p0,a dog runs\n"))
  assert webvid[0]["broken"] == "" and webvid[0]["caption"] == "a dog runs"


def test_instruction_json_must_be_a_list(tmp_path):
  config = load_config_file("configs/vl_stage2.py")
  (tmp_path / "llava.json").write_text(json.dumps({"data": []}))
  apply_override(config, "data.datasets.1.ann", str(tmp_path / "llava.json"))
  apply_override(config, "data.datasets.1.media", str(tmp_path))
  apply_override(config, "data.datasets.0.ratio", "0")
  apply_override(config, "data.datasets.2.ratio", "0")
  with pytest.raises(ConfigError, match=r"dataset 'llava_instruct': .*top level is a JSON dict, not a list\); "
                                        r"expected a JSON list \[\{\"image\""):
    read_datasets(config)


def test_unset_annotations_are_an_error_unless_the_ratio_leaves_the_dataset_out(tmp_path):
  config = stage1(tmp_path)
  apply_override(config, "data.datasets.1.ann", "")
  with pytest.raises(ConfigError, match=r"data.datasets.1 \('cc595k'\): its annotations are not set.*"
                                        r"--config.data.datasets.1.ratio=0"):
    read_datasets(config)
  apply_override(config, "data.datasets.1.ratio", "0")
  assert [spec["name"] for spec, _ in read_datasets(config)] == ["webvid"]


@pytest.mark.parametrize("key, value, message", [
    ("template", "llama2", r"template 'llama2': expected one of \['llama_2', 'vicuna'\]"),
    ("data.num_frames", "7", r"data.datasets.0 \('webvid'\): WebVid's head/tail .* must be even, got 7"),
    ("data.num_frames", "0", r"data.num_frames must be an integer >= 1, got 0"),
    ("data.batch_size", "0", r"data.batch_size must be an integer >= 1, got 0"),
    ("data.max_txt_len", "0", r"data.max_txt_len must be an integer >= 1, got 0"),
    ("data.num_workers", "-1", r"data.num_workers must be an integer >= 0, got -1"),
])
def test_settings_the_pipeline_cannot_use_are_refused_at_once(tmp_path, key, value, message):
  config = stage1(tmp_path)
  apply_override(config, key, value)
  with pytest.raises(ConfigError, match=message):
    data_config(config, train=True)


def test_keys_the_pipeline_does_not_know_are_refused(tmp_path):
  config = stage1(tmp_path)
  with config.unlocked():
    config.data.datasets[0]["sample_ratio"] = 100  # the reference YAML's name for `ratio`
  with pytest.raises(ConfigError, match=r"data.datasets.0 \('webvid'\): unknown key\(s\) \['sample_ratio'\]; "
                                        r"known keys: \['ann', 'eval_ann'"):
    data_config(config, train=True)
  config = stage1(tmp_path)
  with config.unlocked():
    config.data.max_text_len = 64
    config.data.overshoot = "clamp"
  with pytest.raises(ConfigError, match=r"data: unknown key\(s\) \['max_text_len'\]"):
    data_config(config, train=True)
  with config.unlocked():
    del config.data["max_text_len"]
  with pytest.raises(ConfigError, match=r"data.overshoot must be 'wrap' or 'clip', got 'clamp'"):
    data_config(config, train=True)
  config = load_config_file("configs/vl_stage2.py")
  with config.unlocked():
    config.data.prompts = ("###Human: Describe this image. ###Assistant: ",)
  with pytest.raises(ConfigError, match=r"each prompt needs exactly one <ImageHere>.*has 0"):
    data_config(config, train=True)


def test_two_datasets_of_one_name_are_refused(tmp_path):
  config = stage1(tmp_path)
  with config.unlocked():
    config.data.datasets[1]["name"] = "webvid"  # counts and held-out losses are kept per name
  with pytest.raises(ConfigError, match=r"'webvid' names datasets \[0, 1\]; give each a distinct `name`"):
    data_config(config, train=True)


def test_the_config_seed_is_the_data_seed(tmp_path):
  config = stage1(tmp_path)
  assert data_config(config, train=True).seed == config.seed == 42
  apply_override(config, "seed", "7")
  assert data_config(config, train=True).seed == 7


@pytest.mark.parametrize("mode, runs", [("video", (32,)), ("audio", (8,)), ("audio_video", (8, 32))])
def test_the_text_holds_one_slot_run_per_branch_the_mode_feeds(tmp_path, mode, runs):
  config = stage1(tmp_path)  # the step's modality rows: 32 video, 8 audio, or 8 audio then 32 video
  apply_override(config, "mode", mode)
  assert data_config(config, train=True).runs == runs
