"""The LLaMA / Vicuna decoder in Flax NNX, with a scanned layer stack and a KV cache.

Parameter names follow Hugging Face's `LlamaForCausalLM` so that conversion is a transpose per
weight. Layers are stacked along a leading `layers` axis and run with `jax.lax.scan`, or, with
`scan_layers=False`, kept as a list (see `pretrained.unstack_layers`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vllama_jax.config import LlamaConfig
from vllama_jax.layers.attention import causal_mask, dot_product_attention
from vllama_jax.layers.linear import Linear, param
from vllama_jax.layers.norms import RMSNorm
from vllama_jax.layers.rope import apply_rope, rope_cos_sin
from vllama_jax.layers.stack import stacked
from vllama_jax.sharding import constrain

HIDDEN = ("batch", "length", "act_embed")


class KVCache(NamedTuple):
  """Keys/values of every layer in fixed-size slots; prompts are left-aligned to end at `index`."""
  # (layers, batch, slots, kv_heads, head_dim) when layers are scanned; with `scan_layers=False`, a
  # tuple of per-layer (batch, slots, kv_heads, head_dim) buffers, so no step slices a layer out.
  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]
  valid: jax.Array  # (batch, slots) bool: slot holds a real token
  index: jax.Array  # () int32: next slot to write, shared by all rows
  position: jax.Array  # (batch,) int32: rotary position of the next token of each row


class LlamaAttention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    d, h, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    dense = lambda i, o, names: Linear(i, o, names=names, dtype=cfg.dtype, rngs=rngs)
    self.q_proj = dense(cfg.hidden_size, h * d, ("embed", "heads"))
    self.k_proj = dense(cfg.hidden_size, kv * d, ("embed", "kv_heads"))
    self.v_proj = dense(cfg.hidden_size, kv * d, ("embed", "kv_heads"))
    self.o_proj = dense(h * d, cfg.hidden_size, ("heads", "embed"))
    self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d

  def __call__(self, x, cos, sin, mask, cache=None):
    """Without `cache`, attends over this call's own keys and returns them as (k, v).

    With `cache = (k_all, v_all, layer, index)`, writes this call's keys at slot `index` of layer
    `layer`, attends over all slots of that layer, and returns the updated (k_all, v_all). With
    `layer=None`, `k_all`/`v_all` are this layer's own (batch, slots, ...) buffers.
    """
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q = constrain(q, ("batch", "length", "act_heads", None))
    if cache is None:
      keys, values, new_kv = k, v, (k, v)
    else:
      k_all, v_all, layer, index = cache
      if layer is None:
        k, v, at = k, v, (0, index, 0, 0)
      else:
        k, v, at = k[None], v[None], (layer, 0, index, 0, 0)
      k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype), at)
      v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype), at)
      new_kv = (k_all, v_all)
      keys, values = (k_all, v_all) if layer is None else (k_all[layer], v_all[layer])
    out = dot_product_attention(q, keys, values, mask)
    return self.o_proj(out.reshape(b, t, -1)), new_kv


class LlamaMLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    dense = lambda i, o, names: Linear(i, o, names=names, dtype=cfg.dtype, rngs=rngs)
    self.gate_proj = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
    self.up_proj = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
    self.down_proj = dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"))

  def __call__(self, x):
    hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(constrain(hidden, ("batch", "length", "act_mlp")))


class LlamaDecoderLayer(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cfg.dtype, rngs=rngs)
    self.input_layernorm = norm()
    self.self_attn = LlamaAttention(cfg, rngs=rngs)
    self.post_attention_layernorm = norm()
    self.mlp = LlamaMLP(cfg, rngs=rngs)

  def __call__(self, x, cos, sin, mask, cache=None):
    attn_out, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
    x = x + attn_out
    x = x + self.mlp(self.post_attention_layernorm(x))
    return constrain(x, HIDDEN), new_kv


class Llama(nnx.Module):
  """LlamaForCausalLM: token ids or `inputs_embeds` in, float32 logits out."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embed_tokens = param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size),
                              cfg.dtype, ("vocab", "embed"))
    if cfg.scan_layers:
      self.layers = stacked(lambda r: LlamaDecoderLayer(cfg, rngs=r), cfg.num_layers, rngs)
    else:
      self.layers = nnx.List([LlamaDecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cfg.dtype, rngs=rngs)
    self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, names=("embed", "vocab"), dtype=cfg.dtype,
                          rngs=rngs)

  @property
  def dtype(self):
    return jnp.dtype(self.config.dtype)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    return jnp.take(self.embed_tokens[...], input_ids, axis=0)

  def logits(self, hidden: jax.Array) -> jax.Array:
    logits = self.lm_head(self.norm(hidden), out_dtype=jnp.float32)
    return constrain(logits, ("batch", "length", "act_vocab")) if logits.ndim == 3 else logits

  def _run_layers(self, x, cos, sin, mask, cache=None):
    """All decoder layers. Without a cache, returns (x, (k, v) of every layer); with
    `cache = (k_all, v_all, index)`, returns (x, updated (k_all, v_all)). Keys/values are stacked
    arrays for scanned layers, tuples of per-layer arrays otherwise."""
    if not self.config.scan_layers:
      return self._loop_layers(x, cos, sin, mask, cache)
    graphdef, layer_states = nnx.split(self.layers)

    def run_layer(layer_state, h, layer_cache):
      return nnx.merge(graphdef, layer_state)(h, cos, sin, mask, layer_cache)

    if self.config.remat:
      run_layer = jax.checkpoint(run_layer)

    if cache is None:  # per-layer keys/values come out stacked as the scan's outputs
      def body(h, layer_state):
        return run_layer(layer_state, h, None)
      return jax.lax.scan(body, x, layer_states)

    k_all, v_all, index = cache  # the cache rides in the carry so XLA updates it in place

    def body_cached(carry, xs):
      h, k_all, v_all = carry
      layer_state, layer = xs
      h, (k_all, v_all) = run_layer(layer_state, h, (k_all, v_all, layer, index))
      return (h, k_all, v_all), None

    layer_ids = jnp.arange(self.config.num_layers, dtype=jnp.int32)
    (x, k_all, v_all), _ = jax.lax.scan(body_cached, (x, k_all, v_all), (layer_states, layer_ids))
    return x, (k_all, v_all)

  def _loop_layers(self, x, cos, sin, mask, cache):
    def call(layer, h, layer_cache):
      if not self.config.remat:
        return layer(h, cos, sin, mask, layer_cache)
      # As the scanned path: a pure function of the layer's state. (nnx.remat writes the layer's
      # state back, which fails on a frozen layer merged inside the train step's trace.)
      graphdef, state = nnx.split(layer)
      return jax.checkpoint(lambda s, h, c: nnx.merge(graphdef, s)(h, cos, sin, mask, c))(state, h, layer_cache)

    ks, vs = [], []
    for i, layer in enumerate(self.layers):
      x, (k, v) = call(layer, x, None if cache is None else (cache[0][i], cache[1][i], None, cache[2]))
      ks.append(k)
      vs.append(v)
    return x, (tuple(ks), tuple(vs))

  def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
               attention_mask: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
    """Causal forward over a padded batch; returns (batch, length, vocab) float32 logits.

    `attention_mask` (1 = real token) may pad on either side; positions default to the running count
    of real tokens, so a row gets the same positions whatever its padding.
    """
    x = self._inputs(input_ids, inputs_embeds)
    b, t, _ = x.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    if positions is None:
      positions = _positions_from_mask(attention_mask)
    slots = jnp.arange(t, dtype=jnp.int32)
    mask = causal_mask(jnp.broadcast_to(slots, (b, t)), slots, attention_mask.astype(bool))
    cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
    x, _ = self._run_layers(constrain(x, HIDDEN), cos, sin, mask)
    return self.logits(x)

  # ---- KV-cache inference -------------------------------------------------------------------

  def prefill(self, inputs_embeds: jax.Array, attention_mask: jax.Array, num_slots: int):
    """Runs a left-padded prompt batch; returns the last position's logits (B, V) and a KVCache."""
    b, t, _ = inputs_embeds.shape
    mask_bool = attention_mask.astype(bool)
    slots = jnp.arange(t, dtype=jnp.int32)
    mask = causal_mask(jnp.broadcast_to(slots, (b, t)), slots, mask_bool)
    cos, sin = rope_cos_sin(_positions_from_mask(attention_mask), self.config.head_dim,
                            self.config.rope_theta)
    x, (k, v) = self._run_layers(constrain(inputs_embeds.astype(self.dtype), HIDDEN), cos, sin, mask)
    pad = lambda kv: jnp.pad(kv, [(0, 0)] * (kv.ndim - 3) + [(0, num_slots - t), (0, 0), (0, 0)])
    cache = KVCache(
        k=jax.tree.map(pad, k), v=jax.tree.map(pad, v),
        valid=jnp.pad(mask_bool, [(0, 0), (0, num_slots - t)]),
        index=jnp.asarray(t, jnp.int32),
        position=jnp.sum(attention_mask, axis=-1).astype(jnp.int32))
    return self.logits(x[:, -1]), cache

  def decode_step(self, tokens: jax.Array, cache: KVCache):
    """One token per row at slot `cache.index`; returns logits (B, V) and the advanced cache."""
    x = self.embed(tokens[:, None])
    valid = jax.lax.dynamic_update_slice(cache.valid, jnp.ones((tokens.shape[0], 1), bool),
                                         (0, cache.index))
    cos, sin = rope_cos_sin(cache.position[:, None], self.config.head_dim, self.config.rope_theta)
    x, (k, v) = self._run_layers(x, cos, sin, valid[:, None, :], (cache.k, cache.v, cache.index))
    cache = KVCache(k=k, v=v, valid=valid, index=cache.index + 1, position=cache.position + 1)
    return self.logits(x[:, 0]), cache

  def _inputs(self, input_ids, inputs_embeds):
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids or inputs_embeds")
    return self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)


def _positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)
