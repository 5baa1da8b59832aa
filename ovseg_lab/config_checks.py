"""Config values and combinations checked before any data, weights or model is touched.

Hydra already refuses unknown keys (the composed config is in struct mode) and unknown group options at
compose time. What it cannot know is which *values* our code accepts: enum-like strings (finetune strategy,
aggregation input, inference mode, precision, non-finite policy), numbers of the wrong type or sign, and
combinations that exist for one tower or model but not another. Those are gathered here into one
:class:`SetupError` paragraph, naming each key and the accepted values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ovseg_lab.config import CLIP_TARGET, clip_nodes, nodes_with_target  # noqa: F401  (re-exported)
from ovseg_lab.errors import SetupError

PRECISIONS = (
    "64-true",
    "64",
    64,
    "32-true",
    "32",
    32,
    "16-true",
    "bf16-true",
    "16-mixed",
    "16",
    16,
    "bf16-mixed",
    "bf16",
    "transformer-engine",
    "transformer-engine-float16",
)
NONFINITE_POLICIES = ("raise", "skip")  # model.nonfinite_loss (ovseg_lab.lit.nonfinite)


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    try:
        return OmegaConf.select(cfg, key, default=default, throw_on_resolution_failure=False)
    except Exception:  # an interpolation that only resolves inside a Hydra run
        return default


def _int(problems: list[str], cfg: DictConfig, key: str, minimum: int | None = None, allow: tuple = ()) -> None:
    value = _get(cfg, key)
    if value is None or value in allow:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{key}={value!r} must be an integer")
    elif minimum is not None and value < minimum:
        problems.append(f"{key}={value} must be >= {minimum}")


def _spec(problems: list[str], build: Callable[[], Any]) -> None:
    """Run a spec class's own validation (FinetuneSpec, AggregationSpec, InferenceConfig) without a model."""
    try:
        build()
    except SetupError as err:
        problems.append(str(err).rstrip("."))
    except (TypeError, ValueError) as err:
        problems.append(f"{type(err).__name__}: {err}")


def _visual_layers(clip: DictConfig) -> int | None:
    """Depth of the CLIP image tower, from the custom model_cfg or open_clip's named config (no weights)."""
    layers = _get(clip, "model_cfg.vision_cfg.layers")
    if layers is not None:
        return int(layers)
    try:
        import open_clip

        named = open_clip.get_model_config(str(clip.get("model_name")))
    except Exception:
        return None
    return (named or {}).get("vision_cfg", {}).get("layers")


def _launch_problem(cfg: DictConfig) -> str | None:
    """Multi-process DDP inside a local ``-m`` sweep: Lightning starts ranks > 0 by re-running sys.argv, so every
    rank would run the whole sweep. One SLURM job per sweep point (hydra/launcher=slurm) is the way."""
    import os

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    strategy = _get(cfg, "trainer.strategy")
    name = _get(cfg, "trainer.strategy._target_") if OmegaConf.is_dict(strategy) else strategy
    devices = _get(cfg, "trainer.devices")
    many = str(devices) not in ("1", "None", "[0]") or (_get(cfg, "trainer.num_nodes") or 1) > 1
    if not ("ddp" in str(name).lower() and many) or not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    launcher = str(OmegaConf.select(hydra_cfg, "launcher._target_") or "")
    if hydra_cfg.mode == RunMode.MULTIRUN and launcher.endswith("BasicLauncher") and "SLURM_JOB_ID" not in os.environ:
        return (
            "trainer=ddp with several devices cannot run inside a local -m sweep (Lightning re-runs the command "
            "line for each rank, which would re-run the whole sweep): sweep with hydra/launcher=slurm (one SLURM "
            "job per sweep point), or run the points one at a time without -m"
        )
    return None


# Config groups read only by some models (model choice -> reads it). Chosen on the command line for another model, a
# group would change nothing: a sweep over it gives identical rows. LSeg keeps its text tower frozen and OVSeg never
# trains CLIP (both freeze it after the finetune strategy is applied); OVSegmentor and GroupViT have no CLIP tower of
# the clip group (their own ViT / BERT); only CAT-Seg has a cost aggregation. (A group no model node interpolates is
# also left out of the recorded config: ovseg_lab.config.drop_unused_groups; tests/test_house.py keeps the two
# consistent.)
GROUP_READERS = {
    "clip": (
        *("catseg", "costvolume", "lseg", "ovseg", "ovseg_clip_adapt", "ovseg_sam"),
        # training-free: the frozen CLIP is the whole model
        *("maskclip", "sclip", "clearclip", "naclip", "vanilla_clip"),
    ),
    "finetune": ("catseg", "costvolume", "ovseg_clip_adapt"),
    "aggregation": ("catseg",),
}


def _unread_group_problems(cfg: DictConfig) -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    hydra_cfg = HydraConfig.get()
    model = OmegaConf.select(hydra_cfg, "runtime.choices.model")
    overrides = [str(o).lstrip("+~") for o in (OmegaConf.select(hydra_cfg, "overrides.task") or [])]
    problems = []
    for group, readers in GROUP_READERS.items():
        given = [o for o in overrides if o.split("=", 1)[0] == group or o.startswith(group + ".")]
        if given and model is not None and model not in readers:
            problems.append(
                f"{given[0]}: model={model} does not read the {group} group (read by model="
                f"{'|'.join(readers)}); it would change nothing (a sweep over it gives identical rows)"
            )
    return problems


def _learning_rate_problems(node: Any, prefix: str = "model") -> list[str]:
    """Every ``lr`` / ``*_lr`` (> 0) and ``*lr_multiplier`` (>= 0) in the model config: a negative rate trained
    uphill without a word until an optimizer refused it at fit start, with a 52-line traceback."""
    problems = []
    if not isinstance(node, DictConfig):
        return problems
    for key in node:
        try:
            value = node[key]
        except Exception:  # an interpolation that only resolves inside a run
            continue
        name = f"{prefix}.{key}"
        if isinstance(value, DictConfig):
            problems += _learning_rate_problems(value, name)
            continue
        key = str(key)
        is_rate, is_multiplier = key == "lr" or key.endswith("_lr"), key.endswith("lr_multiplier")
        if not (is_rate or is_multiplier) or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{name}={value!r} must be a number")
        elif is_rate and not value > 0:
            problems.append(f"{name}={value} must be > 0 (a learning rate)")
        elif is_multiplier and value < 0:
            problems.append(f"{name}={value} must be >= 0 (0 freezes those parameters)")
    return problems


def _given_on_command_line(key: str) -> bool:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    overrides = OmegaConf.select(HydraConfig.get(), "overrides.task") or []
    return any(str(o).lstrip("+~").split("=", 1)[0] == key for o in overrides)


def _length_problems(cfg: DictConfig, stage: str) -> list[str]:
    """max_steps: 0 trains nothing. Only a config file may say so on purpose, for a pipeline's assembling run whose
    stages train (OVSeg's chains); -1 means "until max_epochs" and needs it."""
    steps = _get(cfg, "trainer.max_steps")
    if stage != "fit" or isinstance(steps, bool) or not isinstance(steps, int):
        return []
    if steps == 0 and (not _get(cfg, "pipeline") or _given_on_command_line("trainer.max_steps")):
        return ["trainer.max_steps=0 trains nothing; give a number of steps > 0"]
    if steps == -1 and not (_get(cfg, "trainer.max_epochs") or 0) > 0:
        return ["trainer.max_steps=-1 (train by epochs) needs trainer.max_epochs > 0; give a number of steps > 0"]
    return []


def _crop_problems(cfg: DictConfig) -> list[str]:
    """A crop below the chosen model's minimum (one cell of its coarsest map: ovseg_lab.models.min_crop)."""
    crop = _get(cfg, "data.transform.crop_size")
    if crop is None:
        return []
    sizes = list(crop) if OmegaConf.is_list(crop) else [crop]
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in sizes):
        return [f"data.transform.crop_size={crop} must be a positive integer (or a pair)"]
    from ovseg_lab.models.min_crop import crop_problems

    return crop_problems(_get(cfg, "model"), sizes, crop)


def config_problems(cfg: DictConfig, stage: str = "fit") -> list[str]:
    """Every invalid value or combination of ``cfg``, as user-facing lines."""
    problems: list[str] = []
    _int(problems, cfg, "seed")
    _int(problems, cfg, "trainer.max_steps", minimum=-1)
    problems += _length_problems(cfg, stage)
    _int(problems, cfg, "trainer.devices", minimum=1, allow=("auto", -1))
    _int(problems, cfg, "data.batch_size", minimum=1)
    _int(problems, cfg, "data.eval_batch_size", minimum=1)
    _int(problems, cfg, "data.num_workers", minimum=0)
    _int(problems, cfg, "data.max_bad_samples", minimum=0)
    fraction = _get(cfg, "data.max_bad_fraction")
    if fraction is not None and (
        isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1
    ):
        problems.append(f"data.max_bad_fraction={fraction!r} must be a number in [0, 1]")

    precision = _get(cfg, "trainer.precision")
    if precision is not None and precision not in PRECISIONS:
        problems.append(
            f"trainer.precision={precision!r} is not a Lightning precision; use one of 32-true, "
            "bf16-mixed, 16-mixed, bf16-true, 64-true"
        )
    elif precision in ("16-mixed", "16", 16) and _get(cfg, "trainer.accelerator") == "cpu":
        problems.append(f"trainer.precision={precision} needs a GPU; on trainer=cpu use 32-true or bf16-mixed")
    launch = _launch_problem(cfg)
    if launch:
        problems.append(launch)

    policy = _get(cfg, "model.nonfinite_loss")
    if policy is not None and policy not in NONFINITE_POLICIES:
        problems.append(f"model.nonfinite_loss={policy!r} must be one of {list(NONFINITE_POLICIES)}")

    inference = _get(cfg, "model.inference")
    if inference is not None:
        from ovseg_lab.eval.inference import InferenceConfig

        _spec(problems, lambda: InferenceConfig.from_config(OmegaConf.to_container(inference, resolve=True)))

    if _get(cfg, "model.net.aggregation") is not None:
        from ovseg_lab.models.catseg import AggregationSpec

        _spec(
            problems,
            lambda: AggregationSpec.from_config(OmegaConf.to_container(cfg.model.net.aggregation, resolve=True)),
        )

    from ovseg_lab.clip.finetune import FinetuneSpec

    for clip in clip_nodes(_get(cfg, "model")):
        finetune = clip.get("finetune")
        if finetune is None:
            continue
        plain = OmegaConf.to_container(finetune, resolve=True) if isinstance(finetune, DictConfig) else finetune
        _spec(problems, lambda plain=plain: FinetuneSpec.from_config(plain))
        strategy = plain.get("strategy") if isinstance(plain, dict) else plain
        if strategy == "prompt" and isinstance(plain, dict):
            depth, layers = int(plain.get("prompt_depth") or 0), _visual_layers(clip)
            if layers is not None and depth > layers:
                problems.append(
                    f"finetune.prompt_depth={depth} exceeds the {layers} blocks of the image tower of "
                    f"CLIP {clip.get('model_name')} (finetune=prompt prompts the image tower only)"
                )
    from ovseg_lab.config_schema import schema_problems

    problems += schema_problems(cfg)  # what goes to Lightning's Trainer and callbacks
    problems += _learning_rate_problems(_get(cfg, "model"))
    problems += _crop_problems(cfg)
    problems += _unread_group_problems(cfg)
    return list(dict.fromkeys(problems))


def check_config(cfg: DictConfig, stage: str = "fit") -> None:
    problems = config_problems(cfg, stage)
    if problems:
        raise SetupError(f"Invalid configuration ({cfg.get('task_name', 'run')}): " + "; ".join(problems) + ".")
