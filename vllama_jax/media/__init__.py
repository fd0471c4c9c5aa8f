"""Reading media files into model inputs. Audio: `audio_features` gives ImageBind's clip tensor;
video: `load_video` gives sampled CLIP-normalised frames; images: `load_image`."""

from vllama_jax.errors import VllamaError


class MediaError(VllamaError, ValueError):
  """A media file is missing, unreadable, or holds no decodable stream of the kind asked for."""


from vllama_jax.media.audio import (  # noqa: E402
    Waveform, audio_features, clip_bounds, load_audio, resample, sample_clips)
from vllama_jax.media.fbank import kaldi_fbank  # noqa: E402
from vllama_jax.media.image import CLIP_MEAN, CLIP_STD, load_image, normalize  # noqa: E402
from vllama_jax.media.video import (  # noqa: E402
    SampledVideo, VideoInfo, load_video, probe_video, sample_indices, time_hint)

__all__ = ["MediaError", "Waveform", "audio_features", "clip_bounds", "kaldi_fbank", "load_audio",
           "resample", "sample_clips",
           "CLIP_MEAN", "CLIP_STD", "SampledVideo", "VideoInfo", "load_image", "load_video",
           "normalize", "probe_video", "sample_indices", "time_hint"]
