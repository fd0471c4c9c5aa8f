"""Finding the released files in a local copy of a Video-LLaMA Hugging Face repo, and fetching the
ones that are missing.

The DAMO-NLP-SG repos (e.g. `Video-LLaMA-2-7B-Finetuned`) hold the LLaMA directory and the
Video-LLaMA checkpoints; the reference code downloads EVA ViT-g and BLIP-2 from the LAVIS bucket at
start-up, and ImageBind from Meta. Each file is looked for in the repo copy first (two levels deep),
then fetched from where the reference gets it. Offline, the error names every missing file, its
source and where to put it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import shutil
import urllib.request

from vllama_jax.errors import CheckpointError

LAVIS = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/"
HF_ORG = "DAMO-NLP-SG"


@dataclasses.dataclass(frozen=True)
class ReleaseFile:
  flag: str  # the convert_weights.py option it fills
  patterns: tuple[str, ...]  # file names it may have (fnmatch, case-insensitive)
  url: str | None = None  # where the reference downloads it; None: from the Hugging Face repo
  hub_pattern: str | None = None  # what to fetch from the Hugging Face repo when url is None


RELEASE_FILES = (
    ReleaseFile("eva", ("eva_vit_g.pth",), LAVIS + "eva_vit_g.pth"),
    ReleaseFile("blip2", ("blip2_pretrained_flant5xxl.pth",), LAVIS + "blip2_pretrained_flant5xxl.pth"),
    ReleaseFile("imagebind", ("imagebind_huge.pth",), "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"),
    ReleaseFile("vl_ckpt", ("vl_*.pth", "*pretrain*vicuna*.pth", "*finetune*vicuna*.pth"), hub_pattern="VL_*.pth"),
    ReleaseFile("al_ckpt", ("al_*.pth", "*audiobranch*.pth"), hub_pattern="AL_*.pth"),
)
LLAMA_HUB_PATTERN = "llama*/*"


def _candidates(root: str, depth: int = 2) -> list[str]:
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    if os.path.relpath(dirpath, root).count(os.sep) >= depth - 1:
      dirnames.clear()
    found += [os.path.join(dirpath, f) for f in filenames]
    found += [os.path.join(dirpath, d) for d in dirnames]
  return sorted(found)


def _matches(path: str, spec: ReleaseFile) -> bool:
  name = os.path.basename(path).lower()
  if spec.flag == "vl_ckpt" and "audiobranch" in name:
    return False
  return os.path.isfile(path) and any(fnmatch.fnmatch(name, p) for p in spec.patterns)


def _is_llama_dir(path: str) -> bool:
  config = os.path.join(path, "config.json")
  if not os.path.isfile(config):
    return False
  try:
    with open(config) as f:
      return json.load(f).get("model_type") == "llama"
  except (OSError, json.JSONDecodeError, AttributeError):
    return False


def find_release_files(repo_dir: str, flags: tuple[str, ...] | None = None) -> dict[str, str]:
  """{flag: path} of the released files present in `repo_dir` (the repo root itself may be the
  LLaMA directory's parent or hold one as a subdirectory); only `flags` (default: all) are looked for,
  so a file passed explicitly may have several candidates in the repo."""
  if not os.path.isdir(repo_dir):
    raise CheckpointError(f"{repo_dir}: no such directory; expected a local copy of a Video-LLaMA Hugging "
                          "Face repo (e.g. DAMO-NLP-SG/Video-LLaMA-2-7B-Finetuned)")
  entries = _candidates(repo_dir)
  found = {}
  llama_dirs = [p for p in [repo_dir] + entries if os.path.isdir(p) and _is_llama_dir(p)]
  for flag, hits in [("llama", llama_dirs)] + [(s.flag, [p for p in entries if _matches(p, s)])
                                               for s in RELEASE_FILES]:
    if flags is not None and flag not in flags:
      continue
    if len(hits) > 1:
      raise CheckpointError(f"{repo_dir}: several candidates for --{flag.replace('_', '-')}: "
                            f"{[os.path.relpath(h, repo_dir) for h in hits]}; pass the one to use explicitly")
    if hits:
      found[flag] = hits[0]
  return found


def repo_id_of(repo_dir: str) -> str | None:
  """The Hugging Face repo a local copy mirrors, when its folder is named after one."""
  name = os.path.basename(os.path.normpath(repo_dir))
  return f"{HF_ORG}/{name}" if re.fullmatch(r"Video-LLaMA[\w.-]*", name) else None


def download(url: str, destination: str) -> None:
  """Fetches `url` into `destination` through a temporary file (nothing half-written remains)."""
  partial = destination + ".partial"
  with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
    shutil.copyfileobj(response, out, length=1 << 22)
  os.replace(partial, destination)


def hf_download(repo_id: str, pattern: str, directory: str) -> None:
  """Fetches the files of `repo_id` matching `pattern` into `directory` with huggingface_hub."""
  from huggingface_hub import snapshot_download
  snapshot_download(repo_id, allow_patterns=[pattern], local_dir=directory)


def resolve_release(repo_dir: str, wanted: tuple[str, ...], *, offline: bool = False) -> dict[str, str]:
  """{flag: path} for every flag in `wanted`, downloading missing files into `repo_dir` unless
  `offline`; raises one error naming everything still missing, with where to get it."""
  found = find_release_files(repo_dir, wanted)
  repo_id = repo_id_of(repo_dir)
  missing, failures = [], {}
  for flag in wanted:
    if flag in found:
      continue
    spec = next((s for s in RELEASE_FILES if s.flag == flag), None)
    if offline:
      missing.append(flag)
      continue
    try:
      if spec is not None and spec.url is not None:
        destination = os.path.join(repo_dir, spec.patterns[0])
        download(spec.url, destination)
        found[flag] = destination
      elif repo_id is not None:
        hf_download(repo_id, LLAMA_HUB_PATTERN if spec is None else spec.hub_pattern, repo_dir)
        found.update(find_release_files(repo_dir, (flag,)))
      if flag not in found:
        missing.append(flag)
    except Exception as e:  # no network, 404, permission: reported with the rest below
      failures[flag] = f"{type(e).__name__}: {e}"
      missing.append(flag)
  if missing:
    lines = [_where_to_get(flag, repo_dir, repo_id, failures.get(flag)) for flag in missing]
    raise CheckpointError(f"{repo_dir}: missing release files" + (" (offline)" if offline else "") + ":\n"
                          + "\n".join(lines))
  return {flag: found[flag] for flag in wanted}


def _where_to_get(flag: str, repo_dir: str, repo_id: str | None, failure: str | None) -> str:
  spec = next((s for s in RELEASE_FILES if s.flag == flag), None)
  option = f"--{flag.replace('_', '-')}"
  if flag == "llama":
    what = (f"a LLaMA directory (config.json, weights, tokenizer.model) such as llama-2-7b-chat-hf/ from "
            f"https://huggingface.co/{repo_id or HF_ORG + '/Video-LLaMA-2-7B-Finetuned'}")
    put = os.path.join(repo_dir, "<llama-dir>/")
  elif spec.url is not None:
    what, put = f"{spec.patterns[0]} from {spec.url}", os.path.join(repo_dir, spec.patterns[0])
  else:
    what = (f"a file matching {spec.hub_pattern} from "
            f"https://huggingface.co/{repo_id or HF_ORG + '/Video-LLaMA-2-7B-Finetuned'}")
    put = repo_dir + os.sep
  reason = f" (download failed: {failure})" if failure else ""
  return f"  {option}: {what}; put it at {put} or pass {option} PATH{reason}"
