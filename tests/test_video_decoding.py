"""Video and image input vs independent computations: which frames are sampled (each test frame's
gray level encodes its index), the decoded values against a full decode of every frame with the
same swscale call and against PIL bicubic, the reference's time hint, and the image transform
against torchvision's Resize/ToTensor/Normalize."""

import os
import sys
import tracemalloc

import av
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from video_fixtures import (CLIP_MEAN, CLIP_STD, MAX_FRAMES, decode_all, has_codec,  # noqa: E402
                            read_indices, textured_frame, with_display_rotation, write_video)

from vllama_jax.media import (MediaError, load_image, load_video, probe_video,  # noqa: E402
                              sample_indices, time_hint)
from vllama_jax.media import video as video_mod  # noqa: E402

from torchvision import transforms  # noqa: E402  (conftest installs the CPU shim)
from torchvision.transforms import InterpolationMode  # noqa: E402

HINT_20_AT_10 = ("The video contains 8 frames sampled at 0.0, 0.2, 0.5, 0.7, 1.0, 1.2, 1.5, 1.7 "
                 "seconds. ")
TV_NORMALIZE = transforms.Compose([transforms.ToTensor(),
                                   transforms.Normalize(CLIP_MEAN, CLIP_STD)])


def tv_normalize(rgb):
  """uint8 (H, W, 3) -> (H, W, 3) through torchvision's ToTensor and Normalize."""
  return TV_NORMALIZE(np.array(rgb)).permute(1, 2, 0).numpy()


def swscale_reference(path, indices, size=224):
  """Decode every frame, take frame k by counting, resize with the same swscale call."""
  frames = decode_all(path)
  return np.stack([tv_normalize(frames[k].reformat(size, size, "rgb24", interpolation="BICUBIC")
                                .to_ndarray()) for k in indices])


def need(codec):
  if not has_codec(codec):
    pytest.skip(f"the local FFmpeg cannot encode/decode with {codec}")


# --- indices and time hint ------------------------------------------------------------------


def test_indices_match_the_reference_arange():
  for t in (1, 2, 4, 8, 16, 32):
    for vlen in range(1, 1200):
      n = min(t, vlen)
      assert sample_indices(vlen, t) == np.arange(0, vlen, vlen / n).astype(int).tolist()
  # Where the reference's float step misbehaves (T not a power of two), ours keeps T frames.
  assert len(np.arange(0, 17, 17 / 7).astype(int)) == 8
  assert sample_indices(17, 7) == [0, 2, 4, 7, 9, 12, 14]


def test_time_hint_format():
  assert time_hint(sample_indices(20), 10.0) == HINT_20_AT_10
  assert time_hint(sample_indices(300), 30000 / 1001) == (
      "The video contains 8 frames sampled at 0.0, 1.2, 2.5, 3.7, 5.0, 6.2, 7.5, 8.7 seconds. ")
  assert time_hint([0, 1, 2], 25.0) == (
      "The video contains 3 frames sampled at 0.0, 0.0, 0.1 seconds. ")


# --- containers and codecs ------------------------------------------------------------------

CODECS = [
    ("mp4", "libx264", {}),
    ("mov", "libx264", {}),
    ("mkv", "libx265", {"x265-params": "log-level=error"}),
    ("webm", "libvpx-vp9", {}),
    ("avi", "mpeg4", {"b": "2M"}),  # the default 200 kb/s blurs the gray levels
    ("mkv", "libsvtav1", {}),
]


@pytest.mark.parametrize("ext,codec,options", CODECS, ids=[f"{e}-{c}" for e, c, _ in CODECS])
def test_containers_and_codecs(tmp_path, ext, codec, options):
  need(codec)
  path = write_video(tmp_path / f"v.{ext}", codec, num_frames=30, options={"g": "6", **options})
  video = load_video(path)
  assert video.frames.shape == (8, 224, 224, 3) and video.frames.dtype == np.float32
  assert video.indices == tuple(sample_indices(30)) == (0, 3, 7, 11, 15, 18, 22, 26)
  assert read_indices(video.frames) == list(video.indices)
  assert (video.num_frames, video.fps, video.duration) == (30, 10.0, 3.0)
  assert video.timestamps == tuple(i / 10 for i in video.indices)
  assert video.time_hint == ("The video contains 8 frames sampled at 0.0, 0.3, 0.7, 1.1, 1.5, "
                             "1.8, 2.2, 2.6 seconds. ")
  # Same scaler on every frame of a full decode: bit-exact, so seeking picked the same frames.
  np.testing.assert_array_equal(video.frames, swscale_reference(path, video.indices))


def test_frame_count_missing_from_header(tmp_path):
  path = write_video(tmp_path / "v.webm", "libvpx-vp9", num_frames=20)
  with av.open(str(path)) as c:
    assert c.streams.video[0].frames == 0  # Matroska/WebM store no frame count
  info = probe_video(path)
  assert (info.num_frames, info.fps, info.duration) == (20, 10.0, 2.0)
  assert (info.width, info.height, info.codec) == (64, 48, "vp9")
  raw = write_video(tmp_path / "v.h264", "libx264", num_frames=20)  # no duration either
  assert probe_video(raw).num_frames == 20  # packets counted
  assert read_indices(load_video(raw).frames) == sample_indices(20)


def test_seeks_instead_of_decoding_everything(tmp_path, monkeypatch):
  path = write_video(tmp_path / "long.mp4", "libx264", num_frames=200, width=32, height=32,
                     rate=25, options={"g": "10", "bf": "2", "sc_threshold": "0"})
  decoded = []
  original = video_mod._Cursor._next

  def counting(self):
    fresh = self.pending[0] is None  # else the look-ahead frame is handed out again
    item = original(self)
    if fresh and item[0] is not None:
      decoded.append(item[1])
    return item

  monkeypatch.setattr(video_mod._Cursor, "_next", counting)
  video = load_video(path)
  assert [i % (MAX_FRAMES + 1) for i in video.indices] == read_indices(video.frames)
  assert len(decoded) <= 8 * (10 + 1)  # at most a GOP and a look-ahead frame per sample
  np.testing.assert_array_equal(video.frames, swscale_reference(path, video.indices))


def test_video_stream_after_an_audio_stream(tmp_path):
  path = write_video(tmp_path / "av.mkv", "libx264", num_frames=30, options={"g": "5"},
                     audio_first=True)
  with av.open(str(path)) as c:
    assert c.streams[0].type == "audio" and c.streams[1].type == "video"
  video = load_video(path)
  assert read_indices(video.frames) == sample_indices(30)
  np.testing.assert_array_equal(video.frames, swscale_reference(path, video.indices))


def test_fewer_frames_than_requested(tmp_path):
  path = write_video(tmp_path / "short.mp4", "libx264", num_frames=5)
  video = load_video(path)
  assert video.frames.shape == (5, 224, 224, 3) and video.indices == (0, 1, 2, 3, 4)
  assert read_indices(video.frames) == [0, 1, 2, 3, 4]
  assert video.time_hint == (
      "The video contains 5 frames sampled at 0.0, 0.1, 0.2, 0.3, 0.4 seconds. ")


@pytest.mark.parametrize("n", [1, 4, 16, 32])
def test_other_frame_counts(tmp_path, n):
  path = write_video(tmp_path / "v.mkv", "ffv1", num_frames=33, pix_fmt="yuv420p")
  video = load_video(path, num_frames=n)
  assert video.frames.shape == (n, 224, 224, 3)
  assert read_indices(video.frames) == sample_indices(33, n)


def test_variable_frame_rate_picks_nearest_timestamp(tmp_path):
  gaps = [40, 40, 200, 40, 120] * 6
  pts = np.concatenate([[0], np.cumsum(gaps)[:-1]]).tolist()
  path = write_video(tmp_path / "vfr.mkv", "ffv1", num_frames=30, pts=pts, time_base="1/1000")
  fps = probe_video(path).fps
  video = load_video(path)
  times = np.array(pts) / 1000
  expected = [int(np.argmin(np.abs(times - i / fps))) for i in video.indices]
  assert read_indices(video.frames) == expected
  assert expected != list(video.indices)  # counting frames would have picked others
  assert video.timestamps == tuple(times[expected])


# --- picture formats --------------------------------------------------------------------------


@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_display_rotation_is_applied(tmp_path, degrees):
  plain_path = write_video(tmp_path / "plain.mp4", "libx264")
  path = with_display_rotation(plain_path, tmp_path / "rot.mp4", degrees)
  assert decode_all(path)[0].rotation % 360 == degrees % 360
  plain = load_video(plain_path)
  video = load_video(path)
  np.testing.assert_array_equal(video.frames, np.rot90(plain.frames, degrees // 90, axes=(1, 2)))
  corner = {90: (200, 20), -90: (20, 200), 180: (200, 200)}[degrees]
  red = video.frames[0][corner] * CLIP_STD + CLIP_MEAN  # the top-left marker, turned CCW
  assert red[0] > 0.9 and red[1] < 0.1


@pytest.mark.parametrize("codec,pix_fmt,frame_format", [
    ("png", "rgba", "rgba"), ("qtrle", "argb", "rgba"), ("ffv1", "gray", "gray")])
def test_alpha_and_grayscale(tmp_path, codec, pix_fmt, frame_format):
  ext = "mkv" if codec == "ffv1" else "mov"
  path = write_video(tmp_path / f"v.{ext}", codec, pix_fmt=pix_fmt, frame_format=frame_format)
  video = load_video(path)
  assert read_indices(video.frames) == sample_indices(20)
  if frame_format == "rgba":  # alpha is dropped, as PIL's convert("RGB") does
    rgb = load_video(write_video(tmp_path / "rgb.mov", "png", pix_fmt="rgb24"))
    np.testing.assert_array_equal(video.frames, rgb.frames)
  else:  # gray replicated to R = G = B
    levels = video.frames * CLIP_STD + CLIP_MEAN
    np.testing.assert_allclose(levels[..., 0], levels[..., 1], atol=1e-6)
    np.testing.assert_allclose(levels[..., 0], levels[..., 2], atol=1e-6)


@pytest.mark.parametrize("codec,pix_fmt", [("libx264", "yuv444p"), ("ffv1", "yuv420p")])
def test_odd_size(tmp_path, codec, pix_fmt):
  path = write_video(tmp_path / "odd.mkv", codec, width=97, height=61, pix_fmt=pix_fmt)
  video = load_video(path)
  assert read_indices(video.frames) == sample_indices(20)
  np.testing.assert_array_equal(video.frames, swscale_reference(path, video.indices))


@pytest.mark.parametrize("width,height", [(64, 48), (97, 61), (640, 360)])
def test_resize_close_to_pil_bicubic(tmp_path, width, height):
  """swscale's bicubic (B=0, C=0.6) vs PIL's (a=-0.5): both widen the kernel when shrinking, so
  they differ by under 1 level on average and at most ~8 levels at sharp edges (measured: mean
  0.2-0.8, max 5-8 from 64x48 up to 1920x1080); PIL bilinear is 3-7x further off on average."""
  path = write_video(tmp_path / "t.mkv", "ffv1", num_frames=8, width=width, height=height,
                     pix_fmt="bgr0", frame=textured_frame)
  video = load_video(path)
  full = [f.to_ndarray(format="rgb24") for f in decode_all(path)]
  for mode, mean_tol, max_tol in [(Image.BICUBIC, 1.0, 12), (Image.BILINEAR, None, None)]:
    pil = np.stack([tv_normalize(np.asarray(Image.fromarray(full[k]).resize((224, 224), mode)))
                    for k in video.indices])
    diff = np.abs(video.frames - pil) * CLIP_STD * 255  # in 8-bit levels
    if mean_tol is not None:
      bicubic_mean = diff.mean()
      assert bicubic_mean < mean_tol and diff.max() < max_tol, (diff.mean(), diff.max())
    else:
      assert bicubic_mean < diff.mean()


def test_large_video_memory_is_bounded(tmp_path):
  """3840x2160: numpy never holds a full-size frame (tracemalloc), and the peak RSS grows far
  less than holding the sampled frames at full size would."""
  n = 16
  path = write_video(tmp_path / "big.mp4", "libx264", num_frames=n, width=3840, height=2160,
                     options={"preset": "ultrafast"})
  full_rgb = 3840 * 2160 * 3
  clear_refs = "/proc/self/clear_refs"
  can_reset = os.access(clear_refs, os.W_OK)
  if can_reset:
    with open(clear_refs, "w") as f:
      f.write("5")  # resets VmHWM to the current RSS
  rss0 = _status_kb("VmRSS")
  tracemalloc.start()
  try:
    video = load_video(path)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert video.frames.shape == (8, 224, 224, 3)
  assert peak < full_rgb / 2
  if can_reset:
    assert (_status_kb("VmHWM") - rss0) * 1024 < 8 * full_rgb / 2


def _status_kb(key):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1])
  return 0


# --- bad input ------------------------------------------------------------------------------


def test_bad_video_files(tmp_path):
  text = tmp_path / "notes.mp4"
  text.write_text("not a video at all\n" * 20)
  with pytest.raises(MediaError, match="notes.mp4: not a video"):
    load_video(text)
  with pytest.raises(MediaError, match="no such video file"):
    load_video(tmp_path / "missing.mp4")
  (tmp_path / "empty.mkv").write_bytes(b"")
  with pytest.raises(MediaError, match="empty.mkv"):
    load_video(tmp_path / "empty.mkv")
  wav = tmp_path / "tone.wav"
  with av.open(str(wav), "w") as out:
    stream = out.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    for p in list(stream.encode(frame)) + list(stream.encode()):
      out.mux(p)
  with pytest.raises(MediaError, match="tone.wav: no video stream"):
    probe_video(wav)


# --- images ---------------------------------------------------------------------------------

TV_IMAGE = transforms.Compose([
    transforms.Resize((224, 224), interpolation=InterpolationMode.BICUBIC),
    transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "I;16"])
def test_image_matches_torchvision(tmp_path, rng, mode):
  img = Image.fromarray(textured_frame(3, 301, 173))
  img.putpixel((5, 5), (0, 0, 0))
  if mode == "RGBA":
    img = img.convert("RGBA")
    img.putalpha(Image.fromarray(rng.integers(0, 256, (173, 301), np.uint8)))
  elif mode == "I;16":
    img = Image.fromarray((np.asarray(img.convert("L")).astype(np.uint16) * 200))
  elif mode != "RGB":
    img = img.convert(mode)
  path = tmp_path / "img.png"
  img.save(path)
  ours = load_image(path)
  assert ours.shape == (1, 224, 224, 3) and ours.dtype == np.float32
  ref = TV_IMAGE(Image.open(path).convert("RGB")).permute(1, 2, 0).numpy()
  np.testing.assert_allclose(ours[0], ref, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(load_image(Image.open(path)), ours)


def test_bad_image_files(tmp_path):
  with pytest.raises(MediaError, match="no such image file"):
    load_image(tmp_path / "missing.png")
  (tmp_path / "notes.png").write_text("not an image")
  with pytest.raises(MediaError, match="notes.png: cannot decode"):
    load_image(tmp_path / "notes.png")
  Image.fromarray(textured_frame(0, 64, 64)).save(tmp_path / "full.png")
  data = (tmp_path / "full.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
  with pytest.raises(MediaError, match="cut.png"):
    load_image(tmp_path / "cut.png")
