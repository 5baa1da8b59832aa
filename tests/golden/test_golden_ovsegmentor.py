"""OVSegmentor equals the official release (Jazzcharles/OVSegmentor): fixtures made by make_golden.py --method ovsegmentor.

A training step rebuilds the release's state dict from the fixture's seed and recipe, converts it with OUR converter
(``--format ovsegmentor``), loads it strictly, runs OUR ``training_losses`` on the same batch with the paper
recipe's options and compares every loss, every gradient and the projectors' BatchNorm running statistics
(relative error <= 1e-5). What the official side ran: official_ovsegmentor.py.
"""

from __future__ import annotations

import types

import pytest
import torch

from ovseg_lab.convert.ovsegmentor import convert_ovsegmentor_state_dict, rename_group_vit_key
from ovseg_lab.data.entities import OfficialEntityParser
from ovseg_lab.models.ovsegmentor import GroupViTEncoder, OVSegmentor
from ovseg_lab.models.text_encoders import BertTextEncoder
from tests.golden.harness import (
    TOLERANCE,
    convert_and_evaluate,
    digest_error,
    load_fixture,
    perturbed_state,
    relative_error,
)
from tests.golden.official_ovsegmentor import TOKENIZER_DIR, loss_inputs

# the release's BatchNorm updates per training step (stage 2): image projector 4, text projector 8, bridge 1
RELEASE_UPDATES = {"img_projector": 4, "text_projector": 8, "bridge_projector": 1}


def our_net(fixture: dict, **options) -> OVSegmentor:
    cfg = fixture["config"]
    encoder = GroupViTEncoder(
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        embed_dim=cfg["embed_dim"],
        depths=cfg["depths"],
        num_heads=cfg["num_heads"],
        num_group_tokens=cfg["num_group_tokens"],
        num_output_groups=cfg["num_output_groups"],
        drop_path_rate=0.0,
        patch_norm=False,
    )
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)))  # the release's BERT was built at this size
    text = BertTextEncoder(
        pretrained=str(TOKENIZER_DIR),
        pretrained_weights=False,
        config={**cfg["bert"], "vocab_size": vocab_size},
        max_length=77,
        padding=options.pop("padding", "max_length"),
    )
    paper = dict(
        group_ratio_mode="detach_least",
        dice_reduction="official",
        decoder_padding_mask=False,
        projector_statistics="official",
        entity_prompts="official",
    )
    net = OVSegmentor(
        encoder,
        text,
        embed_dim=cfg["output_dim"],
        proj_hidden=4096,
        objective="all_entities",
        cross_image_weight=0.1,
        group_ratio=cfg["group_ratio"],
        mask_size=224,
        answer_templates=[cfg["template"]],
        decoder_heads=8,
        momentum_mode="eval",
        **{**paper, **options},
    )
    official = perturbed_state(fixture["state"], fixture["seed"])
    state = {k.removeprefix("net."): v for k, v in convert_ovsegmentor_state_dict(official).items()}
    for key, value in official.items():  # the converter drops the momentum copy (evaluation never reads it)
        if key.startswith("img_encoder_momentum."):
            state["momentum_encoder." + rename_group_vit_key(key.removeprefix("img_encoder_momentum."))] = value
    net.load_state_dict(state, strict=True)
    return net.double()  # as the generator ran the release (official_ovsegmentor.py: float64 training step)


def caption_batch(fixture: dict, image_seed: int) -> dict:
    """The fixture's captions parsed by the official parser (questions, entities), the release's pairs, the images
    of ``loss_inputs(image_seed)``, float64."""
    parser = OfficialEntityParser.load()
    captions = fixture["inputs"]["captions"]
    parsed = [parser.parse(c) for c in captions]
    inputs = loss_inputs(image_seed)
    return {
        "image": inputs["image"].double(),
        "pair_image": inputs["pair_image"].double(),
        "caption": captions,
        "question": [q for q, _ in parsed],
        "mentions": [[m.to_list() for m in ms] for _, ms in parsed],
        "entities": [list(dict.fromkeys(m.entity for m in ms)) for _, ms in parsed],
        "pair_entity": fixture["inputs"]["pair_entities"],
        "has_pair": torch.ones(len(captions), dtype=torch.bool),
    }


def training_step(fixture: dict, net: OVSegmentor) -> dict[str, torch.Tensor]:
    """Our step on the fixture's batch: the official parser's questions and entities, the release's pairs."""
    batch = caption_batch(fixture, fixture["seed"])
    assert batch["question"] == fixture["inputs"]["questions"], "the official parser's questions differ"
    net.train()
    net.image_encoder.eval()  # the generator ran the release's encoders without Gumbel noise too
    losses = net.training_losses(batch)
    losses["loss"].backward()
    return losses


@pytest.mark.parametrize("name", ["ovsegmentor_step_ratio05", "ovsegmentor_step_ratio025"])
def test_training_step_equals_release(name):
    fixture = load_fixture(name)
    net = our_net(fixture)
    losses = training_step(fixture, net)
    official = fixture["outputs"]["losses"]
    for ours, theirs in (("contrastive", "matching"), ("entity", "entity"), ("cross_image", "mask"), ("loss", "loss")):
        error = relative_error(losses[ours].detach(), torch.tensor(official[theirs]))
        assert error <= TOLERANCE, f"{name}: {ours} {losses[ours].item():.6f} vs release {official[theirs]:.6f}"
    # every gradient, mapped to our names by the converter (1x1 convs squeezed like the weights)
    grads = {k: v for k, v in fixture["outputs"]["grads"].items()}
    ours = {f"net.{k}": p.grad for k, p in net.named_parameters() if p.grad is not None}
    mapped = {}
    for key, expected in grads.items():
        target = convert_ovsegmentor_state_dict({key: torch.zeros(expected["shape"])})
        assert len(target) == 1, f"{key} has a gradient in the release but no counterpart here"
        mapped[next(iter(target))] = (key, expected)
    assert set(mapped) == set(ours), f"parameters with gradients differ: {sorted(set(mapped) ^ set(ours))[:6]}"
    for our_key, (key, expected) in mapped.items():
        grad = ours[our_key]
        if len(expected["shape"]) == 3 and grad.dim() == 2:
            grad = grad[..., None]
        # floor: gradients that are zero in exact arithmetic (the token-mixing MLP's output bias, which the
        # following LayerNorm cancels; 1e-10 here, next to gradients of norm 1-100) are float64 rounding
        error = digest_error(grad, expected, fixture["seed"], floor=1e-4)
        assert error <= TOLERANCE, f"{name}: gradient of {key} relative error {error:.2e}"
    # BatchNorm running statistics after the step (the release updates them 4 / 8 / 1 times)
    state = {
        k.removeprefix("net."): v for k, v in convert_ovsegmentor_state_dict(fixture["outputs"]["batchnorm"]).items()
    }
    own = net.state_dict()
    for key, expected in state.items():
        if key.endswith("num_batches_tracked"):
            head = {"image_head": "img_projector", "text_head": "text_projector", "answer_head": "bridge_projector"}[
                key.split(".")[0]
            ]
            assert int(own[key]) == int(expected), f"{key}: {int(own[key])} updates vs release {int(expected)}"
            assert (
                int(own[key])
                - int(
                    perturbed_state(fixture["state"], fixture["seed"])[
                        f"{head}.linear_hidden.1.num_batches_tracked"
                    ].long()
                )
                == RELEASE_UPDATES[head]
            )
            continue
        error = relative_error(own[key].float(), expected)
        assert error <= TOLERANCE, f"{name}: {key} relative error {error:.2e}"


@pytest.mark.slow
def test_our_fixes_are_what_differs_from_the_release():
    """Each of our options moves the step away from the release (so the golden test above can fail)."""
    fixture = load_fixture("ovsegmentor_step_ratio025")
    official = fixture["outputs"]["losses"]
    masked = training_step(fixture, our_net(fixture, decoder_padding_mask=True))
    assert relative_error(masked["entity"].detach(), torch.tensor(official["entity"])) > 1e-3
    per_mask = training_step(fixture, our_net(fixture, dice_reduction="per_mask"))
    assert relative_error(per_mask["cross_image"].detach(), torch.tensor(official["mask"])) > 1e-3
    # 0.25: the release trains 3 of 4 groups (detaches the least related one), ours would train 1
    most = our_net(fixture, group_ratio_mode="train_most")
    training_step(fixture, most)
    release = our_net(fixture)
    training_step(fixture, release)
    online_q = "image_encoder.stages.0.grouping.assign.q_proj.weight"
    assert (
        relative_error(dict(most.named_parameters())[online_q].grad, dict(release.named_parameters())[online_q].grad)
        > 1e-3
    )
    stats = our_net(fixture, projector_statistics="ours")
    training_step(fixture, stats)
    assert int(stats.image_head.bn.num_batches_tracked) - int(release.image_head.bn.num_batches_tracked) == -2


def test_parser_questions_entities_and_prompt_strings_equal_release():
    fixture = load_fixture("ovsegmentor_parser")
    parser = OfficialEntityParser.load()
    assert len(fixture["rows"]) >= 30
    from ovseg_lab.clip.prompts import resolve_templates

    assert list(resolve_templates("imagenet80")) == fixture["templates"], (
        "answer templates differ from the release's 80"
    )
    for row in fixture["rows"]:
        question, mentions = parser.parse(row["caption"])
        assert question == row["question"], row["caption"]
        entities = list(dict.fromkeys(m.entity for m in mentions))
        assert sorted(entities) == row["entities"], row["caption"]
        owner = types.SimpleNamespace(answer_templates=[row["template"]], entity_prompts="official")
        answer = OVSegmentor._answer(owner, entities)
        prefix = row["template"].split("{}")[0]
        # the release joins a Python set (hash order): same prefix, same entities, ours in order of mention
        assert (
            answer.startswith(prefix)
            and sorted(answer[len(prefix) :].split(" and ") if entities else []) == row["entities"]
        )
        if len(entities) <= 1:
            assert answer == row["answer"]
        owner = types.SimpleNamespace(entity_prompts="official")
        for entity in entities:
            assert OVSegmentor.entity_prompt(owner, entity) == fixture["cross_entity_prefix"] + entity


def test_paper_recipe_sends_the_release_class_strings():
    from ovseg_lab.vocab import load_vocabulary, with_release_strings

    voc = with_release_strings(load_vocabulary("voc21"), "ovsegmentor").classes
    context = with_release_strings(load_vocabulary("pc60"), "ovsegmentor").classes
    assert {"table", "plant", "monitor", "aeroplane"} <= set(voc) and "diningtable" not in voc
    assert {"airplane", "table", "plant", "monitor"} <= set(context)


@pytest.mark.slow
def test_release_checkpoint_converts_and_evaluates(tmp_path, toy_data_dir):
    """A release-layout checkpoint ({"model": state_dict}, perturbed random weights, stage 2 with its momentum
    copy) -> scripts/convert_checkpoint.py --format ovsegmentor -> eval.py on one toy image."""
    fixture = load_fixture("ovsegmentor_step_ratio05")
    checkpoint = {"model": perturbed_state(fixture["state"], fixture["seed"]), "epoch": 9}
    size = fixture["config"]["image_size"]
    convert_and_evaluate(
        "ovsegmentor",
        checkpoint,
        tmp_path,
        toy_data_dir,
        ["model=ovsegmentor", "model.net.embed_dim=16"],
        eval_overrides=(
            f"model.inference.slide_size={size}",
            f"model.inference.crop={size}",
            f"model.inference.stride={size // 2}",
        ),
        convert_overrides=(f"model.net.text_encoder.pretrained={TOKENIZER_DIR}",),
    )
