"""The generator's side for OVSegmentor: builds the OFFICIAL modules from an extracted Jazzcharles/OVSegmentor tree,
runs them, saves fixtures (see README.md, "Regenerating the OVSegmentor fixtures").

Stub-level adaptations (the official code runs unchanged otherwise):
- ``mmcv.utils.Registry`` is a dict keyed by class name; ``ipdb``, ``clip``, ``cv2`` are empty modules;
  ``diffdist``'s all-gather and ``torch.distributed``'s rank / world size are those of one process
  (``dist_collect`` returns its input); ``Tensor.cuda`` is the identity; ``nn.SyncBatchNorm.convert_sync_batchnorm``
  keeps plain BatchNorm (one process: the same statistics);
- the release's BERT (``AutoModel.from_pretrained('bert-base-uncased')``, models/transformer.py:124) is answered
  by a small random ``BertModel`` with ``output_hidden_states=True``; the tokenizer is the one of
  tests/fixtures/bert_base_uncased (bert-base-uncased's special-token ids, a small WordPiece vocabulary);
- nltk's ``WordNetLemmatizer`` (its WordNet data cannot be installed offline) is replaced by WordNet's own noun
  rules (morphy's substitutions and the noun.exc irregular plurals) over a lemma list of the entity words: the
  parser fixture tests everything the release does around the lemmatiser (strip, '.' removal, lower-casing,
  synonym lookup, question building), and the lemmatiser only where it decides entity membership;
- the package folders ``models`` and ``datasets`` are imported under private names (their ``__init__`` files
  import mmseg and the data loaders), and single functions of main_pretrain.py (``process_text``) run from its
  source (:func:`official_stubs.detectron2_function`);
- the image encoders run in eval mode inside the training forward (no Gumbel noise: hard arg-max assignment,
  the same straight-through gradients), BERT with dropout 0, so the training step is deterministic;
- the training step runs in float64 on both sides (weights drawn in float32 as everywhere, then cast): its
  projectors normalise a batch of 3 random-network features that differ little between samples, and in float32
  that BatchNorm turns rounding (1e-7) into 1e-4 differences that say nothing about equality.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import random
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.golden.harness import digest, perturbed_state, save_fixture, state_recipe
from tests.golden.official_stubs import detectron2_function

REPO = "Jazzcharles/OVSegmentor"
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "bert_base_uncased"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# the small model both sides build (the release: ViT-B/16 224, [6, 6] blocks, 64 -> 8 groups, BERT-base, 4096 / 256)
CONFIG = {
    "image_size": 56,
    "patch_size": 4,
    "embed_dim": 32,
    "depths": [1, 1],
    "num_heads": 8,
    "num_group_tokens": [8, 0],
    "num_output_groups": [4],
    "output_dim": 16,
    "bert": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 80,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.5,
    },
    "batch": 3,
    "template": "a photo of a {}.",
}
# captions of the loss batch: one unique entity each (the release joins a set of entities in hash order)
LOSS_CAPTIONS = [
    "A brown dog sitting on the grass next to another dog.",
    "Two cats playing with a toy in the kitchen",
    "people walking down a busy street at night",
]
PAIR_ENTITIES = ["dog", "cat", "people"]

# realistic captions for the parser and prompt strings (written for this test; the bugs each one exercises noted)
PARSER_CAPTIONS = [
    "A man riding a bus past two dogs.",  # bus -> "bu" (strip), dogs -> dog, trailing '.'
    "Sheep grazing in a green field near a farm house",  # capital S survives the strip
    "sheep grazing in a green field near a farm house",  # lower-case sheep -> "heep"
    "A glass of wine on a wooden table.",  # glass -> "gla"; "table." keeps its '.' until judge_noun
    "The dog's toy is under the sofa",  # possessive stripped; sofa -> "ofa"
    "Children playing with TVs and T-shirts in the living room",  # irregular plural, TV synonym after lower()
    "A woman holding an umbrella, walking her dog",  # "umbrella," keeps its comma: never an entity
    "Two women and three men standing next to a car",  # men / women -> man / woman -> people
    "A cat sleeping on a laptop keyboard",
    "Buses parked in front of a hotel.",  # Buses -> "Buse" (strip of the plural s first)
    "A pizza and a cake on the kitchen counter",
    "A student reading a book at a desk",  # desk -> table, student -> people
    "a girl on a bike with a red backpack",  # bike -> bicycle
    "Motorbikes and bicycles in the street",  # plurals after the strip
    "An airplane flying over the mountains",  # airplane -> aeroplane
    "A couch, a lamp and a clock in a small room",  # "couch," with comma
    "Spoons, forks and knives on a white plate",  # knives -> "knive"
    "A teddy bear sitting on a bed",
    "The bride and groom cutting their wedding cake.",
    "An elephant and a giraffe at the zoo",
    "A bowl of apples and oranges",  # apples -> apple, oranges -> orange
    "Mice in a box",  # noun.exc irregular plural
    "A boy's kite flying high in the sky",  # possessive
    "skis and a snowboard leaning against a wall",  # skis -> "ki", snowboard -> "nowboard"
    "A surfboard on the beach.",
    "A baby sleeping in a crib",
    "TV on a desk next to a plant",  # upper-case TV
    "A sink, a toilet and a mirror in a bathroom",  # "sink," and "toilet"
    "A zebra drinking water from a lake",
    "The princess and the prince in a horse-drawn carriage",
    "A handbag, a suitcase and a shirt on the bed",  # handbag, -> comma; suitcase -> "uitcase"
    "people's bikes parked outside the building",  # possessive plural, building -> house
    "A truck and a train crossing the bridge",
    "A refrigerator full of bottles and cups",  # bottles -> bottle, cups -> cup
    "Donuts, bananas and a sandwich on the table.",
    "A  cow  standing in the rain",  # double spaces: empty words
]

# the release's zero-shot class strings (segmentation/datasets/<file>.py CLASSES) for our packaged vocabularies
CLASS_STRING_FILES = {
    "voc21": "segmentation/datasets/pascal_voc.py",
    "pc60": "segmentation/datasets/pascal_context.py",
    "coco_object81": "segmentation/datasets/coco_object.py",
    "ade150": "segmentation/datasets/ade20k.py",
}


# ----------------------------------------------------------------------------------------------- stubs
class _Registry:
    def __init__(self, name: str = "") -> None:
        self.modules: dict[str, type] = {}

    def register_module(self, name=None, force=False, module=None):
        def register(cls):
            self.modules[cls.__name__] = cls
            return cls

        return register

    def build(self, cfg):
        cfg = dict(cfg)
        return self.modules[cfg.pop("type")](**cfg)


class _WordNetNounLemmatizer:
    """nltk's WordNetLemmatizer.lemmatize(word) for nouns: morphy's forms, the shortest one in the lemma list."""

    rules = (
        ("s", ""),
        ("ses", "s"),
        ("ves", "f"),
        ("xes", "x"),
        ("zes", "z"),
        ("ches", "ch"),
        ("shes", "sh"),
        ("men", "man"),
        ("ies", "y"),
    )
    exceptions = {"children": ["child"], "men": ["man"], "women": ["woman"], "mice": ["mouse"], "kine": ["cow"]}
    lemmas: set[str] = set()

    def lemmatize(self, word: str, pos: str = "n") -> str:
        forms = [word] + (
            self.exceptions[word]
            if word in self.exceptions
            else [word[: -len(old)] + new for old, new in self.rules if word.endswith(old)]
        )
        known = [f for f in forms if f in self.lemmas]
        return min(known, key=len) if known else word


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def install_stubs(root: Path) -> None:
    import torch.distributed as dist

    _module("mmcv", __path__=[])
    _module("mmcv.utils", Registry=_Registry)
    _module("ipdb", set_trace=lambda *a, **k: None)
    _module("clip", tokenize=None)
    _module("cv2")
    _module("diffdist", __path__=[])
    _module("diffdist.functional", all_gather=lambda out_list, x: [x])
    _module("nltk", __path__=[])
    _module("nltk.stem", WordNetLemmatizer=_WordNetNounLemmatizer)
    if "petrel_client" not in sys.modules:
        _module("petrel_client", __path__=[])
    dist.get_rank = lambda *a, **k: 0
    dist.get_world_size = lambda *a, **k: 1
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.SyncBatchNorm.convert_sync_batchnorm = staticmethod(lambda module, process_group=None: module)
    for alias, folder in (("ovsm_models", "models"), ("ovsm_datasets", "datasets")):
        if alias not in sys.modules:
            _module(alias, __path__=[str(root / folder)])


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def _official_modules(root: Path):
    install_stubs(root)
    group_vit = importlib.import_module("ovsm_models.group_vit")
    transformer = importlib.import_module("ovsm_models.transformer")
    contrastive = importlib.import_module("ovsm_models.multi_label_contrastive")
    return group_vit, transformer, contrastive


def _clip_dataset(root: Path):
    install_stubs(root)
    module = importlib.import_module("ovsm_datasets.clip_dataset")
    lemmas = set(module.TOP_UNIQUE_CLASSES) | {k.lower() for k in module.syn_dict} | set(module.syn_dict)
    _WordNetNounLemmatizer.lemmas = lemmas
    return module


def build_official(root: Path, group_ratio: float, seed: int) -> tuple[nn.Module, list[tuple]]:
    """The release's MultiLabelContrastive at the small CONFIG, stage 2 (entity + mask losses), perturbed weights."""
    from transformers import BertConfig, BertModel

    _, transformer, contrastive = _official_modules(root)
    tokenizer = _tokenizer()
    bert_config = BertConfig(vocab_size=len(tokenizer), output_hidden_states=True, **CONFIG["bert"])
    transformer.AutoModel = types.SimpleNamespace(from_pretrained=lambda *a, **k: BertModel(bert_config))
    c = CONFIG
    image = dict(
        type="GroupViT",
        img_size=c["image_size"],
        patch_size=c["patch_size"],
        embed_dim=c["embed_dim"],
        embed_factors=[1, 1],
        depths=c["depths"],
        num_heads=[c["num_heads"]] * 2,
        num_group_tokens=c["num_group_tokens"],
        num_output_groups=c["num_output_groups"],
        drop_rate=0.0,
        drop_path_rate=0.0,
        patch_norm=False,
        imgnet_pretrained=None,
        fixed=False,
    )
    text = dict(
        type="Bert",
        context_length=77,
        width=c["bert"]["hidden_size"],
        layers=c["bert"]["num_hidden_layers"],
        vocab_size=len(tokenizer),
        pretrained=True,
        fixed=False,
    )
    torch.manual_seed(seed)
    model = contrastive.MultiLabelContrastive(
        image,
        text,
        output_dim=c["output_dim"],
        proj_num_layers=2,
        multi_label=0,
        use_entityloss=True,
        use_maskloss=True,
        cross_threshold=0.6,
        group_ratio=group_ratio,
    )
    recipe = state_recipe(model.state_dict())
    model.load_state_dict(perturbed_state(recipe, seed))
    return model, recipe


def loss_inputs(seed: int) -> dict[str, torch.Tensor]:
    """[0, 1] images of the loss batch and their partners (regenerated on both sides)."""
    gen = torch.Generator().manual_seed(seed + 11)
    size, batch = CONFIG["image_size"], CONFIG["batch"]

    def pictures() -> torch.Tensor:  # a few flat regions per picture, so that pictures differ clearly
        coarse = torch.rand(batch, 3, 4, 4, generator=gen)
        flat = torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")
        return (flat + 0.05 * torch.randn(batch, 3, size, size, generator=gen)).clamp(0, 1)

    return {"image": pictures(), "pair_image": pictures()}


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def official_questions(root: Path, captions: list[str], template_index: int | None) -> list[tuple[str, str]]:
    """(raw_question, raw_answer) of ``build_question_and_answer_for_distilbert`` for each caption; the answer
    template is ``full_imagenet_templates[template_index]`` (None: the i-th caption takes template i % 80)."""
    module = _clip_dataset(root)
    dataset = module.ClipDataset.__new__(module.ClipDataset)
    dataset.mask_type = "class"
    out = []
    for index, caption in enumerate(captions):
        chosen = template_index if template_index is not None else index % len(module.full_imagenet_templates)
        module.random = types.SimpleNamespace(choice=lambda seq, i=chosen: seq[i])
        question, _, answer, _ = dataset.build_question_and_answer_for_distilbert(caption, None)
        out.append((question, answer))
    return out


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone().float()
        for k, v in model.state_dict().items()
        if k.split(".")[0] in ("img_projector", "text_projector", "bridge_projector")
        and k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
    }


def make_step_fixture(root: Path, commit: str, seed: int, group_ratio: float) -> dict[str, Any]:
    """One training step of the release (stage 2: matching + masked entity + cross-image mask losses)."""
    model, recipe = build_official(root, group_ratio, seed)
    model.double()
    module = _clip_dataset(root)
    template_index = module.full_imagenet_templates.index(CONFIG["template"])
    qa = official_questions(root, LOSS_CAPTIONS, template_index)
    process_text = detectron2_function(root, "main_pretrain.py", "process_text")
    process_text.__globals__["tokenizer"] = _tokenizer()
    inputs = loss_inputs(seed)
    model.train()
    model.img_encoder.eval()
    model.img_encoder_momentum.eval()
    losses = model.forward_train(
        image=_normalise(inputs["image"]).double(),
        text=process_text(LOSS_CAPTIONS),
        cross_image=_normalise(inputs["pair_image"]).double(),
        cross_entity=process_text(["A photo of " + e for e in PAIR_ENTITIES]),
        question=process_text([q for q, _ in qa]),
        answer=process_text([a for _, a in qa]),
        entity_masks=None,
        question_masks=None,
    )
    losses["loss"].backward()
    grads = {k: digest(p.grad, seed, whole=256, sample=128) for k, p in model.named_parameters() if p.grad is not None}
    return {
        "method": "ovsegmentor",
        "name": f"ovsegmentor_step_ratio{group_ratio}",
        "official_repo": REPO,
        "official_commit": commit,
        "seed": seed,
        "config": {**CONFIG, "group_ratio": group_ratio},
        "state": recipe,
        "inputs": {
            "captions": LOSS_CAPTIONS,
            "pair_entities": PAIR_ENTITIES,
            "questions": [q for q, _ in qa],
            "answers": [a for _, a in qa],
        },
        "outputs": {"losses": {k: float(v) for k, v in losses.items()}, "grads": grads, "batchnorm": _bn_state(model)},
    }


def make_parser_fixture(root: Path, commit: str) -> dict[str, Any]:
    """The release's question / entity / answer strings for PARSER_CAPTIONS (template i % 80 for caption i)."""
    module = _clip_dataset(root)
    qa = official_questions(root, PARSER_CAPTIONS, None)
    rows = []
    for index, (caption, (question, answer)) in enumerate(zip(PARSER_CAPTIONS, qa)):
        template = module.full_imagenet_templates[index % len(module.full_imagenet_templates)]
        prefix = template.split("{}")[0]
        assert answer.startswith(prefix)
        entities = sorted(answer[len(prefix) :].split(" and ")) if answer != prefix else []
        rows.append(
            {"caption": caption, "question": question, "answer": answer, "template": template, "entities": entities}
        )
    return {
        "method": "ovsegmentor",
        "name": "ovsegmentor_parser",
        "official_repo": REPO,
        "official_commit": commit,
        "templates": list(module.full_imagenet_templates),
        "rows": rows,
        "cross_entity_prefix": _cross_entity_prefix(root),
    }


def _cross_entity_prefix(root: Path) -> str:
    """The literal the release puts before a shared entity (datasets/clip_dataset.py: ``'A photo of ' + e``)."""
    tree = ast.parse((root / "datasets" / "clip_dataset.py").read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.BinOp)
            and isinstance(node.value.left, ast.Constant)
            and any(isinstance(t, ast.Name) and t.id == "crossentity" for t in node.targets)
        ):
            return node.value.left.value
    raise RuntimeError("the cross-entity prompt was not found in datasets/clip_dataset.py")


def make_schedule_fixture(
    root: Path, commit: str, stage: str = "stage1", gpus: int = 16, per_gpu: int = 256, steps_per_epoch: int = 977
) -> dict[str, Any]:
    """A stage's learning rate of every step as main_pretrain.py drives timm's scheduler (utils/lr_scheduler.py),
    base / warm-up / min lr scaled by the global batch / 4096 (main_pretrain.py:590-592). Stage 1: the paper's
    16 GPUs x 256 (scripts/run.sh), 977 steps per epoch; stage 2 (official_ovsegmentor_train.py): 8 x 128."""
    spec = importlib.util.spec_from_file_location("ovsm_lr_scheduler", root / "utils" / "lr_scheduler.py")
    lr_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lr_module)
    from omegaconf import OmegaConf

    default = OmegaConf.load(root / "configs" / "default.yml")
    own = OmegaConf.load(root / "configs" / "ovsegmentor" / f"ovsegmentor_pretrain_vit_bert_{stage}.yml")
    train = OmegaConf.merge(default.train, own.train)
    scale = per_gpu * gpus / 4096.0  # main_pretrain.py:590-592
    train.base_lr, train.warmup_lr, train.min_lr = train.base_lr * scale, train.warmup_lr * scale, train.min_lr * scale
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=train.base_lr)
    scheduler = lr_module.build_scheduler(train, optimizer, steps_per_epoch)
    curve = []
    for epoch in range(int(train.epochs)):
        for idx in range(steps_per_epoch):
            curve.append(optimizer.param_groups[0]["lr"])  # the lr this step's optimizer.step() uses
            scheduler.step_update(epoch * steps_per_epoch + idx)  # main_pretrain.py:356, after the step
    return {
        "method": "ovsegmentor",
        "name": f"ovsegmentor_lr_{stage}",
        "official_repo": REPO,
        "official_commit": commit,
        "config": {
            "base_lr": float(train.base_lr),
            "warmup_lr": float(train.warmup_lr),
            "min_lr": float(train.min_lr),
            "warmup_epochs": int(train.warmup_epochs),
            "epochs": int(train.epochs),
            "steps_per_epoch": steps_per_epoch,
            "global_batch": gpus * per_gpu,
        },
        "lr": torch.tensor(curve, dtype=torch.float64),
    }


def class_strings(root: Path, commit: str, out_dir: Path) -> list[Path]:
    """assets/class_strings/ovsegmentor/<vocabulary>.json from the CLASSES tuples of the release's datasets."""
    from ovseg_lab.vocab import load_vocabulary

    written = []
    for vocabulary, relative in CLASS_STRING_FILES.items():
        source = (root / relative).read_text()
        tree = ast.parse(source)
        node = next(
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "CLASSES" for t in n.targets)
        )
        official = list(ast.literal_eval(node.value))  # exactly as sent to the text tower ("bed " included)
        ours = list(load_vocabulary(vocabulary).classes)
        if "background" in official and "background" in ours:
            official_rest = [s for s in official if s != "background"]
            ours_rest = [s for s in ours if s != "background"]
        else:
            official_rest, ours_rest = official, ours
        if len(official_rest) != len(ours_rest):
            raise RuntimeError(f"{relative}: {len(official)} classes vs {len(ours)} in {vocabulary}")
        strings = dict(zip(ours_rest, official_rest))
        if "background" in ours:
            strings["background"] = "background"
        strings = {name: strings[name] for name in ours}
        lines = f"{node.lineno}-{node.end_lineno}"
        path = out_dir / f"{vocabulary}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {"citation": f"{REPO}@{commit} {relative}:{lines}", "strings": strings}, indent=1, ensure_ascii=False
            )
            + "\n"
        )
        written.append(path)
    return written


def make(official: Path, _extra: Path | None, out: Path, commit: str, seed: int) -> list[Path]:
    official = Path(official).resolve()
    paths = []
    for ratio in (0.5, 0.25):
        fixture = make_step_fixture(official, commit, seed, ratio)
        paths.append(save_fixture(fixture, out / f"{fixture['name'].replace('.', '')}.pt"))
    for fixture in (make_parser_fixture(official, commit), make_schedule_fixture(official, commit)):
        paths.append(save_fixture(fixture, out / f"{fixture['name']}.pt"))
    assets = Path(__file__).resolve().parents[2] / "ovseg_lab" / "assets" / "class_strings" / "ovsegmentor"
    paths += class_strings(official, commit, assets)
    random.seed(seed)
    return paths
