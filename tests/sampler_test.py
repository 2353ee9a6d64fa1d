"""Tests for aya_jax.sampling: methods against transformers' warpers, the
sampler against transformers `generate` and against a full forward pass."""

import jax
import numpy as np
import pytest

from aya_jax import sharding as sharding_lib
from aya_jax.models import forward, hf, init_params, tiny
from aya_jax.sampling import methods as M
from aya_jax.sampling import sampler as S

FAMILIES = ("cohere", "cohere2", "llama", "gemma2", "gemma3", "qwen2")
LENGTHS = (5, 11, 3)  # ragged prompts; 11 + new tokens > gemma2's window


def _prompts(lengths=LENGTHS, seed=0, vocab=97):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, vocab, n).astype(np.int32) for n in lengths]


@pytest.fixture(scope="module")
def llama():
  cfg = tiny("llama")
  return cfg, jax.jit(lambda k: init_params(cfg, k))(jax.random.key(3))


# --- the sampler against transformers ----------------------------------------------------
def _left_pad(prompts, pad_id=0):
  width = max(len(p) for p in prompts)
  ids = np.full((len(prompts), width), pad_id, np.int64)
  mask = np.zeros((len(prompts), width), np.int64)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = p
    mask[i, width - len(p):] = 1
  return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_generate(hf_tiny_dirs, family):
  import torch
  import transformers
  cfg, params = hf.load(hf_tiny_dirs[family])
  prompts, new = _prompts(), 12
  ours = S.generate(cfg, params, prompts, jax.random.key(0), M.Greedy(), max_new_tokens=new,
                    stop_ids=(2,), pad_id=0)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      hf_tiny_dirs[family], attn_implementation="eager", dtype=torch.float32).eval()
  ids, mask = _left_pad(prompts)
  with torch.no_grad():
    out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                         max_new_tokens=new, eos_token_id=2, pad_token_id=0).numpy()
  ref = np.zeros((len(prompts), new), np.int64)
  ref[:, :out.shape[1] - ids.shape[1]] = out[:, ids.shape[1]:]
  np.testing.assert_array_equal(ours.tokens, ref)
  for r, row in enumerate(ref):  # lengths: up to and including the first eos
    eos = np.flatnonzero(row == 2)
    assert ours.lengths[r] == (eos[0] + 1 if eos.size else new)
    assert ours.stopped[r] == bool(eos.size)


# --- the sampler against a full forward pass ---------------------------------------------
@pytest.mark.parametrize("family", ["gemma2", "gemma3", "cohere", "cohere2"])
def test_decode_logprobs_equal_full_forward(hf_tiny_dirs, family):
  cfg, params = hf.load(hf_tiny_dirs[family])
  prompts, t, k = _prompts(), 1.3, 5
  res = S.generate(cfg, params, prompts, jax.random.key(7), M.Sampling(t, top_k=k),
                   max_new_tokens=10, stop_ids=(), n=2)
  assert res.tokens.shape == (6, 10) and (res.lengths == 10).all()
  # one left-padded forward over every prompt + completion
  seqs = [np.concatenate([prompts[row // 2], res.tokens[row]]) for row in range(6)]
  width = max(len(q) for q in seqs)
  tokens, seg, pos = (np.zeros((6, width), np.int32) for _ in range(3))
  for row, q in enumerate(seqs):
    tokens[row, width - len(q):], seg[row, width - len(q):] = q, 1
    pos[row, width - len(q):] = np.arange(len(q))
  full = np.asarray(forward(cfg, params, tokens, pos, seg))
  logits = full[:, width - 11:-1]  # the 10 columns that predict the new tokens
  tok = res.tokens
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  np.testing.assert_allclose(res.model_logprobs, np.take_along_axis(logp, tok[..., None], 2)[
      ..., 0], atol=5e-5)
  kth = np.sort(logits, axis=-1)[..., -k]
  assert (np.take_along_axis(logits, tok[..., None], 2)[..., 0] >= kth).all()  # within top-k
  filt = np.where(logits >= kth[..., None], logits / t, -np.inf)
  want = np.take_along_axis(np.asarray(jax.nn.log_softmax(filt, axis=-1)), tok[..., None], 2)
  np.testing.assert_allclose(res.logprobs, want[..., 0], atol=5e-5)


# --- randomness, n, stops ---------------------------------------------------------------
def test_same_key_same_samples_different_key_different(llama):
  cfg, params = llama
  method = M.Sampling(temperature=1.0)
  gen = lambda key: S.generate(cfg, params, _prompts(), key, method, max_new_tokens=8,
                               stop_ids=())
  a, b, c = gen(jax.random.key(1)), gen(jax.random.key(1)), gen(jax.random.key(2))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert (a.tokens != c.tokens).mean() > 0.5


def test_temperature_to_zero_equals_greedy(llama):
  cfg, params = llama
  gen = lambda m: S.generate(cfg, params, _prompts(), jax.random.key(5), m, max_new_tokens=8,
                             stop_ids=())
  greedy = gen(M.Greedy())
  np.testing.assert_array_equal(gen(M.Temperature(1e-4)).tokens, greedy.tokens)
  np.testing.assert_array_equal(gen(M.Sampling(temperature=0.0)).tokens, greedy.tokens)
  assert (greedy.logprobs == 0).all() and (greedy.model_logprobs < 0).all()


def test_n_samples_share_the_prefill_and_rows_do_not_depend_on_the_batch(llama):
  cfg, params = llama
  prompts, method = _prompts(), M.Temperature(1.0)
  keys = jax.random.split(jax.random.key(9), 3)  # one key per prompt
  many = S.generate(cfg, params, prompts, keys, method, max_new_tokens=8, stop_ids=(), n=4)
  assert many.tokens.shape == (12, 8) and many.n == 4
  one = S.generate(cfg, params, prompts, keys, method, max_new_tokens=8, stop_ids=())
  np.testing.assert_array_equal(many.tokens[::4], one.tokens)  # sample 0 == the n=1 run
  np.testing.assert_allclose(many.model_logprobs[::4], one.model_logprobs, atol=1e-5)
  for i in range(3):  # the samples of one prompt are different draws
    rows = {tuple(r) for r in many.tokens[4 * i:4 * i + 4]}
    assert len(rows) == 4
  # prompt 1 alone (another batch size and padding) gives the same rows
  alone = S.generate(cfg, params, prompts[1:2], keys[1:2], method, max_new_tokens=8,
                     stop_ids=(), n=4)
  np.testing.assert_array_equal(alone.tokens, many.tokens[4:8])
  np.testing.assert_allclose(alone.model_logprobs, many.model_logprobs[4:8], atol=1e-5)


def test_rows_stop_independently_and_padding_never_leaks(llama):
  cfg, params = llama
  prompts = _prompts((4, 7, 2, 9))
  free = S.generate(cfg, params, prompts, jax.random.key(0), M.Greedy(), max_new_tokens=10,
                    stop_ids=())
  # two stop ids: what row 0 emits at step 3 and row 2 at step 6
  stop = (int(free.tokens[0, 3]), int(free.tokens[2, 6]))
  res = S.generate(cfg, params, prompts, jax.random.key(0), M.Greedy(), max_new_tokens=10,
                   stop_ids=stop, pad_id=0)
  for r in range(4):
    hits = np.flatnonzero(np.isin(free.tokens[r], stop))
    n = hits[0] + 1 if hits.size else 10
    assert res.lengths[r] == n and res.stopped[r] == bool(hits.size)
    np.testing.assert_array_equal(res.tokens[r, :n], free.tokens[r, :n])
    assert (res.tokens[r, n:] == 0).all()
    assert (res.logprobs[r, n:] == 0).all() and (res.model_logprobs[r, n:] == 0).all()
    np.testing.assert_allclose(res.model_logprobs[r, :n], free.model_logprobs[r, :n],
                               atol=1e-5)
  assert res.lengths[0] <= 4 and res.lengths[2] <= 7 and res.stopped[[0, 2]].all()


def test_texts_are_cut_at_the_stop_id():
  class Tok:  # the two calls decode_completion makes
    def decode(self, ids, skip_special_tokens):
      return " ".join(str(i) for i in ids if not skip_special_tokens or i > 2)
  res = S.SampleResult(tokens=np.array([[5, 6, 2, 0], [7, 8, 9, 4]], np.int32),
                       logprobs=np.zeros((2, 4)), model_logprobs=np.zeros((2, 4)),
                       lengths=np.array([3, 4]), stopped=np.array([True, False]))
  assert res.texts(Tok(), stop_ids=(2,)) == ["5 6", "7 8 9 4"]
  np.testing.assert_array_equal(res.completion(0), [5, 6, 2])


# --- buckets, sharding, errors -----------------------------------------------------------
def test_buckets_avoid_recompiling(llama):
  assert [S.bucket_length(n) for n in (1, 16, 17, 33, 512, 513, 1500)] == [
      16, 16, 32, 64, 512, 1024, 1536]
  assert [S.bucket_batch(b) for b in (1, 3, 5, 8)] == [1, 4, 8, 8]
  assert S.bucket_batch(3, multiple=8) == 8
  cfg, params = llama
  fn = S._compiled(cfg, M.Greedy(), 4, 1, (2,), 0, None, "fsdp")
  before = fn._cache_size()
  for lengths in [(5, 11, 3), (2, 14, 9, 1), (16,)]:  # prompt bucket 16; batch buckets 4, 1
    S.generate(cfg, params, _prompts(lengths), jax.random.key(0), M.Greedy(), max_new_tokens=4,
               stop_ids=(2,), pad_id=0)
  assert fn._cache_size() - before == 2


def test_mesh_of_8_devices_equals_one_device(llama):
  assert len(jax.devices()) == 8
  cfg, params = llama
  mesh = sharding_lib.make_mesh((4, 2, 1))
  method = M.Sampling(temperature=0.9, top_p=0.95)
  run = lambda mesh: S.generate(cfg, params, _prompts(), jax.random.key(4), method,
                                max_new_tokens=8, n=2, mesh=mesh)
  one, many = run(None), run(mesh)
  np.testing.assert_array_equal(many.tokens, one.tokens)
  np.testing.assert_array_equal(many.lengths, one.lengths)
  np.testing.assert_allclose(many.model_logprobs, one.model_logprobs, atol=1e-5)
  np.testing.assert_allclose(many.logprobs, one.logprobs, atol=1e-5)


def test_bad_input_gets_a_clear_error(llama):
  cfg, params = llama
  gen = lambda prompts, **kw: S.generate(cfg, params, prompts, jax.random.key(0), **kw)
  with pytest.raises(ValueError, match=r"prompt 1 has 250 tokens.*max_seq_len=256"):
    gen([np.ones(3, np.int32), np.ones(250, np.int32)], max_new_tokens=10)
  with pytest.raises(ValueError, match=r"prompt 0 has token id 97 outside .*\[0, 97\)"):
    gen([np.array([5, 97])])
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    gen([np.zeros(0, np.int32)])
  with pytest.raises(ValueError, match="one key per prompt"):
    S.generate(cfg, params, _prompts(), jax.random.split(jax.random.key(0), 2))
  with pytest.raises(ValueError, match="value head"):
    S.generate(cfg.replace(value_head=True), params, _prompts(), jax.random.key(0))
