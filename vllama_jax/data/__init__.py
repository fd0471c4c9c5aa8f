"""Training data: annotation readers, training text and label masks, train-time augmentation,
and grain pipelines with per-step dataset mixing."""

from vllama_jax.data.formats import (
    image_caption_records, llava_records, videochat_records, webvid_records)
from vllama_jax.data.pipeline import Loader, Mixer, collate, dataset, loader, mix
from vllama_jax.data.samples import DataConfig, SampleBuilder
from vllama_jax.data.text import (
    BrokenSample, blip_caption, caption_example, instruction_example, llama2_example,
    vicuna_example)

__all__ = ["BrokenSample", "DataConfig", "Loader", "Mixer", "SampleBuilder", "blip_caption",
           "caption_example", "collate", "dataset", "image_caption_records",
           "instruction_example", "llama2_example", "llava_records", "loader", "mix",
           "vicuna_example", "videochat_records", "webvid_records"]
