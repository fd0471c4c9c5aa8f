"""Reading media files into model inputs. Audio: `audio_features` gives ImageBind's clip tensor."""

from vllama_jax.errors import VllamaError


class MediaError(VllamaError, ValueError):
  """A media file is missing, unreadable, or holds no decodable stream of the kind asked for."""


from vllama_jax.media.audio import (  # noqa: E402
    Waveform, audio_features, clip_bounds, load_audio, resample, sample_clips)
from vllama_jax.media.fbank import kaldi_fbank  # noqa: E402

__all__ = ["MediaError", "Waveform", "audio_features", "clip_bounds", "kaldi_fbank", "load_audio",
           "resample", "sample_clips"]
