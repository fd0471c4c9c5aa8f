"""CPU benchmark: the audio branch's preprocessing and ImageBind audio encoder vs the PyTorch references.

1. Filterbank: our `kaldi_fbank` on a batch of 2-s 16 kHz clips vs
   `torchaudio.compliance.kaldi.fbank` called per clip as ImageBind does; and our whole
   `audio_features` on a 16 kHz Waveform vs ImageBind's path (per-clip mean subtraction, kaldi.fbank,
   pad / crop to 204 frames, normalise) written here in torch ops.
2. Encoder: our jitted `ImageBindEncoder` (audio preset at real width, reduced depth, fp32) vs the
   `imagebind-unofficial` reference holding the same random weights (ours through our converter).

Everything is timed in turns in one run (the filterbank rows after a 30-ms busy wait, so that torch's spinning
OpenMP workers do not take a core from the next call); medians; ratios are PyTorch time / JAX (ours) time (> 1: ours
faster).

  python bench/audio.py                  # width 768 / 12 heads / MLP 3072, depth 4, 1 video x 8 clips
  python bench/audio.py --quick          # tiny smoke configuration
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # tests/imagebind_reference.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from timing import median_times  # noqa: E402
from vllama_jax.torch_compat import install_torchvision_shim  # noqa: E402

install_torchvision_shim()  # before the reference imports torchvision
import torchaudio.compliance.kaldi as kaldi  # noqa: E402
from flax import nnx  # noqa: E402

from imagebind_reference import reference_features, reference_model, state_dict  # noqa: E402
from vllama_jax.convert.imagebind import imagebind_params, model_from_params  # noqa: E402
from vllama_jax.media.audio import AUDIO_MEAN, AUDIO_STD, TARGET_FRAMES, Waveform, audio_features, clip_bounds  # noqa: E402
from vllama_jax.media.fbank import kaldi_fbank  # noqa: E402
from vllama_jax.models.imagebind import ImageBindConfig  # noqa: E402

RATE = 16000
CLIP_SECONDS = 2.0
SETTLE_S = 0.03  # the filterbank rows take a few ms: let torch's spinning OpenMP workers stop first


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--depth", type=int, default=4, help="encoder blocks (the release uses 12)")
  p.add_argument("--videos", type=int, default=1)
  p.add_argument("--clips", type=int, default=8)
  p.add_argument("--fbank-batches", type=int, nargs="+", default=[8, 64], help="clips per filterbank call")
  p.add_argument("--seconds", type=float, default=20.0, help="length of the waveform for audio_features")
  p.add_argument("--repeats", type=int, default=5, help="timed turns of the encoder")
  p.add_argument("--fbank-repeats", type=int, default=21, help="timed turns of the (cheap, noisy) filterbank rows")
  p.add_argument("--quick", action="store_true")
  return p.parse_args(argv)


def encoder_config(args) -> ImageBindConfig:
  if args.quick:
    return ImageBindConfig.tiny_audio(dtype="float32")
  return ImageBindConfig.audio(depth=args.depth, dtype="float32")


# ---- the reference preprocessing (ImageBind's load_and_transform_audio_data after loading) ----

def torch_fbank(clip: torch.Tensor) -> torch.Tensor:  # (1, samples) -> (frames, 128)
  return kaldi.fbank(clip, htk_compat=True, sample_frequency=RATE, use_energy=False, window_type="hanning",
                     num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10)


def torch_audio_features(waveform: torch.Tensor, num_clips: int) -> torch.Tensor:
  """waveform (channels, samples) at 16 kHz -> (clips, 1, 128, 204), as ImageBind computes it."""
  waveform = waveform.clone()  # ImageBind subtracts the means in place on the loaded tensor
  clips = []
  for start, end in clip_bounds(waveform.shape[1] / RATE, num_clips, CLIP_SECONDS):
    clip = waveform[:, int(start * RATE):int(end * RATE)]
    clip -= clip.mean()
    fbank = torch_fbank(clip).transpose(0, 1)
    p = TARGET_FRAMES - fbank.shape[1]
    fbank = torch.nn.functional.pad(fbank, (0, p)) if p > 0 else fbank[:, :TARGET_FRAMES]
    clips.append(((fbank.unsqueeze(0) - AUDIO_MEAN) / AUDIO_STD))
  return torch.stack(clips)


def bench_fbank(args, rng) -> list[tuple]:
  rows = []
  samples = int(CLIP_SECONDS * RATE)
  # Warm-up on the largest batch: compiles (or loads) the Numba kernels and sizes each thread's buffers,
  # the state of a long-running pipeline.
  warm = (0.1 * rng.standard_normal((max(args.fbank_batches), samples))).astype(np.float32)
  for _ in range(2):
    kaldi_fbank(warm, RATE, 128)
  for n in args.fbank_batches:
    clips = (0.1 * rng.standard_normal((n, samples))).astype(np.float32)
    t_clips = [torch.from_numpy(c[None].copy()) for c in clips]
    ours = kaldi_fbank(clips, RATE, 128)
    with torch.inference_mode():
      ref = torch.stack([torch_fbank(c) for c in t_clips]).numpy()
      diff = np.abs(ours - ref).max()
      t = median_times({"ours": lambda: kaldi_fbank(clips, RATE, 128),
                       "torch": lambda: [torch_fbank(c) for c in t_clips]}, args.fbank_repeats, SETTLE_S)
    rows.append((f"kaldi fbank, {n} x 2-s clips", n, t["ours"], t["torch"], diff))

  wave = Waveform((0.1 * rng.standard_normal((1, int(args.seconds * RATE)))).astype(np.float32), RATE)
  t_wave = torch.from_numpy(wave.samples.copy())
  ours = audio_features(wave, num_clips=args.clips)
  with torch.inference_mode():
    ref = torch_audio_features(t_wave, args.clips).numpy()
    diff = np.abs(ours - ref).max()
    t = median_times({"ours": lambda: audio_features(wave, num_clips=args.clips),
                     "torch": lambda: torch_audio_features(t_wave, args.clips)}, args.fbank_repeats, SETTLE_S)
  rows.append((f"audio_features, {args.seconds:g}-s wave", ours.shape[0], t["ours"], t["torch"], diff))
  return rows


# ---- the encoder ------------------------------------------------------------------------------

def bench_encoder(args, cfg, rng) -> tuple:
  vision = ImageBindConfig.tiny_vision(dtype="float32", out_dim=cfg.out_dim)
  reference = reference_model(cfg, vision, seed=0)
  params = imagebind_params((("bench", k, v) for k, v in state_dict(reference).items()), audio_cfg=cfg)
  ours = model_from_params(cfg, params["audio"])
  graphdef, state = nnx.split(ours)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  x = rng.standard_normal((args.videos, args.clips, 1, *cfg.input_size)).astype(np.float32)
  jx = jnp.asarray(x)
  flat = x.reshape(-1, *x.shape[2:])
  start = time.perf_counter()
  got = np.asarray(forward(state, jx))
  compile_s = time.perf_counter() - start
  expected = reference_features(reference, "audio", flat).reshape(got.shape)
  diff = np.abs(got - expected).max()
  t_flat = torch.from_numpy(flat)

  def torch_forward():
    with torch.inference_mode():
      value = reference.modality_preprocessors["audio"](audio=t_flat)
      out = reference.modality_trunks["audio"](**value["trunk"])
      out = reference.modality_heads["audio"](out, **value["head"])
      return reference.modality_postprocessors["audio"](out)

  t = median_times({"ours": lambda: forward(state, jx).block_until_ready(), "torch": torch_forward}, args.repeats)
  return ("ImageBind audio encoder", flat.shape[0], t["ours"], t["torch"], diff), compile_s, np.abs(expected).max()


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.quick:
    args.fbank_batches, args.repeats, args.fbank_repeats = [8], 2, 3
  cfg = encoder_config(args)
  rng = np.random.default_rng(0)
  print(f"jax {jax.__version__} {jax.devices()}; torch {torch.__version__} threads {torch.get_num_threads()}; "
        f"our filterbank threads {len(os.sched_getaffinity(0))}; {os.cpu_count()} CPUs")
  print(f"config: fbank 16 kHz, 2-s clips, 128 mel bins, 25/10 ms frames; audio_features {args.clips} clips of a "
        f"{args.seconds:g}-s wave; encoder width {cfg.width} heads {cfg.heads} MLP {cfg.mlp_dim} depth {cfg.depth} "
        f"input {cfg.input_size} (grid {cfg.grid}), {args.videos} video(s) x {args.clips} clips, fp32; "
        f"median of {args.fbank_repeats} (filterbank) / {args.repeats} (encoder) turns")
  rows = bench_fbank(args, rng)
  enc_row, compile_s, out_max = bench_encoder(args, cfg, rng)
  rows.append(enc_row)
  print(f"encoder: JAX compile + first run {compile_s:.2f}s; max |out| {out_max:.2e}")
  print(f"\n{'':32}{'ours ms':>10}{'torch ms':>10}{'ours clip/s':>13}{'torch clip/s':>14}{'ratio':>8}"
        f"{'max |diff|':>12}")
  for name, n, ours, ref, diff in rows:
    print(f"{name:32}{ours * 1e3:10.1f}{ref * 1e3:10.1f}{n / ours:13.1f}{n / ref:14.1f}{ref / ours:8.2f}"
          f"{diff:12.2e}")
  print("ratio = PyTorch time / ours (> 1: ours faster); targets: filterbank >= 2, encoder >= 1")
  return 0


if __name__ == "__main__":
  sys.exit(main())
