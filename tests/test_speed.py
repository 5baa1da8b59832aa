"""Speed options: each one must give the outputs of the plain path (tolerances stated per test), on tiny models.

Options: SDPA vs the reference attention (speed.attention), text-embedding cache (clip.cache_text), batched sliding
windows (model.inference.batch_windows), CAT-Seg class chunks (model.net.class_chunk), OVSeg region batches
(model.net.region_batch), bf16 autocast (trainer.precision / --precision), channels_last (speed.channels_last),
torch.compile (speed.compile). Plus the benchmark script's JSON and growth figures.
"""

from __future__ import annotations

import json
from functools import cache, partial

import pytest
import torch

from ovseg_lab.build import build_net
from ovseg_lab.errors import SetupError
from ovseg_lab.eval.inference import InferenceConfig, segment
from ovseg_lab.layers.attention import attention, reference_attention
from ovseg_lab.speed import SpeedConfig, apply_speed, set_attention
from ovseg_lab.vocab import Vocabulary
from tests.conftest import ROOT

NAMES = ["red circle", "blue square", "striped grass", "plain sky", "green triangle", "yellow star", "dotted wall"]


def vocab(count: int = len(NAMES)) -> Vocabulary:
    return Vocabulary(name=f"speed{count}", classes=tuple(NAMES[:count]))


VOCAB = vocab()
FP32 = dict(atol=1e-5, rtol=1e-4)  # the tolerance of every fp32 equality below: reordered float sums only


@cache
def _tiny(method: str):
    torch.manual_seed(0)
    return build_net([f"model={method}", "clip=tiny", "data=toy"]).eval()


def tiny(method: str):
    """A fresh copy of a tiny random-init net (built once per method, then deep-copied)."""
    import copy

    return copy.deepcopy(_tiny(method))


def images(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_reference_attention_equals_sdpa(mask_kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 10, 16, generator=g) for _ in range(3))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(3, 1, 10, 10, generator=g) > 0.3
        mask[..., 0] = True  # every query keeps at least one key
    elif mask_kind == "float":
        mask = (torch.rand(1, 1, 10, 10, generator=g) > 0.5).float() * -100.0
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(reference_attention(q, k, v, mask), expected, **FP32)
    torch.testing.assert_close(attention(q, k, v, mask, fused=False), expected, **FP32)


@pytest.mark.parametrize("method, expected_layers", [("catseg", 4 + 2 + 2 * 2), ("lseg", 6 + 4), ("groupvit", None)])
def test_math_attention_gives_the_sdpa_outputs(method, expected_layers):
    """Switching every attention layer to the reference computation changes no output (fp32, atol 1e-5)."""
    net = tiny(method)
    x = images()
    with torch.no_grad():
        fused = net(x, VOCAB)
        switched = set_attention(net, "math")
        reference = net(x, VOCAB)
    flags = [m.fused_attn for m in net.modules() if hasattr(m, "fused_attn")]
    assert flags and not any(flags)
    if expected_layers is not None:  # CAT-Seg: 4 visual + 2 text CLIP blocks, 2 layers x 2 Swin blocks
        assert switched == expected_layers
    torch.testing.assert_close(reference, fused, **FP32)


def test_runner_applies_the_speed_node(compose_cfg, tmp_path):
    from hydra.utils import instantiate

    cfg = compose_cfg(
        "train",
        [
            "experiment=quickstart",
            "model=catseg",
            "speed.attention=math",
            "clip.weights=null",
            f"paths.data_dir={tmp_path}",
        ],
    )
    module = apply_speed(instantiate(cfg.model), cfg.speed)
    assert [m.fused_attn for m in module.net.modules() if hasattr(m, "fused_attn")] == [False] * 10
    with pytest.raises(Exception, match="speed.attention"):
        SpeedConfig.from_config({"attention": "flash"})


# ---------------------------------------------------------------------------------------------- text cache
def test_text_cache_reuses_embeddings_per_vocabulary_and_changes_no_output():
    """Cached and uncached evaluation give identical logits (exact); the tower runs once per vocabulary."""
    net = tiny("catseg")
    x = images()
    clip = net.clip
    with torch.no_grad():
        calls = clip.text_tower_calls
        first = net(x, VOCAB)
        second = net(x, VOCAB)
        assert clip.text_tower_calls == calls + 1  # second call served from the cache
        other = net(x, vocab(3))  # another vocabulary is not served the first one's embeddings
        assert clip.text_tower_calls == calls + 2 and other.shape[1] == 3
        clip.cache_text = False
        uncached = net(x, VOCAB)
        assert clip.text_tower_calls == calls + 3
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    torch.testing.assert_close(uncached, first, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- sliding windows
def test_batched_windows_equal_one_window_at_a_time():
    """CAT-Seg's slide protocol (4 windows + a global view) batched in one call vs one call per view: atol 1e-5."""
    net = tiny("catseg")
    x = images(batch=2, size=80)
    slide = dict(mode="slide", slide_size=96, crop=64, stride=32, global_view=True)
    forward = partial(net, vocabulary=VOCAB)
    calls = []

    def counted(v):
        calls.append(v.shape[0])
        return forward(v)

    with torch.no_grad():
        batched = segment(counted, x, InferenceConfig(**slide, batch_windows=True))
        assert calls == [2 * 5]
        one_by_one = segment(counted, x, InferenceConfig(**slide, batch_windows=False))
    assert calls[1:] == [2] * 5
    assert batched.shape == (2, len(NAMES), 80, 80)
    torch.testing.assert_close(batched, one_by_one, **FP32)


def test_catseg_class_chunks_equal_all_classes_at_once():
    """class_chunk bounds memory (spatial aggregation and decoder per chunk of classes): atol 1e-5."""
    net = tiny("catseg")
    x = images()
    with torch.no_grad():
        whole = net(x, VOCAB)
        net.class_chunk = 3  # 7 classes -> chunks of 3, 3, 1
        chunked = net(x, VOCAB)
    torch.testing.assert_close(chunked, whole, **FP32)


# ---------------------------------------------------------------------------------------------- OVSeg regions
def test_ovseg_region_batches_equal_one_region_at_a_time():
    """All proposals of all images through CLIP in one batch vs one crop per CLIP call: atol 1e-5."""
    from ovseg_lab.clip import CLIPBackbone
    from ovseg_lab.models.maskformer import MaskFormer, SetCriterion
    from ovseg_lab.models.ovseg import OVSeg

    tiny_clip = dict(
        embed_dim=32,
        vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
        text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
    )
    swin = dict(
        name="swin_tiny_patch4_window7_224",
        pretrained=False,
        model_kwargs=dict(
            img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4, strict_img_size=False
        ),
    )
    maskformer = partial(
        MaskFormer,
        backbone=swin,
        num_queries=6,
        hidden_dim=32,
        heads=2,
        ffn_dim=64,
        dec_layers=1,
        conv_dim=16,
        mask_dim=16,
        class_hidden=32,
    )
    torch.manual_seed(0)
    clip = CLIPBackbone("tiny", None, model_cfg=tiny_clip, feature_layers=(0,), templates=["a {}"], mask_prompt_depth=1)
    net = OVSeg(clip, maskformer, SetCriterion(), templates=["a {}"], classify="clip", mask_threshold=0.5).eval()
    x = images(batch=2)
    crops = []
    encode = clip.encode_image
    clip.encode_image = lambda chunk, keep=None: (crops.append(chunk.shape[0]), encode(chunk, keep))[1]
    with torch.no_grad():
        batched = net(x, vocab(4))
        n_regions = sum(crops)
        assert n_regions > 2 and len(crops) == 1  # every valid proposal of both images in one CLIP call
        net.region.batch_size = 1
        single = net(x, vocab(4))
    assert crops[1:] == [1] * n_regions
    torch.testing.assert_close(batched, single, **FP32)


# ---------------------------------------------------------------------------------------------- numerics / layout
def test_bf16_autocast_stays_close_to_fp32():
    """CPU bf16 autocast (the GPU path of trainer.precision=bf16-mixed): logits within 0.1 of fp32, and the argmax
    label unchanged wherever fp32's top-two logits are 0.06 apart (twice the bf16 error seen here; a random-init
    net has many near-ties, which 8 mantissa bits may flip). Logits, not sigmoid scores: the toy head starts every
    class near its prior probability, where sigmoid squeezes the margins."""
    net = tiny("catseg")
    x = images()
    with torch.no_grad():
        plain = net(x, VOCAB).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = net(x, VOCAB)
    assert mixed.dtype == torch.bfloat16  # autocast really ran the convolutions / matmuls in bf16
    mixed = mixed.float()
    assert (mixed - plain).abs().max() < 0.1
    top2 = plain.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 0.06
    assert decided.any()
    assert (mixed.argmax(1) == plain.argmax(1))[decided].all()


@pytest.mark.parametrize("method", ["catseg", "lseg"])
def test_channels_last_changes_layout_not_outputs(method):
    """NHWC weights and inputs: atol 1e-5 against NCHW."""
    net = tiny(method)
    x = images()
    with torch.no_grad():
        plain = net(x, VOCAB)
        apply_speed(net, {"channels_last": True})
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.dim() == 4)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        nhwc = net(x, VOCAB)
    torch.testing.assert_close(nhwc, plain, **FP32)


def test_compiled_net_equals_eager():
    """torch.compile in place (the eager backend: TorchDynamo captures the graphs, PyTorch runs them; fast and needs
    no C++ toolchain): atol 1e-5; the state-dict keys are unchanged so checkpoints stay interchangeable."""
    net = tiny("costvolume")
    x = images(batch=1)
    keys = list(net.state_dict())
    with torch.no_grad():
        eager = net(x, VOCAB)
        apply_speed(net, {"compile": True, "compile_backend": "eager"})
        compiled = net(x, VOCAB)
    assert net._compiled_call_impl is not None  # the call really went through torch.compile
    assert list(net.state_dict()) == keys
    torch.testing.assert_close(compiled, eager, **FP32)


# ---------------------------------------------------------------------------------------------- benchmark script
def test_growth_summary_on_hand_made_points():
    from ovseg_lab.tools.benchmark import growth_summary

    points = [
        {"num_classes": 150, "latency_s": 1.0, "peak_memory_mib": 100.0},
        {"num_classes": 300, "latency_s": 1.5, "peak_memory_mib": 150.0},
        {"num_classes": 600, "latency_s": 2.5, "peak_memory_mib": 250.0},
    ]
    growth = growth_summary(points, "num_classes", 150, 600)
    assert growth["latency_ratio"] == 2.5 and growth["proportional_ratio"] == 4.0
    assert growth["ratio_vs_linear"] == 0.625 and growth["memory_ratio"] == 2.5
    assert growth["fit_latency_s"] == {"intercept": 0.5, "per_unit": round(1 / 300, 6)}


def test_benchmark_prints_json_last_and_writes_output(tmp_path, capsys):
    from ovseg_lab.tools.benchmark import main

    out = tmp_path / "bench.json"
    main(
        [
            "--method",
            "catseg",
            "--clip",
            "tiny",
            "--num-classes",
            "5",
            "--image-size",
            "64",
            "--device",
            "cpu",
            "--repeats",
            "2",
            "--profile",
            "5",
            "--output",
            str(out),
            "data=toy",
        ]
    )
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result
    assert "timing" in captured.err and "Self CPU" in captured.err  # progress and the profile go to stderr
    assert result["num_classes"] == 5 and result["net_input_size"] == 64 and len(result["latencies_s"]) == 2
    assert min(result["latencies_s"]) <= result["latency_s"] <= max(result["latencies_s"])
    assert 0 < result["cpu_s"]
    assert result["throughput_img_s"] == pytest.approx(1 / result["latency_s"], rel=1e-2)
    assert result["peak_memory_mib"] >= result["memory_before_mib"] > 0


def test_benchmark_class_sweep_and_train_mode(capsys):
    from ovseg_lab.tools.benchmark import main

    sweep = main(
        [
            "--method",
            "catseg",
            "--clip",
            "tiny",
            "--sweep",
            "classes",
            "--classes-list",
            "3,12",
            "--image-size",
            "64",
            "--repeats",
            "1",
            "--protocol",
            "eval",
            "data=toy",
        ]
    )
    assert [p["num_classes"] for p in sweep["points"]] == [3, 12]
    assert sweep["growth"]["from"] == 3 and sweep["growth"]["proportional_ratio"] == 4.0
    train = main(
        [
            "--method",
            "catseg",
            "--clip",
            "tiny",
            "--num-classes",
            "4",
            "--image-size",
            "64",
            "--mode",
            "train",
            "--repeats",
            "1",
            "data=toy",
        ]
    )
    assert train["mode"] == "train" and train["latency_s"] > 0
    from ovseg_lab.errors import SetupError

    with pytest.raises(SetupError, match="--mode train"):
        main(["--method", "ovseg", "--mode", "train", "--clip", "tiny", "data=toy"])


# ---------------------------------------------------------------------------------------------- official comparison
# The official CAT-Seg code never enters the repository: extract it (tests/golden/README.md) and point
# CATSEG_OFFICIAL at the directory holding cat_seg/ (default /tmp/catseg_official).
OFFICIAL_CATSEG = __import__("pathlib").Path(__import__("os").environ.get("CATSEG_OFFICIAL", "/tmp/catseg_official"))
needs_official = pytest.mark.skipif(
    not (OFFICIAL_CATSEG / "cat_seg" / "modeling" / "transformer" / "model.py").is_file(),
    reason="official CAT-Seg code not extracted (set CATSEG_OFFICIAL)",
)


@pytest.mark.slow  # 14 s: in the slow suite, which CI runs too, to keep the default suite under 10 minutes
@needs_official
def test_compare_official_tiny_prints_ratios_and_checks_outputs(capsys):
    """--compare-official with tiny widths: outputs equal to 1e-5, interleaved CPU-time ratio, memory children."""
    from ovseg_lab.tools.benchmark import main

    result = main(["--compare-official", str(OFFICIAL_CATSEG), "--tiny", "--num-classes", "12", "--repeats", "2"])
    err = capsys.readouterr().err
    assert "latency ratio (ours/official, CPU s, T=12 untruncated)" in err and "peak-memory ratio" in err
    assert result["relative_error"] <= 1e-5 and result["threads"] == 1
    assert len(result["cpu_s"]["ours"]) == len(result["cpu_s"]["official"]) == 2
    assert result["latency_ratio"] > 0 and result["memory_ratio"] > 0
    for head in ("ours", "official"):
        memory = result["memory"][head]
        assert memory["peak_mib"] >= memory["before_mib"] > 0 and memory["output_shape"] == [1, 12, 48, 48]


@needs_official
def test_compare_official_tiny_with_truncation(capsys):
    """Above 256 classes with the official top-256 truncation: the dropped classes score -100 on both sides."""
    from ovseg_lab.tools.benchmark import main

    result = main(
        [
            "--compare-official",
            str(OFFICIAL_CATSEG),
            "--tiny",
            "--num-classes",
            "260",
            "--truncate",
            "--repeats",
            "1",
            "--no-memory",
        ]
    )
    assert result["relative_error"] <= 1e-5 and result["truncate"] and "memory" not in result
    assert result["dropped_classes"] == 260 - 256 and result["relative_error_scored"] <= 1e-5
    assert "T=260 top-256" in capsys.readouterr().err


def _git_head_available() -> bool:
    import subprocess

    proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True)
    return proc.returncode == 0


@pytest.mark.skipif(not _git_head_available(), reason="not a git checkout")
def test_compare_revision_runs_both_heads_on_the_toy(capsys):
    """--compare-revision REV: the working tree's CAT-Seg head against REV's (private copies of its files), same
    weights, outputs and gradients checked, an interleaved CPU-time ratio; an unknown revision is a clear error."""
    from ovseg_lab.tools.benchmark import main

    result = main(["--compare-revision", "HEAD", "--repeats", "2", "--revision-calls", "1"])
    assert "head ratio (working tree / HEAD, CPU s per call, toy train)" in capsys.readouterr().err
    assert result["relative_error"] <= 1e-5 and result["gradient_error"] <= 1e-4 and result["threads"] == 1
    assert len(result["cpu_s"]["ours"]) == len(result["cpu_s"]["revision"]) == 2 and result["ratio"] > 0
    with pytest.raises(SetupError, match="ovseg_lab/layers/swin.py at 'no-such-revision'"):
        main(["--compare-revision", "no-such-revision", "--repeats", "1"])


def test_head_train_memory_counts_what_chunks_save(capsys):
    """--head-train-memory: checkpointed class chunks keep a fraction of the activation bytes; bad input is named."""
    from ovseg_lab.tools.benchmark import main

    result = main(["--head-train-memory", "none,4", "--revision-size", "toy", "--num-classes", "12"])
    whole, chunked = result["points"]
    assert (whole["train_class_chunk"], chunked["train_class_chunk"]) == (None, 4)
    assert 0 < chunked["kept_mib"] < 0.5 * whole["kept_mib"] and "kept for the backward pass" in capsys.readouterr().err
    with pytest.raises(SetupError, match="'zero'"):
        main(["--head-train-memory", "none,zero"])


def test_gpu_check_runs_tiny_on_cpu(tmp_path, capsys):
    """scripts/gpu_check.py --tiny: every section (training per fine-tuning strategy, sliding-window evaluation with
    and without truncation, OVSeg region classification) under CPU bf16 autocast, one JSON."""
    from ovseg_lab.tools.gpu_check import FINETUNES, main

    out = tmp_path / "gpu_check.json"
    result = main(["--tiny", "--device", "cpu", "--output", str(out)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(out.read_text()) == result
    assert [p["finetune"] for p in result["train"]] == list(FINETUNES)
    assert all(p["latency_s"] > 0 and p["peak_memory_mib"] > 0 and p["batch_size"] == 2 for p in result["train"])
    assert [(p["classes"], p["truncate"]) for p in result["eval"]] == [(5, False), (12, False), (12, True)]
    assert all(p["images_per_s"] > 0 for p in result["eval"])
    regions = result["ovseg_regions"]
    assert regions["seconds_per_image"] > 0 and regions["valid_regions"] == regions["regions"]
    assert result["skipped"] == [] and result["precision"] == "bf16"
