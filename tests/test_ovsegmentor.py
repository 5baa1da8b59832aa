"""OVSegmentor / GroupViT: shapes, equivariance, zero-shot protocol, losses on hand-made cases, parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg_lab.layers.contrastive import info_nce, multi_label_info_nce
from ovseg_lab.layers.losses import soft_dice_loss
from ovseg_lab.models.ovsegmentor import GroupViTEncoder, OVSegmentor, mask_token_ids
from ovseg_lab.models.ovsegmentor_losses import cross_image_mask_loss, match_masks, select_related_groups
from ovseg_lab.models.text_encoders import BertTextEncoder, GroupViTTextEncoder
from ovseg_lab.vocab import Vocabulary

WORDS = ["red", "blue", "green", "circle", "square", "grass", "sky", "a", "photo", "of", "on", "and", "dog", "bus"]


def tiny_net(objective: str = "all_entities", **kwargs) -> OVSegmentor:
    torch.manual_seed(0)
    encoder = GroupViTEncoder(
        image_size=32,
        patch_size=8,
        embed_dim=32,
        depths=[1, 1],
        num_heads=2,
        num_group_tokens=[8, 0],
        num_output_groups=[4],
        drop_path_rate=0.0,
    )
    text = BertTextEncoder(
        pretrained=None,
        vocab_words=WORDS,
        max_length=24,
        config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    )
    return OVSegmentor(
        encoder,
        text,
        embed_dim=16,
        proj_hidden=32,
        objective=objective,
        decoder_heads=2,
        mask_size=32,
        answer_templates="photo",
        **kwargs,
    )


def caption_batch(b: int = 4) -> dict:
    captions = ["a red circle on a grass", "a blue square on a sky", "a dog on a bus", "a red circle and a dog"][:b]
    mentions = []
    for c in captions:
        found = []
        for phrase in ("red circle", "blue square", "grass", "sky", "dog", "bus"):
            start = c.find(phrase)
            if start >= 0:
                found.append([start, start + len(phrase), phrase])
        mentions.append(sorted(found))
    return {
        "image": torch.rand(b, 3, 32, 32),
        "caption": captions,
        "mentions": mentions,
        "entities": [[m[2] for m in ms] for ms in mentions],
        "noun_mentions": [[m for m in ms if m[2] in ("grass", "sky", "dog", "bus")] for ms in mentions],
    }


def test_group_vit_configurations_produce_the_paper_group_counts():
    images = torch.rand(2, 3, 64, 64)
    ovseg = GroupViTEncoder(
        image_size=64,
        patch_size=16,
        embed_dim=32,
        depths=[2, 2],
        num_heads=2,
        num_group_tokens=[64, 0],
        num_output_groups=[8],
    )
    groupvit = GroupViTEncoder(
        image_size=64,
        patch_size=16,
        embed_dim=32,
        depths=[2, 1, 1],
        num_heads=2,
        num_group_tokens=[64, 8, 0],
        num_output_groups=[64, 8],
    )
    for encoder, stages in ((ovseg, 1), (groupvit, 2)):
        out = encoder(images)
        assert out.tokens.shape == (2, 8, 32) and len(out.assignments) == stages and out.grid == (4, 4)
        maps = GroupViTEncoder.assignment_maps(out.assignments)
        assert maps.shape == (2, 8, 16) and torch.allclose(maps.sum(dim=1), torch.ones(2, 16), atol=1e-4)
    assert groupvit.stages[1].group_projector is not None  # GroupViT's second-stage tokens start from the first's
    # a larger test image: position embeddings are interpolated
    assert ovseg(torch.rand(1, 3, 96, 64)).grid == (6, 4)


def test_parameter_counts_match_vit_and_bert_base():
    """The group ViT-B/16 holds exactly timm's ViT-B/16 transformer (85.8 M without CLS / head); BERT-base is
    the 109.5 M-parameter model of the paper."""
    import timm
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        ours = GroupViTEncoder(
            image_size=224,
            patch_size=16,
            embed_dim=768,
            depths=[6, 6],
            num_heads=12,
            num_group_tokens=[64, 0],
            num_output_groups=[8],
            patch_norm=False,
        )
        reference = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        bert = BertModel(BertConfig())  # bert-base-uncased's configuration
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    vit_part = (
        count(ours.patch_embed) + ours.pos_embed.numel() + sum(count(s.blocks) for s in ours.stages) + count(ours.norm)
    )
    assert vit_part == count(reference) - reference.cls_token.numel() - 768  # timm's pos_embed has a CLS slot
    assert vit_part == 85_797_120
    grouping = count(ours.stages[0].grouping) + ours.stages[0].group_token.numel()
    # GroupViT's grouping block at width d: pre-assignment cross-attention block (4d^2 attention + 8d^2 MLP),
    # assignment attention (4d^2), channel MLP (8d^2), four LayerNorms, the 64 -> 8 token MLP (hidden d/2)
    # and the 64 group tokens
    d = 768
    assert grouping == 24 * d * d + 94 * d + (64 * 384 + 384 + 384 * 8 + 8) == 14_256_008
    assert count(bert) == 109_482_240


def test_zero_shot_output_and_class_permutation_equivariance():
    net = tiny_net().eval()
    images = torch.rand(2, 3, 40, 48)  # not a multiple of the patch: resized inside, scores at input size
    vocab = Vocabulary("toy", ("red circle", "blue square", "grass", "sky", "dog", "bus", "green circle"))
    with torch.no_grad():
        scores = net(images, vocab)
        perm = torch.randperm(len(vocab))
        permuted = net(images, Vocabulary("toy", tuple(vocab.classes[i] for i in perm)))
    assert scores.shape == (2, 7, 40, 48)
    assert torch.allclose(permuted, scores[:, perm], atol=1e-6)
    # top-k: at most k classes are non-zero per image; every pixel's scores come from one group
    assert ((scores.flatten(2).amax(dim=2) > 0).sum(dim=1) <= 5).all()
    assert scores.min() >= 0 and scores.max() <= 1


def test_background_threshold_and_topk_follow_groupvit_inference():
    net = tiny_net(background_thresholds={"voc": 0.95}, topk_classes=None).eval()
    images = torch.rand(1, 3, 32, 32)
    names = ("red circle", "blue square", "grass")
    with torch.no_grad():
        plain = net(images, Vocabulary("voc", names))
        with_bg = net(images, Vocabulary("voc", names + ("background",)))
        other = net(images, Vocabulary("other", names + ("background",)))  # no threshold: "background" is text
    assert with_bg.shape == (1, 4, 32, 32) and torch.equal(with_bg[:, :3], plain)
    # with three classes the best probability product is far below 0.95: the limit is the best group score,
    # so background covers every pixel except those of the most confident group
    limit = plain.max()
    assert torch.equal(with_bg[0, 3] == 1, plain[0].amax(dim=0) < limit)
    assert not torch.equal(other[:, 3], with_bg[:, 3])


@pytest.mark.parametrize("objective", ["all_entities", "single_entity", "all_nouns", "mlm", "mlm_nogroups", "none"])
def test_every_objective_trains(objective):
    net = tiny_net(objective).train()
    losses = net.training_losses(caption_batch())
    assert torch.isfinite(losses["loss"]) and losses["contrastive"] > 0
    losses["loss"].backward()
    grads = [p.grad for p in net.image_encoder.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    if objective in ("all_entities", "single_entity", "all_nouns", "mlm"):
        # the auxiliary objective reads the groups, so it alone sends gradients into the image encoder
        net.zero_grad()
        key = "mlm" if objective == "mlm" else "entity"
        net.training_losses(caption_batch())[key].backward()
        assert net.image_encoder.stages[0].group_token.grad.abs().sum() > 0


def test_multi_label_objective_with_the_groupvit_text_transformer():
    torch.manual_seed(0)
    encoder = GroupViTEncoder(
        image_size=32,
        patch_size=8,
        embed_dim=32,
        depths=[1, 1, 1],
        num_heads=2,
        num_group_tokens=[8, 4, 0],
        num_output_groups=[8, 4],
    )
    net = OVSegmentor(
        encoder,
        GroupViTTextEncoder(context_length=16, width=32, layers=1),
        embed_dim=16,
        proj_hidden=32,
        objective="multi_label",
        num_prompts=2,
    )
    losses = net.training_losses(caption_batch())
    assert torch.isfinite(losses["multi_label"])
    losses["loss"].backward()
    with pytest.raises(Exception, match="BERT"):
        OVSegmentor(encoder, GroupViTTextEncoder(context_length=16, width=32, layers=1), objective="all_entities")


def test_entity_masking_masks_whole_words_and_answers_name_them():
    net = tiny_net("all_entities")
    batch = caption_batch(3)
    spans, answers = net.masked_questions(batch)
    encoded = net.text_encoder.tokenize(batch["caption"], offsets=True)
    masked = mask_token_ids(encoded["input_ids"], encoded["offset_mapping"], spans, net.text_encoder.mask_token_id)
    tokens = [net.text_encoder.tokenizer.convert_ids_to_tokens(row) for row in masked]
    assert tokens[0][:7] == ["[CLS]", "a", "[MASK]", "[MASK]", "on", "a", "[MASK]"]
    assert tokens[2][:7] == ["[CLS]", "a", "[MASK]", "on", "a", "[MASK]", "[SEP]"]  # "bus" is masked
    assert answers[0] == "a photo of a red circle and grass"  # the release: template prefix + " and ".join
    assert (
        tiny_net("all_entities", entity_prompts="ours").masked_questions(batch)[1][0]
        == "a photo of a red circle and a grass."
    )
    single = tiny_net("single_entity")
    spans, answers = single.masked_questions(batch)
    assert all(len({batch["caption"][i][s:e] for s, e in sp}) == 1 for i, sp in enumerate(spans))
    nouns = tiny_net("all_nouns", entity_prompts="ours").masked_questions(batch)[1]
    assert nouns[1] == "a photo of a sky." and nouns[2] == "a photo of a dog and a bus."


def test_info_nce_equals_a_reference_computation():
    torch.manual_seed(0)
    image, text, scale = torch.randn(5, 8), torch.randn(5, 8), torch.tensor(10.0)
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    reference = 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.t(), torch.arange(5)))
    assert torch.allclose(info_nce(image, text, scale), reference)
    # multi-label: one prompt per image reduces to InfoNCE
    one = multi_label_info_nce(image, text[:, None], torch.ones(5, 1, dtype=torch.bool), scale)
    assert torch.allclose(one, reference, atol=1e-6)
    # padding prompts are ignored
    padded = multi_label_info_nce(
        image, torch.stack([text, torch.randn(5, 8)], 1), torch.tensor([[True, False]] * 5), scale
    )
    assert torch.allclose(padded, reference, atol=1e-6)


def test_dice_and_matcher_on_hand_made_masks():
    square = torch.zeros(8, 8)
    square[:4, :4] = 1
    stripe = torch.zeros(8, 8)
    stripe[:, 6:] = 1
    corner = torch.zeros(8, 8)
    corner[5:, :3] = 1
    target = torch.stack([square, stripe, corner]).flatten(1)
    assert soft_dice_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)
    # dice of the square against a half of it: 1 - (2*8 + 1) / (8 + 16 + 1)
    half = square.clone()
    half[2:] = 0
    assert soft_dice_loss(half.flatten()[None], square.flatten()[None]).item() == pytest.approx(1 - 17 / 25)
    # the matcher recovers a permutation of blurred masks
    predicted = target[[2, 0, 1]] * 0.8 + 0.1
    assert match_masks(predicted[None], target[None]).tolist() == [[2, 0, 1]]


def test_cross_image_loss_is_zero_when_the_prediction_is_a_permutation_of_the_target():
    grid = (4, 4)
    target = torch.full((1, 3, 16), -8.0)
    for g, cells in enumerate(([0, 1, 4, 5], [2, 3, 6, 7], list(range(8, 16)))):
        target[0, g, cells] = 8.0
    predicted = target[:, [1, 2, 0]].clone().requires_grad_(True)
    loss = cross_image_mask_loss(predicted, target, grid, None, 0.6)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)
    wrong = cross_image_mask_loss(-target, target, grid, None, 0.6, reduction="per_mask")
    assert wrong > 0.25  # complements of the masks overlap the targets only partly
    # the release's reduction: one Dice per image, summed over images / groups -> grows with the batch; ours does not
    two = (-target).expand(2, -1, -1), target.expand(2, -1, -1)
    official_one = cross_image_mask_loss(-target, target, grid, None, 0.6, reduction="official")
    assert cross_image_mask_loss(*two, grid, None, 0.6, reduction="official") == pytest.approx(2 * official_one.item())
    assert cross_image_mask_loss(*two, grid, None, 0.6, reduction="per_mask") == pytest.approx(wrong.item())
    # groups not selected receive no gradient
    selected = torch.tensor([[True, False, False]])
    noisy = (target + torch.randn_like(target)).requires_grad_(True)
    cross_image_mask_loss(noisy, target, grid, 8, 0.6, selected).backward()
    assert noisy.grad[0, 0].abs().sum() > 0 and noisy.grad[0, 1:].abs().sum() == 0


def test_related_groups_are_the_most_similar_to_the_entity():
    groups = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]]])
    entity = torch.tensor([[1.0, 0.1]])
    assert select_related_groups(groups, entity, 0.5).tolist() == [[True, False, True, False]]
    assert select_related_groups(groups, entity, 0.5, "train_most").tolist() == [[True, False, True, False]]
    # 0.25: the release detaches the 1 least related group (trains 3); ours trains the 1 most related
    assert select_related_groups(groups, entity, 0.25, "detach_least").tolist() == [[True, True, True, False]]
    assert select_related_groups(groups, entity, 0.25, "train_most").tolist() == [[True, False, False, False]]


def test_stage_two_cross_image_loss_and_momentum_update():
    net = tiny_net("all_entities", cross_image_weight=0.1, momentum=0.9).train()
    assert not any(p.requires_grad for p in net.momentum_encoder.parameters())
    batch = caption_batch()
    batch.update(
        pair_image=torch.rand(4, 3, 32, 32),
        pair_entity=["red circle", "sky", "dog", "dog"],
        has_pair=torch.tensor([True, True, False, True]),
    )
    losses = net.training_losses(batch)
    assert torch.isfinite(losses["cross_image"]) and losses["cross_image"] > 0
    losses["loss"].backward()
    before = [p.clone() for p in net.momentum_encoder.parameters()]
    with torch.no_grad():
        for p in net.image_encoder.parameters():
            p.add_(1.0)
    net.update_momentum()
    after = list(net.momentum_encoder.parameters())
    online = list(net.image_encoder.parameters())
    assert torch.allclose(after[0], 0.9 * before[0] + 0.1 * online[0], atol=1e-6)


def test_multi_label_can_be_added_to_entity_completion():
    net = tiny_net("all_entities", add_multi_label=True, num_prompts=2).train()
    losses = net.training_losses(caption_batch())
    assert set(losses) == {"contrastive", "entity", "multi_label", "loss"}
    assert torch.allclose(losses["loss"], losses["contrastive"] + losses["entity"] + losses["multi_label"])
    assert not hasattr(tiny_net("all_entities"), "multi_label_logit_scale")  # off by default (paper configs)


def test_bert_offline_error_says_which_files_to_place_where():
    from pathlib import Path

    from ovseg_lab.errors import SetupError

    files = Path(__file__).resolve().parent / "fixtures" / "bert_base_uncased"  # config + tokenizer, no weights
    with pytest.raises(
        SetupError, match=r"config\.json, vocab\.txt and tokenizer_config\.json.*model\.safetensors.*pretrained="
    ):
        BertTextEncoder(pretrained=str(files))
    tiny = BertTextEncoder(
        pretrained=str(files),
        pretrained_weights=False,
        config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 32},
    )
    assert tiny.width == 16 and tiny.mask_token_id == 103 and tiny.tokenize(["a dog"])["input_ids"].shape[1] == 77
