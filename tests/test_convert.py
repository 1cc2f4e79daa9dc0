"""convert/: models and adapters in and out (.pth, .safetensors, PEFT, orbax), checked against MiniMind fixtures."""
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora
from conftest import ROOT, fixture_dir
from convert import (BaseMismatchWarning, CheckpointError, ConfigInferredWarning, fingerprint, load_adapter,
                     load_model, read_adapter_metadata, save_adapter, save_model, state_dict_layout)
from convert import checkpoint as ckpt_lib
from convert import from_torch, to_torch
from convert.model_io import param_shapes, read_state_dict
from minimind_jax import MiniMindConfig, MiniMindForCausalLM

torch = pytest.importorskip("torch")
CASES = ["v2_tiny", "v3_tiny"]


def leaves_equal(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype, p
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


@pytest.fixture(scope="module", params=CASES)
def base(request):
    d = fixture_dir(request.param)
    config, params = load_model(d / "model.pth")
    return request.param, d, config, params


@pytest.fixture(scope="module")
def logits_fn():
    fns = {}

    def get(config):
        if config not in fns:
            model = MiniMindForCausalLM(config)
            fns[config] = jax.jit(lambda p, ids, ad=None: lora.apply(model, p, ad, ids).logits)
        return fns[config]

    return get


def tiny_params(config, seed=0):
    """Random params of the model's exact tree (from its abstract init; nothing is run eagerly)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape).astype(np.float32)), param_shapes(config))


# ------------------------------------------------------------------------------------------------------------
# whole models
# ------------------------------------------------------------------------------------------------------------
def test_pth_and_safetensors_give_identical_params(base):
    name, d, config, params = base
    config2, params2 = load_model(d / "model.safetensors")
    assert config2 == config == MiniMindConfig.from_json(d / "config.json")
    leaves_equal(params, params2)
    assert "lm_head" not in params  # tied: the embedding serves as lm_head


def test_logits_from_pth_match_pytorch(base, logits_fn):
    name, d, config, params = base
    inp, exp = np.load(d / "inputs.npz"), np.load(d / "expected.npz")
    logits = logits_fn(config)(params, inp["input_ids"])
    chex.assert_trees_all_close(np.asarray(logits), exp["logits"], atol=1e-5, rtol=0)


def test_layout_is_minimind_state_dict_order(base):
    name, d, config, params = base
    sd = read_state_dict(d / "model.pth")
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == list(state_dict_layout(config).items())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".ckpt"])
def test_save_load_roundtrip_is_bit_exact(base, tmp_path, suffix):
    name, d, config, params = base
    out = save_model(params, config, tmp_path / f"model{suffix}")
    config2, params2 = load_model(out)  # config.json beside the file / inside the directory
    assert config2 == config
    leaves_equal(params, params2)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_model(params, config, out)
    if suffix == ".ckpt":
        assert ckpt_lib.is_params_ckpt(out) and not list(tmp_path.glob(".*tmp*"))


def test_saved_pth_is_what_torch_save_of_state_dict_writes(base, tmp_path):
    name, d, config, params = base
    save_model(params, config, tmp_path / "m.pth")
    ours = torch.load(tmp_path / "m.pth", map_location="cpu", weights_only=True)
    ref = torch.load(d / "model.pth", map_location="cpu", weights_only=True)
    assert [(k, v.shape, v.dtype) for k, v in ours.items()] == [(k, v.shape, v.dtype) for k, v in ref.items()]
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    ptr = lambda k: ours[k].untyped_storage().data_ptr()
    assert ptr("lm_head.weight") == ptr("model.embed_tokens.weight")  # one storage, as in the original file
    torch_model = torch.nn.Module()  # strict load into modules with MiniMind's names and shapes
    for k, v in ref.items():
        mod = torch_model
        for part in k.split(".")[:-1]:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter("weight", torch.nn.Parameter(torch.empty_like(v)))
    torch_model.load_state_dict(ours, strict=True)


def test_family_detected_without_config_json(base, tmp_path, logits_fn):
    name, d, config, params = base
    shutil.copy(d / "model.pth", tmp_path / "model.pth")
    with pytest.warns(ConfigInferredWarning, match="inferred from the tensor shapes"):
        config2, params2 = load_model(tmp_path / "model.pth")
    assert config2 == config
    assert config2.family == ("minimind3" if name == "v3_tiny" else "minimind2")
    leaves_equal(params, params2)


def test_fp16_and_bf16_files_and_prefixes_load(base, tmp_path):
    name, d, config, params = base
    ref = torch.load(d / "model.pth", map_location="cpu", weights_only=True)
    # MiniMind's checkpoint code: {k: v.half()} -> two separate fp16 copies of the tied weight; DDP prefix
    torch.save({f"module.{k}": v.half() for k, v in ref.items()}, tmp_path / "half.pth")
    torch.save({f"_orig_mod.{k}": v.bfloat16() for k, v in ref.items()}, tmp_path / "bf16.pth")
    for f, dt in (("half.pth", np.float16), ("bf16.pth", jnp.bfloat16)):
        _, p32 = load_model(tmp_path / f, config=config)
        _, praw = load_model(tmp_path / f, config=config, dtype=None)
        want = jax.tree.map(lambda x: np.asarray(x).astype(dt), params)
        leaves_equal(praw, want)
        leaves_equal(p32, jax.tree.map(lambda x: x.astype(np.float32), want))


def test_untied_and_moe_models_roundtrip_and_infer(tmp_path):
    cfgs = [MiniMindConfig(family="minimind2", hidden_size=48, num_hidden_layers=3, num_attention_heads=8,
                           num_key_value_heads=2, vocab_size=97, tie_word_embeddings=False),
            MiniMindConfig(family="minimind2", hidden_size=48, num_hidden_layers=2, num_attention_heads=8,
                           num_key_value_heads=4, vocab_size=97, use_moe=True, n_routed_experts=3),
            MiniMindConfig(family="minimind3", hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                           num_key_value_heads=1, head_dim=6, vocab_size=89, use_moe=True, n_routed_experts=3,
                           moe_intermediate_size=24)]
    for i, cfg in enumerate(cfgs):
        params = tiny_params(cfg, i)
        save_model(params, cfg, tmp_path / f"m{i}.pth")
        (tmp_path / "config.json").unlink()  # infer everything from the shapes
        with pytest.warns(ConfigInferredWarning):
            got, params2 = load_model(tmp_path / f"m{i}.pth")
        assert got.replace(num_experts_per_tok=cfg.num_experts_per_tok) == cfg
        leaves_equal(params, params2)
        sd = torch.load(tmp_path / f"m{i}.pth", weights_only=True)
        assert list(sd) == list(state_dict_layout(cfg))
        if not cfg.tie_word_embeddings:
            assert sd["lm_head.weight"].untyped_storage().data_ptr() != \
                sd["model.embed_tokens.weight"].untyped_storage().data_ptr()


def test_mismatch_is_one_error_listing_missing_unexpected_and_misshaped(base, tmp_path):
    name, d, config, params = base
    sd = torch.load(d / "model.pth", weights_only=True)
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 32)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "bad.pth", config=config)
    msg = str(e.value)
    assert "bad.pth" in msg
    assert "missing keys (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected keys (1): model.layers.0.self_attn.extra.weight" in msg
    assert "model.layers.0.self_attn.q_proj.weight expected [64, 64] got [64, 32]" in msg


def test_tied_copies_must_agree(base, tmp_path):
    name, d, config, params = base
    sd = {k: v.clone() for k, v in torch.load(d / "model.pth", weights_only=True).items()}
    sd["lm_head.weight"] += 1.0
    torch.save(sd, tmp_path / "untied.pth")
    with pytest.raises(CheckpointError, match="tie_word_embeddings=False"):
        load_model(tmp_path / "untied.pth", config=config)
    cfg, p = load_model(tmp_path / "untied.pth", config=config.replace(tie_word_embeddings=False))
    np.testing.assert_array_equal(p["lm_head"]["kernel"], sd["lm_head.weight"].numpy().T)


def test_bad_files_give_clear_errors(tmp_path):
    d = fixture_dir("v3_tiny")

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": Payload()}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match=r"refused.*pickled Python objects.*weights_only=True.*print"):
        load_model(tmp_path / "code.pth")
    (tmp_path / "cut.pth").write_bytes((d / "model.pth").read_bytes()[:4000])
    with pytest.raises(CheckpointError, match="cut.pth: not a readable PyTorch checkpoint"):
        load_model(tmp_path / "cut.pth")
    (tmp_path / "cut.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:4000])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors"):
        load_model(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not a model: use load_adapter"):
        load_model(fixture_dir("v3_tiny_lora") / "lora.pth")
    with pytest.raises(CheckpointError, match="use load_model"):
        load_adapter(d / "model.pth")


# ------------------------------------------------------------------------------------------------------------
# adapters
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_case(base):
    name, d, config, params = base
    ld = fixture_dir(name + "_lora")
    return name, ld, config, params, load_adapter(ld / "lora.pth", params=params, config=config)


def test_fixture_adapter_reproduces_pytorch_logits_and_merge(lora_case, logits_fn):
    name, ld, config, params, adapter = lora_case
    assert adapter.alpha is None and adapter.targets == "q_proj,o_proj"
    assert set(adapter.ranks.values()) == {4} and len(adapter.ranks) == 4
    inp, exp = np.load(ld / "inputs.npz"), np.load(ld / "expected.npz")
    logits = logits_fn(config)(params, inp["input_ids"], adapter)
    chex.assert_trees_all_close(np.asarray(logits), exp["logits"], atol=1e-5, rtol=0)
    _, merged_ref = load_model(ld / "merged.pth", config=config)
    chex.assert_trees_all_close(lora.merge(params, adapter), merged_ref, atol=1e-6, rtol=0)


def test_fixture_adapter_with_ddp_prefix_loads(lora_case, tmp_path):
    name, ld, config, params, adapter = lora_case
    sd = torch.load(ld / "lora.pth", weights_only=True)
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pth")
    leaves_equal(load_adapter(tmp_path / "ddp.pth", config=config).weights, adapter.weights)


def random_adapter(params, seed, alpha=None, rslora=False, targets=None, rank=3):
    """An adapter with random A and B (numpy RNG) on the modules `targets` selects; rank an int or {suffix: r}."""
    rng, weights = np.random.default_rng(seed), {}
    for path in lora.select_targets(params, targets):
        i, o = params_at(params, path)["kernel"].shape
        r = rank if isinstance(rank, int) else rank.get(path[-1], rank["*"])
        node = weights
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = {"A": jnp.asarray(0.05 * rng.normal(size=(i, r)), jnp.float32),
                          "B": jnp.asarray(0.05 * rng.normal(size=(r, o)), jnp.float32)}
    return lora.Adapter(weights, alpha=alpha, rslora=rslora, targets=lora.targets.spec_string(targets))


def params_at(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def test_adapter_roundtrips_bit_exact(lora_case, tmp_path):
    name, ld, config, params, _ = lora_case
    plain = random_adapter(params, 1, targets="q_proj,k_proj,o_proj,gate_proj", rank={"k_proj": 2, "*": 3})
    scaled = random_adapter(params, 2, alpha=16.0, rslora=True, targets="all-linear")
    for ad, fmt, path in ((plain, None, "a.pth"), (plain, None, "a.safetensors"), (plain, "peft", "peft_a"),
                          (scaled, "peft", "peft_s")):
        save_adapter(ad, tmp_path / path, format=fmt, dtype="float32")
        back = load_adapter(tmp_path / path, params=params)
        leaves_equal(back.weights, ad.weights)
        assert (back.alpha, back.rslora, back.ranks) == (ad.alpha, ad.rslora, ad.ranks)
    meta = {"lora_name": "lora_identity", "step": np.int64(40), "base_config": config, "lr": 1e-4}
    save_adapter(scaled, tmp_path / "s.ckpt", metadata=meta, params=params)
    back = load_adapter(tmp_path / "s.ckpt", params=params, config=config)
    leaves_equal(back.weights, scaled.weights)
    assert (back.alpha, back.rslora, back.targets) == (16.0, True, "all-linear")
    m = read_adapter_metadata(tmp_path / "s.ckpt")
    assert m["lora_name"] == "lora_identity" and m["step"] == 40 and m["lr"] == 1e-4
    assert m["base_config"] == config.to_dict() and MiniMindConfig.from_dict(m["base_config"]) == config
    assert m["base_fingerprint"] == fingerprint(params) and m["rank"] == 3 and m["alpha"] == 16.0
    assert m["hidden_size"] == config.hidden_size and m["dtype"] == "float32"


def test_minimind_pth_folds_scale_into_b(lora_case, tmp_path):
    name, ld, config, params, _ = lora_case
    ad = random_adapter(params, 3, alpha=6.0)  # scale 6/3 = 2
    save_adapter(ad, tmp_path / "a.pth", dtype="float32")
    back = load_adapter(tmp_path / "a.pth")
    assert back.alpha is None
    chex.assert_trees_all_close(lora.delta(back), lora.delta(ad), atol=1e-7)
    sd = torch.load(tmp_path / "a.pth", weights_only=True)
    b = ad.weights["model"]["layers_0"]["self_attn"]["q_proj"]["B"]
    np.testing.assert_allclose(sd["model.layers.0.self_attn.q_proj.lora.B.weight"].numpy(), 2 * np.asarray(b).T)


def test_converted_pth_has_minimind_keys_shapes_dtype(lora_case, tmp_path):
    name, ld, config, params, adapter = lora_case
    ref = torch.load(ld / "lora.pth", weights_only=True)
    save_adapter(adapter, tmp_path / "lora.pth", dtype=next(iter(ref.values())).numpy().dtype.name)
    ours = torch.load(tmp_path / "lora.pth", weights_only=True)
    assert [(k, v.shape, v.dtype) for k, v in ours.items()] == [(k, v.shape, v.dtype) for k, v in ref.items()]
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    save_adapter(adapter, tmp_path / "default.pth")  # MiniMind HEAD's save_lora writes fp16
    assert {v.dtype for v in torch.load(tmp_path / "default.pth", weights_only=True).values()} == {torch.float16}


def test_peft_scales_match_peft_semantics(lora_case, tmp_path):
    name, ld, config, params, adapter = lora_case
    sd = torch.load(ld / "lora.pth", weights_only=True)
    from safetensors.numpy import save_file
    tensors = {f"base_model.model.{k.replace('.lora.A.', '.lora_A.').replace('.lora.B.', '.lora_B.')}":
               v.float().numpy() for k, v in sd.items()}
    base_cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj"]}
    cases = [({}, lambda m: 2.0), ({"use_rslora": True}, lambda m: 4.0),
             ({"alpha_pattern": {"o_proj": 2}}, lambda m: 0.5 if m.endswith("o_proj") else 2.0)]
    want = lora.delta(adapter)
    for i, (extra, scale) in enumerate(cases):
        d = tmp_path / f"peft{i}"
        d.mkdir()
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({**base_cfg, **extra}))
        for src in (d, d / "adapter_model.safetensors"):
            got = lora.delta(load_adapter(src, config=config))
            for path, delta in want.items():
                np.testing.assert_allclose(got[path], scale(".".join(path)) * delta, rtol=1e-6, atol=1e-9)


def test_adapter_errors(lora_case, tmp_path):
    name, ld, config, params, adapter = lora_case
    sd = torch.load(ld / "lora.pth", weights_only=True)
    q = "model.layers.0.self_attn.q_proj.lora."

    def err(sd_, match, **kw):
        torch.save(sd_, tmp_path / "x.pth")
        with pytest.raises(CheckpointError, match=match):
            load_adapter(tmp_path / "x.pth", **kw)

    err({k: v for k, v in sd.items() if k != q + "B.weight"}, rf"missing keys \(1\): {q}B\.weight")
    err({**sd, "model.layers.0.self_attn.q_proj.bias": torch.zeros(3)},
        r"unexpected keys .*: model\.layers\.0\.self_attn\.q_proj\.bias")
    err({**sd, q + "B.weight": torch.zeros(64, 5)}, r"rank mismatch: A \[4, 64\] has rank 4 but B \[64, 5\]")
    small = config.replace(hidden_size=32, num_attention_heads=4, intermediate_size=None, head_dim=None)
    err(sd, r"does not fit the base model .*hidden 32.*adapter maps 64 -> 64 but the base kernel is \[in 32",
        config=small)
    other = {k.replace("self_attn.q_proj", "mlp.experts.0.up_proj"): v for k, v in sd.items()}
    err(other, r"modules not in the base .*model\.layers\.0\.mlp\.experts\.0\.up_proj", params=params)
    kv_rows = 16 if name == "v3_tiny" else 32  # an adapter for the other family's k_proj
    err({"model.layers.0.self_attn.k_proj.lora.A.weight": torch.zeros(2, 64),
         "model.layers.0.self_attn.k_proj.lora.B.weight": torch.zeros(kv_rows, 2)},
        rf"another model size or family.*adapter maps 64 -> {kv_rows}", config=config)

    class Payload:
        def __reduce__(self):
            return (print, ("never",))

    err({q + "A.weight": Payload()}, r"refused.*weights_only=True")
    (tmp_path / "junk.pth").write_bytes(b"\x00not a checkpoint" * 20)
    with pytest.raises(CheckpointError, match="junk.pth: not a readable PyTorch checkpoint"):
        load_adapter(tmp_path / "junk.pth")


def test_adapter_ckpt_is_atomic_and_overwrite_is_explicit(lora_case, tmp_path, monkeypatch):
    name, ld, config, params, adapter = lora_case
    path = tmp_path / f"lora_identity_{config.hidden_size}.ckpt"

    def boom(directory, tree):
        (Path(directory) / "partial").mkdir(parents=True)
        raise KeyboardInterrupt("killed mid-save")

    with monkeypatch.context() as m:
        m.setattr(ckpt_lib, "save_tree", boom)
        with pytest.raises(KeyboardInterrupt):
            save_adapter(adapter, path)
    assert list(tmp_path.iterdir()) == []  # nothing that looks like (or is left of) a checkpoint
    save_adapter(adapter, path, metadata={"step": 1})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapter(adapter, path, metadata={"step": 2})
    doubled = adapter.replace(weights=jax.tree.map(lambda x: 2 * x, adapter.weights))
    save_adapter(doubled, path, metadata={"step": 2}, overwrite=True)
    assert read_adapter_metadata(path)["step"] == 2
    leaves_equal(load_adapter(path).weights, jax.tree.map(lambda x: x.astype(np.float32), doubled.weights))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    other = jax.tree.map(lambda x: x + 1, params)
    assert fingerprint(other) != fingerprint(params)
    save_adapter(adapter, path, params=params, overwrite=True)
    with pytest.warns(BaseMismatchWarning, match="fingerprint"):
        load_adapter(path, params=other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(path, params=params)


# ------------------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------------------
def test_cli_adapter_both_ways(tmp_path, capsys):
    d, ld = fixture_dir("v3_tiny"), fixture_dir("v3_tiny_lora")
    shutil.copy(ld / "lora.pth", tmp_path / "lora_identity_64.pth")
    ckpt = tmp_path / "out" / "lora_identity_64.ckpt"
    assert from_torch.main([str(tmp_path / "lora_identity_64.pth"), "-o", str(ckpt), "--base",
                            str(d / "model.pth")]) == 0
    out = capsys.readouterr().out
    assert "keys:    8" in out and "rank:    4" in out and "targets: q_proj,o_proj" in out and "bytes:" in out
    meta = read_adapter_metadata(ckpt)
    assert meta["lora_name"] == "lora_identity" and meta["base_config"]["hidden_size"] == 64
    assert to_torch.main([str(ckpt)]) == 0  # default name: MiniMind's <lora_name>_<hidden>.pth beside it
    pth = tmp_path / "out" / "lora_identity_64.pth"
    ref = torch.load(ld / "lora.pth", weights_only=True)
    ours = torch.load(pth, weights_only=True)
    assert list(ours) == list(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert to_torch.main([str(ckpt)]) == 1  # exists: refused without --force
    assert "--force" in capsys.readouterr().err
    assert to_torch.main([str(ckpt), "--force", "--dtype", "float32"]) == 0
    assert to_torch.main([str(ckpt), "--format", "peft", "-o", str(tmp_path / "peft")]) == 0
    leaves_equal(load_adapter(tmp_path / "peft").weights, load_adapter(ckpt).weights)
    assert from_torch.main([str(tmp_path / "peft"), "-o", str(tmp_path / "p.ckpt"), "--base",
                            str(fixture_dir("v3_tiny") / "config.json")]) == 0


def test_cli_models_and_merge(tmp_path, capsys):
    d, ld = fixture_dir("v2_tiny"), fixture_dir("v2_tiny_lora")
    config, params = load_model(d / "model.pth")
    params_ckpt = tmp_path / "params.ckpt"
    assert from_torch.main([str(d / "model.pth"), "-o", str(params_ckpt)]) == 0
    a1 = random_adapter(params, 5, alpha=4.0, targets="all-linear", rank=2)
    save_adapter(a1, tmp_path / "a1.ckpt")
    out = tmp_path / "merged" / "m.pth"
    assert to_torch.main([str(params_ckpt), "-o", str(out), "--merge", str(tmp_path / "a1.ckpt"),
                          "--merge", str(ld / "lora.pth"), "--weights", "0.7,0.3"]) == 0
    assert "merged" in capsys.readouterr().out
    want = lora.merge(lora.merge(params, a1, 0.7), load_adapter(ld / "lora.pth"), 0.3)
    cfg2, got = load_model(out)
    assert cfg2 == config
    chex.assert_trees_all_close(got, want, atol=0, rtol=0)
    sd = torch.load(out, weights_only=True)
    assert (sd["lm_head.weight"].untyped_storage().data_ptr()
            == sd["model.embed_tokens.weight"].untyped_storage().data_ptr())
    assert to_torch.main([str(params_ckpt), "-o", str(tmp_path / "m.safetensors"), "--dtype", "float16"]) == 0
    _, half = load_model(tmp_path / "m.safetensors", dtype=None)
    leaves_equal(half, jax.tree.map(lambda x: np.asarray(x).astype(np.float16), params))
    assert to_torch.main([str(params_ckpt), "-o", str(tmp_path / "x.pth"), "--merge",
                          str(ld / "lora.pth"), "--weights", "1,2"]) == 1
    assert "--weights has 2 values for 1 --merge" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.slow
def test_cli_subprocess_and_help(tmp_path):
    ld = fixture_dir("v3_tiny_lora")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "convert.from_torch", str(ld / "lora.pth"), "-o",
                        str(tmp_path / "a.ckpt")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "rank:    4" in r.stdout
    r = subprocess.run([sys.executable, "-m", "convert.to_torch", "--help"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "--merge" in r.stdout and "--format" in r.stdout


def test_without_torch_pth_says_which_extra_and_safetensors_still_works(monkeypatch):
    d = fixture_dir("v3_tiny")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match=r"reading \.pth needs the torch extra: pip install 'minimind-jax\[torch\]'"):
        load_model(d / "model.pth")
    config, params = load_model(d / "model.safetensors")
    assert config.family == "minimind3"
