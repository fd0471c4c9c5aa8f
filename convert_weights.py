"""Convert released PyTorch / Hugging Face checkpoints into one vllama_jax directory.

  python convert_weights.py --out converted/ \\
      --llama /path/to/vicuna-7b \\                       # HF LLaMA/Vicuna dir (+ tokenizer)
      --eva eva_vit_g.pth --blip2 blip2_pretrained_flant5xxl.pth \\
      --vl-ckpt finetune-vicuna7b-v2.pth \                 # Video-LLaMA VL branch (optional)
      --imagebind imagebind_huge.pth --al-ckpt finetune_vicuna7b_audiobranch.pth

  python convert_weights.py --out converted/ --hf-repo Video-LLaMA-2-7B-Finetuned/   # a local repo copy

Each part is optional, but the vision files go together. Without --vl-ckpt (--al-ckpt) the
trainable parts of the video (audio) branch are initialised as the reference initialises them for
training, and config.json says so; --minigpt4 pretrained_minigpt4_7b.pth then starts llama_proj from
MiniGPT-4's, as the reference's VL stage 1 does (its `llama_proj_model`). With --hf-repo the
files are found in the repo copy (explicit options win); missing ones are downloaded where they
come from, unless --offline.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from vllama_jax.errors import VllamaError

TEMPLATES = ("vicuna", "llama_2")  # text.conversation.TEMPLATES


def guess_template(llama_dir: str, vocab_size: int) -> str:
  """Vicuna v0 has FastChat's extra [PAD] row (vocab 32001); LLaMA-2 chat directories say so in
  their name."""
  name = os.path.basename(os.path.normpath(llama_dir)).lower().replace("_", "-")
  if vocab_size != 32001 and ("llama-2" in name or "llama2" in name):
    return "llama_2"
  return "vicuna"


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
  parser.add_argument("--llama", help="Hugging Face LLaMA/Vicuna directory (config.json, weights as "
                      "*.safetensors or pytorch_model*.bin with their index, tokenizer files)")
  parser.add_argument("--eva", help="eva_vit_g.pth: the EVA ViT-g state dict (LAVIS names)")
  parser.add_argument("--blip2", help="blip2_pretrained_flant5xxl.pth: BLIP-2 Q-Former, query tokens, ln_vision")
  parser.add_argument("--vl-ckpt", help="a Video-LLaMA VL checkpoint (video Q-Former, frame positions, llama_proj)")
  parser.add_argument("--minigpt4", help="VL stage 1 from scratch: MiniGPT-4's pretrained_minigpt4*.pth, whose "
                      "llama_proj starts the projection (the reference's llama_proj_model); not with --vl-ckpt")
  parser.add_argument("--imagebind", help="imagebind_huge.pth: ImageBind's audio and vision encoders")
  parser.add_argument("--al-ckpt", help="a Video-LLaMA AL checkpoint (audio Q-Former, positions, projection)")
  parser.add_argument("--llm-hidden", type=int,
                      help="LLM width for llama_proj when neither --llama nor --vl-ckpt gives it")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                      help="dtype of the converted frozen weights (default: bfloat16); trainable "
                      "vision parts are always float32")
  parser.add_argument("--seed", type=int, default=0, help="seed for parts initialised rather than converted")
  parser.add_argument("--hf-repo", help="a local copy of a released Video-LLaMA Hugging Face repo (e.g. "
                      "DAMO-NLP-SG/Video-LLaMA-2-7B-Finetuned): every file above is looked for in it")
  parser.add_argument("--no-audio", action="store_true", help="with --hf-repo: skip the audio branch")
  parser.add_argument("--offline", action="store_true", help="with --hf-repo: never download missing files")
  parser.add_argument("--template", choices=TEMPLATES,
                      help="chat template the checkpoint was tuned with (default: guessed from the LLaMA directory)")
  args = parser.parse_args(argv)
  if args.hf_repo:
    return args  # checked once its files are found, in main()
  if not (args.llama or args.eva or args.blip2 or args.vl_ckpt or args.imagebind or args.al_ckpt):
    parser.error("nothing to convert: give --llama, --eva with --blip2, and/or --imagebind")
  if (args.eva is None) != (args.blip2 is None) or ((args.vl_ckpt or args.minigpt4) and not args.eva):
    parser.error("the vision branch needs --eva and --blip2 together (and --vl-ckpt or --minigpt4 only with them)")
  if args.vl_ckpt and args.minigpt4:
    parser.error("--minigpt4 starts llama_proj for VL stage 1; a --vl-ckpt has its own llama_proj")
  if args.al_ckpt and not args.imagebind:
    parser.error("--al-ckpt goes with --imagebind")
  return args


def find_hf_repo_files(args: argparse.Namespace) -> None:
  """Fills the file options left unset from the --hf-repo copy (downloading unless --offline)."""
  from vllama_jax.convert.release import resolve_release
  wanted = ("llama", "eva", "blip2", "vl_ckpt") + (() if args.no_audio else ("imagebind", "al_ckpt"))
  wanted = tuple(flag for flag in wanted if getattr(args, flag) is None)
  for flag, path in resolve_release(args.hf_repo, wanted, offline=args.offline).items():
    setattr(args, flag, path)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.hf_repo:
    try:
      find_hf_repo_files(args)
    except VllamaError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  from vllama_jax.convert.output import staged_output
  from vllama_jax.pretrained import write_config
  start, parts, done = time.time(), {}, []
  try:
    with staged_output(args.out) as staging:
      llm_hidden = args.llm_hidden
      if args.llama:
        from vllama_jax.convert.llama import convert_llama
        cfg, parts["llama"] = convert_llama(args.llama, staging, dtype=args.dtype)
        llm_hidden = llm_hidden or cfg.hidden_size
        parts["chat"] = {"template": args.template or guess_template(args.llama, cfg.vocab_size)}
        done.append(f"LLaMA ({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size})")
      if args.eva:
        from vllama_jax.convert.video_branch import VIDEO_BRANCH, convert_video_branch
        entry = convert_video_branch(args.eva, args.blip2, args.vl_ckpt, staging, llm_hidden_size=llm_hidden,
                                     dtype=args.dtype, seed=args.seed, minigpt4_path=args.minigpt4)
        parts[VIDEO_BRANCH] = entry
        done.append("video branch" + (f" (initialised: {', '.join(entry['initialised'])})"
                                      if entry.get("initialised") else ""))
      if args.imagebind:
        from vllama_jax.convert.audio_branch import AUDIO_BRANCH, convert_audio_branch
        entry = convert_audio_branch(args.imagebind, args.al_ckpt, staging, llm_hidden_size=llm_hidden,
                                     dtype=args.dtype, seed=args.seed)
        parts[AUDIO_BRANCH] = entry
        done.append("audio branch" + (f" (initialised: {', '.join(entry['initialised'])})"
                                      if entry.get("initialised") else ""))
      write_config(staging, parts)
  except VllamaError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"converted {'; '.join(done)} ({args.dtype}) to {args.out} in {time.time() - start:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
