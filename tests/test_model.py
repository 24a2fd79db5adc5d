"""SparseCut model semantics on tiny random backbones of every supported family."""

import pytest
import torch
from conftest import image_question, random_image

from sparsecut import SparseCutConfig, SparseCutForConditionalGeneration
from sparsecut.testing import DECODERS, ENCODERS, tiny_model, tiny_text_config, tiny_vision_config

FAMILIES = [(decoder, "siglip") for decoder in DECODERS] + [
    ("llama", encoder) for encoder in ENCODERS if encoder != "siglip"
]


def chat_inputs(processor, question="What is there?", image_seed=1):
    return processor.apply_chat_template(
        image_question(random_image(image_seed), question), add_generation_prompt=True, tokenize=True, return_dict=True
    )


def answer_labels(input_ids: torch.Tensor, n_answer: int = 4) -> torch.Tensor:
    labels = torch.full_like(input_ids, -100)
    labels[:, -n_answer:] = input_ids[:, -n_answer:]
    return labels


@pytest.mark.parametrize("decoder,encoder", FAMILIES)
def test_forward_loss_backward_and_cached_generation(decoder, encoder):
    model, processor = tiny_model(decoder=decoder, encoder=encoder)
    inputs = chat_inputs(processor)
    model.train()
    out = model(**inputs, labels=answer_labels(inputs["input_ids"]), logits_to_keep=1)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # Everything on the path from the image to the loss receives gradient, the gates included.
    for name in ("fusion.projector.linear_1.weight", "shortcuts.gate", "vision_tower"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name) and p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
    model.eval()
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_loss_at_label_positions_equals_full_logits_loss():
    model, processor = tiny_model()
    inputs = chat_inputs(processor)
    labels = answer_labels(inputs["input_ids"], 7)
    fast = model(**inputs, labels=labels, logits_to_keep=1)
    full = model(**inputs, labels=labels)
    assert fast.logits.shape[1] == 1 and full.logits.shape[1] == inputs["input_ids"].shape[1]
    torch.testing.assert_close(fast.loss, full.loss)


def test_zero_scales_equal_the_model_without_shortcuts():
    model, processor = tiny_model(schedule="uniform:3")
    inputs = chat_inputs(processor)
    with torch.no_grad():
        on = model(**inputs).logits
        off = model(**inputs, shortcut_scales=[0.0] * 3).logits
        # the same weights in a model whose config has no shortcuts at all
        config = SparseCutConfig.from_dict(
            {**model.config.to_dict(), "schedule": "none", "shortcut_vision_layers": None, "shortcut_llm_layers": None}
        )
        bare = SparseCutForConditionalGeneration(config).eval()
        weights = {k: v for k, v in model.state_dict().items() if k != "shortcuts.gate"}
        bare.load_state_dict({**weights, "shortcuts.gate": bare.shortcuts.gate})  # strict: nothing else differs
        assert not torch.allclose(on, off)
        torch.testing.assert_close(off, bare(**inputs).logits)
        # detaching the hooks is the same as switching every shortcut off
        model.shortcuts.detach()
        torch.testing.assert_close(off, model(**inputs).logits)


def test_one_shortcut_switched_off_changes_only_its_contribution():
    model, processor = tiny_model(schedule="uniform:3")
    inputs = chat_inputs(processor)
    with torch.no_grad():
        stats = model(**inputs, shortcut_scales=[1.0, 0.0, 1.0], output_shortcut_stats=True).shortcut_stats
    assert (stats.ratios[1] == 0).all()
    assert (stats.ratios[0] > 0).all() and (stats.ratios[2] > 0).all()


def test_injection_touches_image_positions_only():
    model, processor = tiny_model(shortcut_vision_layers=[0], shortcut_llm_layers=[2])
    inputs = chat_inputs(processor)
    image_mask = inputs["input_ids"][0] == model.config.image_token_id
    seen = []
    # Registered after the shortcut hook, so it sees layer 2's input after the injection.
    handle = model.decoder_layers[2].register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
        model(**inputs, shortcut_scales=[0.0])
    handle.remove()
    with_shortcut, without = seen
    torch.testing.assert_close(with_shortcut[0, ~image_mask], without[0, ~image_mask], rtol=0, atol=0)
    assert (with_shortcut[0, image_mask] - without[0, image_mask]).abs().sum(-1).min() > 0


def test_decode_steps_add_nothing():
    model, processor = tiny_model()
    inputs = chat_inputs(processor)
    calls = []
    original = model.shortcuts.prepare

    def spy(image_mask, features, *rest):
        calls.append(features is not None and bool(image_mask.any()))
        return original(image_mask, features, *rest)

    model.shortcuts.prepare = spy
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert calls[0] is True and not any(calls[1:]) and len(calls) == 4


def test_padding_several_images_and_text_only_samples_match_single_runs():
    model, processor = tiny_model()
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": random_image(1)}, {"type": "text", "text": "A?"}]}],
        [{"role": "user", "content": "Only text here, a longer question."}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": random_image(2)},
                    {"type": "text", "text": "and"},
                    {"type": "image", "image": random_image(3)},
                    {"type": "text", "text": "B?"},
                ],
            }
        ],
    ]
    singles = []
    with torch.no_grad():
        for conversation in conversations:
            inputs = processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=True
            )
            singles.append(model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, -5:].tolist())
        for side in ("left", "right"):
            batch = processor.apply_chat_template(
                conversations, add_generation_prompt=True, tokenize=True, return_dict=True, padding_side=side
            )
            assert batch["pixel_values"].shape[0] == 3
            logits = model(**batch).logits
            for row, conversation in enumerate(conversations):
                single = processor.apply_chat_template(
                    conversation, add_generation_prompt=True, tokenize=True, return_dict=True
                )
                mask = batch["attention_mask"][row].bool()
                torch.testing.assert_close(logits[row, mask], model(**single).logits[0], atol=1e-4, rtol=1e-4)
        batch = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        generated = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, -5:].tolist()
    assert generated == singles


def test_image_token_count_mismatch_is_a_clear_error():
    model, processor = tiny_model()
    inputs = chat_inputs(processor)
    ids = inputs["input_ids"][0]
    first_image = int((ids == model.config.image_token_id).nonzero()[0])
    one_token_short = torch.cat([ids[:first_image], ids[first_image + 1 :]])[None]
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=one_token_short, pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:, :2]})


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(shortcut_vision_layers=[0, 1], shortcut_llm_layers=[1]), "equal lengths"),
        (dict(shortcut_vision_layers=[3], shortcut_llm_layers=[1]), "vision encoder has 2 layers"),
        (dict(shortcut_vision_layers=[-4], shortcut_llm_layers=[1]), "vision encoder has 2 layers"),
        (dict(shortcut_vision_layers=[0], shortcut_llm_layers=[4]), "LLM has 4 layers"),
        (dict(shortcut_vision_layers=[0], shortcut_llm_layers=[-5]), "LLM has 4 layers"),
        (dict(schedule="uniform:9"), "LLM has 4 layers"),
        (dict(schedule="zigzag:2"), "Unknown schedule"),
        (dict(feature_layer=5), "vision encoder has 2 layers"),
        (dict(fusion="sum"), "fusion must be one of"),
        (dict(fusion="cross_attention", append_high_res_tokens=True), "needs fusion='none'"),
        (dict(image_token_scale=0), "image_token_scale must be"),
        (dict(image_token_scale="auto"), "image_token_scale must be"),
    ],
)
def test_bad_configs_are_rejected_with_the_depths(overrides, message):
    with pytest.raises(ValueError, match=message):
        SparseCutConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(), **overrides)


def test_schedules():
    config = SparseCutConfig(
        vision_config=tiny_vision_config(num_hidden_layers=24), text_config=tiny_text_config(num_hidden_layers=40)
    )
    assert config.shortcut_vision_layers == [0, 3, 6, 9, 12, 15, 18, 21]  # the reference code's lists
    assert config.shortcut_llm_layers == [4, 9, 14, 19, 24, 29, 34, 39]
    reversed_config = SparseCutConfig(
        vision_config=config.vision_config, text_config=config.text_config, schedule="reversed:4"
    )
    assert reversed_config.shortcut_vision_layers == [18, 12, 6, 0]
    explicit = SparseCutConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(),
        shortcut_vision_layers=[-1, 0],
        shortcut_llm_layers=[-1, 1],
    )
    assert explicit.fused_vision_layers == [0, 1, 2]  # feature layer -2 -> 1, -1 -> 2


def test_shortcut_stats_and_fusion_maps():
    model, processor = tiny_model(schedule="uniform:3")
    inputs = chat_inputs(processor)
    with torch.no_grad():
        stats = model(**inputs, output_shortcut_stats=True).shortcut_stats
    tokens = model.config.num_image_tokens
    assert stats.ratios.shape == (3, 1, tokens) and (stats.ratios > 0).all() and torch.isfinite(stats.ratios).all()
    grid_tokens = model.config.high_res_grid**2 * tokens
    assert stats.fusion_attention.shape == (len(stats.fused_layers), 1, tokens, grid_tokens)
    torch.testing.assert_close(stats.fusion_attention.sum(-1), torch.ones(len(stats.fused_layers), 1, tokens))
    # the recorder collects the same statistics during generate, from the prefill only
    with model.record_stats() as recorded, torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert len(recorded.stats) == 1
    torch.testing.assert_close(recorded.last.ratios, stats.ratios)


def test_concat_mlp_neighbours_and_contributions():
    model, processor = tiny_model(fusion="concat_mlp")
    fusion = model.fusion
    side, grid = fusion.side, fusion.grid
    # Label every high-res token by its (row, col) in the whole high-res grid and check each low-res patch
    # gets exactly the grid x grid block covering its area.
    rows = torch.arange(grid * side).view(-1, 1).expand(grid * side, grid * side)
    cols = rows.T
    labels = torch.stack([rows, cols], -1).float()  # (H, W, 2)
    crops = labels.view(grid, side, grid, side, 2).permute(0, 2, 1, 3, 4).reshape(1, grid * grid, side * side, 2)
    neighbours = fusion.neighbours(crops)  # (1, P, G, 2)
    for i in range(side):
        for j in range(side):
            got = neighbours[0, i * side + j].tolist()
            want = [[grid * i + a, grid * j + b] for a in range(grid) for b in range(grid)]
            assert got == want
    inputs = chat_inputs(processor)
    with torch.no_grad():
        stats = model(**inputs, output_shortcut_stats=True).shortcut_stats
    assert stats.fusion_contribution.shape[-1] == 1 + grid * grid
    torch.testing.assert_close(stats.fusion_contribution.sum(-1), torch.ones(stats.fusion_contribution.shape[:-1]))


@pytest.mark.parametrize(
    "overrides,tokens_factor",
    [
        (dict(fusion="none", high_res_grid=1, schedule="none"), 1),  # LLaVA-1.5 style
        (dict(fusion="none", append_high_res_tokens=True, schedule="none"), 5),  # high-res tokens appended
        (dict(fusion="cross_attention", schedule="none"), 1),  # fusion without shortcuts
        (dict(fusion="none", high_res_grid=1), 1),  # shortcuts without high-res
    ],
)
def test_baselines_are_configs_of_the_same_class(overrides, tokens_factor):
    model, processor = tiny_model(**overrides)
    assert model.config.num_image_tokens == tokens_factor * model.config.patches_per_side**2
    inputs = chat_inputs(processor)
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == model.config.num_image_tokens
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model, processor = tiny_model()
        inputs = chat_inputs(processor)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model(**inputs, labels=answer_labels(inputs["input_ids"]), logits_to_keep=1).loss.backward()
        grads.append(model.shortcuts.gate.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_stale_state_never_reaches_a_direct_llm_call():
    model, processor = tiny_model()
    inputs = chat_inputs(processor)
    ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, 5)
    with torch.no_grad():
        before = model.language_model(input_ids=ids).logits
        model(**inputs)
        after = model.language_model(input_ids=ids).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_image_token_scale_puts_image_tokens_at_the_embedding_scale(tmp_path):
    from sparsecut import load_model

    model, processor = tiny_model(image_token_scale="auto")
    embeddings = model.get_input_embeddings().weight.detach()
    scale = float(embeddings.pow(2).mean().sqrt())
    assert model.config.image_token_scale == pytest.approx(scale, rel=1e-4)
    pixel_values = chat_inputs(processor)["pixel_values"]
    norm, calls = model.fusion.projector.output_norm, []
    hook = norm.register_forward_hook(lambda module, args, out: calls.append((args[0], out)))
    features = model.get_image_features(pixel_values)
    hook.remove()
    for tokens in [features.inputs, *features.shortcuts]:  # (images, T, D): each image's tokens, per layer
        torch.testing.assert_close(tokens.mean(dim=1), torch.zeros_like(tokens.mean(dim=1)), rtol=0, atol=1e-5)
    for x, tokens in calls:  # (layer-image pairs, T, D): the norm's input and output
        rms = tokens.pow(2).mean(dim=(1, 2)).sqrt()
        # The scale, short only by the epsilon that keeps a constant image finite.
        centred = (x - x.mean(dim=1, keepdim=True)).pow(2).mean(dim=(1, 2))
        expected = scale * torch.sqrt(centred / (centred + norm.eps))
        torch.testing.assert_close(rms, expected, rtol=1e-3, atol=0)
        assert torch.all(expected > 0.9 * scale)
    for tokens in [features.inputs, *features.shortcuts]:
        assert tokens.norm(dim=-1).std() > 0  # one scale per image, not per token
    # The gain is learned: a changed gain survives saving, and the scale is not re-applied on load.
    with torch.no_grad():
        model.fusion.projector.output_norm.weight.mul_(3.0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path, device="cpu")
    torch.testing.assert_close(
        loaded.get_image_features(pixel_values).inputs, model.get_image_features(pixel_values).inputs
    )
    # Without it, the projector is LLaVA's (no norm), as old checkpoints expect.
    assert tiny_model()[0].fusion.projector.output_norm is None


def test_overlapping_crops_change_only_what_the_plain_crops_cut(tmp_path):
    from sparsecut import load_model

    plain, plain_processor = tiny_model(fusion="concat_mlp")
    model, processor = tiny_model(fusion="concat_mlp", high_res_overlap=True)
    assert processor.num_views == model.config.num_views == 10
    assert model.config.num_image_tokens == plain.config.num_image_tokens  # the LLM input does not grow
    inputs = chat_inputs(processor)
    assert inputs["pixel_values"].shape[1] == 10
    # What the fusion receives: the same low-res view, and high-res tokens that differ from the plain grid's only
    # in the band around the crop borders, which the overlap takes from the crops that straddle them.
    received = {}
    for name, m, p in (("plain", plain, plain_processor), ("overlap", model, processor)):
        hook = m.fusion.register_forward_hook(lambda module, args, output, name=name: received.update({name: args[0]}))
        with torch.no_grad():
            m.get_image_features(chat_inputs(p)["pixel_values"])
        hook.remove()
    side, grid = model.config.patches_per_side, model.config.high_res_grid

    def whole(tokens):  # (L, 1 + grid**2, P, d) -> low-res (L, P, d), high-res (L, G, G, d)
        high = tokens[:, 1:].unflatten(1, (grid, grid)).unflatten(3, (side, side)).permute(0, 1, 3, 2, 4, 5)
        return tokens[:, 0], high.reshape(tokens.shape[0], grid * side, grid * side, -1)

    (plain_low, plain_high), (low, high) = whole(received["plain"]), whole(received["overlap"])
    torch.testing.assert_close(low, plain_low, rtol=0, atol=0)
    band = torch.zeros(grid * side, dtype=torch.bool)
    # a band around the crop borders, wider than the patches the middle crop gives
    band[side - side // 4 - 1 : side + side // 4 + 1] = True
    outside = ~band[:, None] & ~band[None, :]
    torch.testing.assert_close(high[:, outside], plain_high[:, outside], rtol=0, atol=0)
    assert not torch.allclose(high[:, band[:, None] & band[None, :]], plain_high[:, band[:, None] & band[None, :]])
    # generation and saving work as for the plain grid
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_model(tmp_path, device="cpu")
    assert loaded.config.high_res_overlap and loaded_processor.num_views == 10
    with torch.no_grad():
        assert loaded.generate(**inputs, max_new_tokens=4, do_sample=False).tolist() == cached.tolist()
    with pytest.raises(ValueError, match="high_res_overlap=True"):
        model.get_image_features(chat_inputs(plain_processor)["pixel_values"])


def test_overlapping_crops_need_an_even_number_of_patches_per_side():
    with pytest.raises(ValueError, match="even number of patches per side"):
        SparseCutConfig(
            vision_config=tiny_vision_config(image_size=24), text_config=tiny_text_config(), high_res_overlap=True
        )


@pytest.mark.parametrize("fusion", ["concat_mlp", "cross_attention"])
def test_a_new_fusion_starts_with_small_normal_weights_and_zero_biases(fusion):
    model, _ = tiny_model(fusion=fusion)
    linears = [m for m in model.fusion.modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    for linear in linears:
        assert abs(float(linear.weight.detach().std()) - 0.02) < 0.006, linear  # not PyTorch's uniform default
        assert linear.bias is None or not linear.bias.any()
