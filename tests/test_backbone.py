"""DinoVisionModel: outputs, presets, masking, input validation, attention backends, checkpointing, compile,
save/load and position-embedding resizing. Tiny configs, CPU fp32."""

import pytest
import torch
from helpers import randomized
from transformers import AutoModel

import modeling  # noqa: F401  (registers the Auto classes)
from modeling.vision_transformer import DinoVisionConfig, DinoVisionModel


def tiny_config(**kw) -> DinoVisionConfig:
    values = dict(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    values.update(kw)
    return DinoVisionConfig(**values)




def images(h: int, w: int, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("registers", [0, 4])
def test_output_fields_and_shapes(registers):
    model = randomized(tiny_config(num_register_tokens=registers))
    with torch.no_grad():
        out = model(images(56, 84), output_hidden_states=True)
    n_tokens = 1 + registers + 4 * 6
    assert out.last_hidden_state.shape == (2, n_tokens, 32)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    assert len(out.hidden_states) == 1 + 2 and out.hidden_states[0].shape == (2, n_tokens, 32)
    # last_hidden_state is the final norm of the last block's output
    assert torch.allclose(out.last_hidden_state, model.norm(out.hidden_states[-1]))
    with torch.no_grad():
        as_tuple = model(images(56, 84), return_dict=False)
    assert torch.equal(as_tuple[0], out.last_hidden_state)


def test_presets_official_sizes():
    expected = {  # hidden, depth, heads, ffn (official training recipe), FFN hidden width
        "vits14": (384, 12, 6, "mlp", 1536),
        "vitb14": (768, 12, 12, "mlp", 3072),
        "vitl14": (1024, 24, 16, "swiglu", 2736),
        "vitg14": (1536, 40, 24, "swiglu", 4096),
    }
    for name, (hidden, depth, heads, ffn, ffn_hidden) in expected.items():
        cfg = DinoVisionConfig.from_preset(name)
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.ffn) == (hidden, depth, heads, ffn)
        assert (cfg.patch_size, cfg.image_size, cfg.num_register_tokens) == (14, 224, 0)
        assert cfg.hidden_size // cfg.num_attention_heads == 64
        assert (cfg.interpolate_offset, cfg.interpolate_antialias) == (0.1, False)
        if ffn == "swiglu":
            assert ffn_hidden == (int(4 * hidden * 2 / 3) + 7) // 8 * 8
        assert cfg.ffn_hidden_size == ffn_hidden
        reg = DinoVisionConfig.from_preset(name, image_size=518, num_register_tokens=4)
        assert (reg.image_size, reg.num_register_tokens) == (518, 4)
        assert (reg.interpolate_offset, reg.interpolate_antialias) == (0.0, True)
    # ViT-g on the meta device: shapes and size without allocating 1.1B parameters on CPU
    with torch.device("meta"):
        giant = DinoVisionModel(DinoVisionConfig.from_preset("vitg14", image_size=518))
    assert giant.blocks[0].mlp.w12.weight.shape == (2 * 4096, 1536)
    assert giant.embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 1536)
    assert 1.1e9 < sum(p.numel() for p in giant.parameters()) < 1.2e9
    with pytest.raises(ValueError, match="vits14"):
        DinoVisionConfig.from_preset("vit_tiny")


def test_masks_replace_patch_embeddings():
    model = randomized(tiny_config())
    x = images(56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5, 7]] = True
    with torch.no_grad():
        emb = model.embeddings(x, masks)
        pos = model.embeddings.position_embeddings[0, 1:]
        expected = model.embeddings.mask_token[0] + pos[[1, 5, 7]]
        assert torch.allclose(emb[0, 1 + torch.tensor([1, 5, 7])], expected)
        # unmasked rows are untouched
        assert torch.equal(emb[1], model.embeddings(x)[1])
        # every patch masked: the output no longer depends on the image content
        all_masked = torch.ones(2, 16, dtype=torch.bool)
        a = model(x, masks=all_masked).last_hidden_state
        b = model(images(56, 56, seed=7), masks=all_masked).last_hidden_state
        assert torch.allclose(a, b, atol=1e-6)
        assert not torch.allclose(model(x).last_hidden_state, a, atol=1e-3)


def test_bad_inputs_raise_clear_errors():
    model = randomized(tiny_config())
    with pytest.raises(ValueError, match="multiples of the patch size 14"):
        model(images(56, 50))
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.randn(1, 4, 56, 56))
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
        model(torch.randn(3, 56, 56))
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        model(images(56, 56), masks=torch.zeros(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        model(images(56, 56), masks=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="ffn"):
        tiny_config(ffn="geglu")
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.resize_position_embeddings(100)


@pytest.mark.parametrize("ffn,registers", [("mlp", 0), ("swiglu", 4)])
def test_sdpa_equals_eager(ffn, registers):
    sdpa = randomized(tiny_config(ffn=ffn, num_register_tokens=registers))
    eager = DinoVisionModel(tiny_config(ffn=ffn, num_register_tokens=registers, attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    with torch.no_grad():
        x = images(42, 70)
        assert (sdpa(x).last_hidden_state - eager(x).last_hidden_state).abs().max() <= 1e-5


def test_gradient_checkpointing_same_grads():
    x = images(56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, ::3] = True  # so the mask token gets a gradient too
    grads = []
    for checkpointing in (False, True):
        model = randomized(tiny_config(ffn="swiglu", num_register_tokens=2)).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        calls = []
        model.blocks[0].mlp.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        model(x, masks=masks).last_hidden_state.pow(2).mean().backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed during backward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_torch_compile():
    model = randomized(tiny_config())
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        for h, w in [(56, 56), (42, 70)]:
            x = images(h, w)
            assert torch.allclose(compiled(x).last_hidden_state, model(x).last_hidden_state, atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    model = randomized(tiny_config(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    x = images(42, 70)
    for loaded in (DinoVisionModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert type(loaded) is DinoVisionModel
        assert loaded.config.num_register_tokens == 4 and loaded.config.interpolate_antialias is True
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x).last_hidden_state, model(x).last_hidden_state)


@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, True)])
def test_resize_position_embeddings_keeps_outputs(offset, antialias, tmp_path):
    model = randomized(tiny_config(interpolate_offset=offset, interpolate_antialias=antialias))
    x = images(112, 112)
    with torch.no_grad():
        before = model(x).last_hidden_state
        model.resize_position_embeddings(112)
        after = model(x).last_hidden_state
    assert model.config.image_size == 112
    assert model.embeddings.position_embeddings.shape == (1, 1 + 8 * 8, 32)
    assert torch.equal(before, after)
    model.save_pretrained(tmp_path)
    reloaded = DinoVisionModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x).last_hidden_state, before)
