"""The Flax model against the real PyTorch MiniMind (fixtures), and shape/property checks on tiny odd configs."""
import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_dir
from minimind_jax import MiniMindConfig, MiniMindForCausalLM, cache_as_minimind, init_cache
from minimind_jax.layers import rope_inv_freq

CASES = ["v2_tiny", "v3_tiny"]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    from convert import load_model

    d = fixture_dir(request.param)
    config, params = load_model(d / "model.safetensors")
    return request.param, config, params, dict(np.load(d / "inputs.npz")), dict(np.load(d / "expected.npz"))


def test_config_from_fixture_json():
    v2 = MiniMindConfig.from_json(fixture_dir("v2_tiny") / "config.json")
    v3 = MiniMindConfig.from_json(fixture_dir("v3_tiny") / "config.json")
    assert (v2.family, v2.qk_norm, v2.num_key_value_heads, v2.intermediate_size, v2.rms_norm_eps) == \
        ("minimind2", False, 2, 192, 1e-5)
    assert (v3.family, v3.qk_norm, v3.num_key_value_heads, v3.intermediate_size, v3.rms_norm_eps) == \
        ("minimind3", True, 4, 256, 1e-6)
    for c in (v2, v3):  # to_dict -> from_dict is the identity, and MiniMind's own names are written
        assert MiniMindConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert "num_experts" in v3.to_dict() and "n_routed_experts" in v2.to_dict() and "head_dim" not in v2.to_dict()


def test_presets_follow_minimind_rules():
    s = MiniMindConfig.minimind2_small()
    assert (s.hidden_size, s.num_hidden_layers, s.num_key_value_heads, s.intermediate_size) == (512, 8, 2, 1408)
    m3 = MiniMindConfig.minimind3()
    assert (m3.intermediate_size, m3.rms_norm_eps, m3.qk_norm, m3.tie_word_embeddings) == (2432, 1e-6, True, True)
    assert MiniMindConfig(family="minimind3", hidden_size=640).intermediate_size == 2048  # ceil(640*pi/64)*64


@pytest.mark.parametrize("bad, msg", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "multiple"),
    (dict(family="minimind4"), "family"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(use_moe=True, num_experts_per_tok=5), "num_experts_per_tok"),
])
def test_config_rejects_bad_values(bad, msg):
    with pytest.raises(ValueError, match=msg):
        MiniMindConfig(**bad)


ATTENTION = pytest.mark.parametrize("attention", ["blocked", "xla"])  # the implementations fp32 runs on (a CPU,
# a GPU): the fixture tests with each forced; cuDNN's (bf16 only) is tested in test_attention.py


@ATTENTION
def test_logits_loss_hidden_match_pytorch(case, attention):
    name, config, params, inp, exp = case
    out = MiniMindForCausalLM(config, attention=attention).apply({"params": params}, inp["input_ids"],
                                                                 labels=inp["labels"])
    assert out.logits.shape == exp["logits"].shape
    chex.assert_trees_all_close(np.asarray(out.logits), exp["logits"], atol=1e-5, rtol=0)
    chex.assert_trees_all_close(np.asarray(out.hidden_states), exp["hidden_states"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(out.loss), float(exp["loss"]), rtol=1e-6)
    assert float(out.aux_loss) == float(exp["aux_loss"]) == 0.0
    assert out[0] is out.logits  # tuple-like: first item is the logits


@ATTENTION
def test_kv_cache_steps_match_pytorch(case, attention):
    name, config, params, inp, exp = case
    model = MiniMindForCausalLM(config, attention=attention)
    fwd = jax.jit(lambda ids, cache: model.apply({"params": params}, ids, cache=cache))
    ids = jnp.asarray(inp["input_ids"])
    out = fwd(ids[:, :12], init_cache(config, 2, 16))
    logits, cache = [out.logits], out.cache
    for t in range(12, 16):
        out = fwd(ids[:, t:t + 1], cache)
        logits.append(out.logits)
        cache = out.cache
    chex.assert_trees_all_close(np.concatenate(logits, 1), exp["logits_step"], atol=1e-5, rtol=0)
    kv = cache_as_minimind(cache, 2)  # MiniMind's [B, S, K, H]
    k, v = np.stack([np.asarray(k) for k, _ in kv]), np.stack([np.asarray(v) for _, v in kv])
    chex.assert_trees_all_close((k, v), (exp["kv_cache_k"], exp["kv_cache_v"]), atol=1e-5, rtol=0)
    assert int(cache["index"]) == 16


@ATTENTION
def test_padding_mask_matches_unpadded_row(case, attention):
    """A left-padded row (MiniMind's -1e9 additive mask) gives the same last-token logits as that row alone
    when positions are the same."""
    name, config, params, inp, exp = case
    model = MiniMindForCausalLM(config, attention=attention)
    ids = np.asarray(inp["input_ids"][:1])
    pad = np.concatenate([np.zeros((1, 3), np.int32), ids], 1)
    mask = np.concatenate([np.zeros((1, 3), np.int32), np.ones_like(ids)], 1)
    pos = np.concatenate([np.zeros((1, 3), np.int32), np.arange(ids.shape[1])[None]], 1)
    a = model.apply({"params": params}, pad, mask, positions=pos).logits[:, 3:]
    chex.assert_trees_all_close(np.asarray(a), exp["logits"][:1], atol=1e-5, rtol=0)


@ATTENTION
def test_segments_equal_separate_sequences(case, attention):
    """Packing two samples in one row (segment_ids + restarted positions) equals running them separately."""
    name, config, params, inp, exp = case
    model = MiniMindForCausalLM(config, attention=attention)
    ids = np.asarray(inp["input_ids"])
    packed = np.concatenate([ids[0, :9], ids[1, :7]])[None]
    seg = np.array([[1] * 9 + [2] * 7])
    pos = np.concatenate([np.arange(9), np.arange(7)])[None]
    out = np.asarray(model.apply({"params": params}, packed, positions=pos, segment_ids=seg).logits[0])
    a = model.apply({"params": params}, ids[:1, :9]).logits[0]
    b = model.apply({"params": params}, ids[1:, :7]).logits[0]
    chex.assert_trees_all_close(out, np.concatenate([a, b]), atol=1e-5, rtol=0)


TINY = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, vocab_size=97,
            intermediate_size=80)


@pytest.mark.parametrize("family", ["minimind2", "minimind3"])
@pytest.mark.parametrize("extra", [{}, {"use_moe": True}, {"tie_word_embeddings": False},
                                   {"inference_rope_scaling": True}, {"head_dim": 10}])
def test_tiny_odd_configs_shapes(family, extra):
    if family == "minimind2" and "head_dim" in extra:
        pytest.skip("c090b69 has no head_dim")
    config = MiniMindConfig(family=family, **TINY, **extra)
    model = MiniMindForCausalLM(config)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (3, 7)), jnp.int32)
    with jax.numpy_rank_promotion("raise"):
        params = model.init(jax.random.key(0), ids)["params"]
        out = model.apply({"params": params}, ids, labels=ids, deterministic=False)
    assert out.logits.shape == (3, 7, 97) and out.hidden_states.shape == (3, 7, 48)
    attn = params["model"]["layers_0"]["self_attn"]
    hd = config.head_dim
    assert attn["q_proj"]["kernel"].shape == (48, 6 * hd) and attn["k_proj"]["kernel"].shape == (48, 2 * hd)
    assert ("q_norm" in attn) == (family == "minimind3")
    assert ("lm_head" in params) == (not config.tie_word_embeddings)
    mlp = params["model"]["layers_0"]["mlp"]
    if config.use_moe:
        assert mlp["gate"]["kernel"].shape == (48, 4)
        assert ("shared_experts_0" in mlp) == (family == "minimind2")
        assert float(out.aux_loss) > 0  # training-mode aux loss
        assert float(model.apply({"params": params}, ids).aux_loss) == 0.0  # eval: none, as MiniMind
    assert np.isfinite(float(out.loss))


@pytest.mark.slow
def test_moe_with_one_expert_equals_dense_mlp():
    """Top-1 of one expert with renormalised weight 1 is exactly that expert: MoE reduces to the dense MLP."""
    dense_cfg = MiniMindConfig(family="minimind3", **TINY)
    moe_cfg = dense_cfg.replace(use_moe=True, n_routed_experts=1, num_experts_per_tok=1)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 5)), jnp.int32)
    dense = MiniMindForCausalLM(dense_cfg)
    params = dense.init(jax.random.key(1), ids)["params"]
    moe_params = jax.tree.map(lambda x: x, params)
    for i in range(3):
        layer = moe_params["model"][f"layers_{i}"]
        layer["mlp"] = {"experts_0": layer["mlp"], "gate": {"kernel": jnp.ones((48, 1))}}
    a = dense.apply({"params": params}, ids).logits
    b = MiniMindForCausalLM(moe_cfg).apply({"params": moe_params}, ids).logits
    chex.assert_trees_all_close(a, b, atol=1e-6, rtol=0)


def test_yarn_scales_every_frequency_band_like_minimind():
    """With inference_rope_scaling, MiniMind rescales frequencies for all positions (max_pos/orig > 1 always)."""
    base = MiniMindConfig(**TINY)
    yarn = base.replace(inference_rope_scaling=True)
    f0, a0 = rope_inv_freq(base)
    f1, a1 = rope_inv_freq(yarn)
    assert a0 == a1 == 1.0 and f1[0] == f0[0]  # highest frequency kept (ramp 0)
    np.testing.assert_allclose(f1[-1], f0[-1] / 16, rtol=1e-6)  # lowest divided by factor (ramp 1)
    assert yarn.rope_scaling["factor"] == 16 and yarn.to_dict()["rope_scaling"]["type"] == "yarn"


def test_bfloat16_compute_is_close_to_fp32(case):
    name, config, params, inp, exp = case
    out = MiniMindForCausalLM(config, dtype=jnp.bfloat16).apply({"params": params}, inp["input_ids"])
    assert out.logits.dtype == jnp.float32
    assert np.abs(np.asarray(out.logits) - exp["logits"]).max() < 0.1


def test_config_is_hashable_and_frozen():
    c = MiniMindConfig(**TINY, inference_rope_scaling=True)
    assert hash(c) == hash(MiniMindConfig(**TINY, inference_rope_scaling=True))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden_size = 3
