"""Annotation readers: each returns a list of plain records (dicts) for the pipeline.

Every record has "kind" (caption / llava / videochat), "media" (path), "media_type" (video / image)
and "broken" ("" or the reason it will be skipped: the pipeline counts and drops it). Bad fields
flag the record instead of raising; a file of the wrong shape as a whole raises ValueError.
"""

from __future__ import annotations

import csv
import json
import os


def _broken(kind, media_type, reason, media=""):
  return {"kind": kind, "media": media, "media_type": media_type, "broken": reason}


WEBVID_COLUMNS = ("videoid", "page_dir", "name")


def webvid_records(anno_dir: str, videos_dir: str) -> list[dict]:
  """WebVid: every *.csv in `anno_dir` (sorted by name; the reference used os.listdir order);
  columns videoid, page_dir, name; video = videos_dir/page_dir/videoid.mp4."""
  names = sorted(os.listdir(anno_dir))
  if not any(n.endswith(".csv") for n in names):
    raise ValueError(f"no *.csv file in the folder, which holds {names[:5] or 'nothing'}")
  records = []
  for name in names:
    if not name.endswith(".csv"):
      continue
    csv_path = os.path.join(anno_dir, name)
    try:
      records += _webvid_rows(csv_path, videos_dir)
    except UnicodeDecodeError as e:
      raise ValueError(f"{csv_path} is not UTF-8 text: {e}") from None
  return records


def _webvid_rows(csv_path: str, videos_dir: str) -> list[dict]:
  records = []
  with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not a column
    rows = csv.DictReader(f)
    if rows.fieldnames and not set(WEBVID_COLUMNS) <= set(rows.fieldnames):
      raise ValueError(f"{csv_path} has the columns {rows.fieldnames}")
    for row in rows:
      vid, page, caption = row.get("videoid"), row.get("page_dir"), row.get("name")
      if not vid or page is None:
        records.append(_broken("caption", "video", "bad annotation"))
        continue
      path = os.path.join(videos_dir, page, f"{vid}.mp4")
      if caption is None:
        records.append(_broken("caption", "video", "bad annotation", path))
        continue
      records.append({"kind": "caption", "media": path, "media_type": "video",
                      "caption": caption.strip(), "clean_caption": True, "broken": ""})
  return records


def _load_json(path, top=None):
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if top is not None and not isinstance(data, top):
    raise ValueError(f"its top level is a JSON {type(data).__name__}, not a {top.__name__}")
  return data


def image_caption_records(ann_path: str, image_dir: str) -> list[dict]:
  """cc_sbu_align / CC595k: {"annotations": [{"image_id", "caption"}]}, image_dir/{id}.jpg.
  Captions are used raw (no cleaning), as the reference."""
  anns = _load_json(ann_path, dict).get("annotations")
  if not isinstance(anns, list):
    raise ValueError("it has no 'annotations' list at the top level")
  records = []
  for ann in anns:
    if not isinstance(ann, dict) or "image_id" not in ann or \
        not isinstance(ann.get("caption"), str):
      records.append(_broken("caption", "image", "bad annotation"))
      continue
    records.append({"kind": "caption", "media": os.path.join(image_dir, f"{ann['image_id']}.jpg"),
                    "media_type": "image", "caption": ann["caption"], "clean_caption": False,
                    "broken": ""})
  return records


def _turns_ok(turns, keys):
  return isinstance(turns, list) and turns and all(
      isinstance(t, dict) and all(isinstance(t.get(k), str) for k in keys) for t in turns)


def llava_records(ann_path: str, image_dir: str, prefix: str = "COCO_train2014_") -> list[dict]:
  """LLaVA-150k: [{"image", "conversations": [{"from", "value"}]}];
  image = image_dir/prefix+image."""
  records = []
  for item in _load_json(ann_path, list):
    if not isinstance(item, dict) or not isinstance(item.get("image"), str) or \
        not _turns_ok(item.get("conversations"), ("from", "value")):
      records.append(_broken("llava", "image", "bad annotation"))
      continue
    records.append({"kind": "llava", "media": os.path.join(image_dir, prefix + item["image"]),
                    "media_type": "image", "broken": "",
                    "conversations": [{"from": t["from"], "value": t["value"]}
                                      for t in item["conversations"]]})
  return records


def videochat_records(ann_path: str, videos_dir: str) -> list[dict]:
  """VideoChat-11k: [{"video": relpath, "QA": [{"q", "a"}]}]; video = videos_dir/relpath."""
  records = []
  for item in _load_json(ann_path, list):
    if not isinstance(item, dict) or not isinstance(item.get("video"), str) or \
        not _turns_ok(item.get("QA"), ("q", "a")):
      records.append(_broken("videochat", "video", "bad annotation"))
      continue
    records.append({"kind": "videochat", "media": os.path.join(videos_dir, item["video"]),
                    "media_type": "video", "broken": "",
                    "qa": [{"q": t["q"], "a": t["a"]} for t in item["QA"]]})
  return records
