"""The benchmark metric under DDP: 2 CPU processes (gloo), each scoring its shard of the images.

The summed confusion matrix must give exactly the single-process value, with the images split by the
DataModule's ShardedEvalSampler (no padding). DistributedSampler's duplicate padding would change it: the
test shows that too, so it would notice a regression to the default sampler.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from ovseg_lab.data.datamodule import ShardedEvalSampler
from ovseg_lab.metrics import SegmentationMetric

NUM_CLASSES = 6
NUM_IMAGES = 7  # odd: DistributedSampler pads one duplicate for 2 ranks
WORLD = 2


def dataset() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(NUM_IMAGES):
        target = torch.randint(0, NUM_CLASSES - 1, (9, 11), generator=gen)  # class 5 never labelled
        target[: i % 3] = 255
        pred = torch.where(
            torch.rand(9, 11, generator=gen) < 0.6,
            target.clamp(max=NUM_CLASSES - 1),
            torch.randint(0, NUM_CLASSES, (9, 11), generator=gen),
        )
        pairs.append((pred, target))
    pairs[3] = (torch.full((9, 11), 5), pairs[3][1])  # an image predicted all "5": matters for the mmseg convention
    return pairs


def score(indices, convention: str) -> dict:
    metric = SegmentationMetric(NUM_CLASSES, ignore_index=255, convention=convention)
    data = dataset()
    for i in indices:
        metric.update(*data[i])
    return metric.compute()


def _rank_main(rank: int, port: int, sampler_kind: str, convention: str, results) -> None:
    # A forked child must not enter the OpenMP pool its parent already started (it would wait forever):
    # one intra-op thread keeps every torch op inline.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        if sampler_kind == "sharded":
            indices = list(ShardedEvalSampler(NUM_IMAGES, rank, WORLD))
        else:
            indices = list(DistributedSampler(range(NUM_IMAGES), num_replicas=WORLD, rank=rank, shuffle=False))
        scores = score(indices, convention)  # compute() sums the confusion matrices over the ranks
        results[rank] = (
            scores["mIoU"],
            scores["fwIoU"],
            scores["pixel_accuracy"],
            scores["num_pixels"],
            indices,
            scores["chance_uniform_mIoU"],
            scores["chance_present_classes_mIoU"],
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(sampler_kind: str, convention: str) -> dict:
    manager = mp.get_context("fork").Manager()
    results = manager.dict()
    # fork: the ranks inherit the imported modules (a spawned rank would spend ~15 s importing torchmetrics)
    context = mp.start_processes(
        _rank_main,
        args=(_free_port(), sampler_kind, convention, results),
        nprocs=WORLD,
        start_method="fork",
        join=False,
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError("the two ranks did not finish within 120 s")
    return dict(results)


@pytest.mark.parametrize("convention", ["detectron2", "mmseg"])
def test_ddp_reduction_equals_single_process(convention):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    single = score(range(NUM_IMAGES), convention)
    results = run_distributed("sharded", convention)
    assert sorted(results[0][4] + results[1][4]) == list(range(NUM_IMAGES))  # every image exactly once
    for rank in range(WORLD):
        miou, fwiou, pacc, pixels, _, uniform, present = results[rank]
        assert pixels == single["num_pixels"]
        assert uniform == pytest.approx(single["chance_uniform_mIoU"], abs=1e-9)
        assert present == pytest.approx(single["chance_present_classes_mIoU"], abs=1e-9)  # a per-image state, summed
        assert miou == pytest.approx(single["mIoU"], abs=1e-9)
        assert fwiou == pytest.approx(single["fwIoU"], abs=1e-9)
        assert pacc == pytest.approx(single["pixel_accuracy"], abs=1e-9)
    if convention == "detectron2":
        padded = run_distributed("distributed_sampler", convention)
        assert padded[0][3] > single["num_pixels"]  # the duplicate image is counted twice
        assert padded[0][0] != pytest.approx(single["mIoU"], abs=1e-6)
