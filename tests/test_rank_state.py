"""Per-rank state in pretraining checkpoints: SwAV queues, DeepCluster-v2 memory banks and prototype-usage counts
differ between ranks by design. Only rank 0 writes the checkpoint file, so JointSSL gathers every rank's copy into
it and each rank takes its own back on resume; DDP must also never broadcast them."""

from __future__ import annotations

import logging

import pytest
import torch

from jointssl.pretrain import RANK_STATE_KEY
from tests.gloo_ranks import run_ranks
from tests.rank_state_worker import make


@pytest.mark.ddp
def test_each_rank_gets_its_own_queues_banks_and_counts_back(tmp_path) -> None:
    results = run_ranks("tests.rank_state_worker", tmp_path, world_size=2)
    for method, expected_names in (("swav", "swav.queue"), ("deepcluster", "memory.embeddings")):
        per_rank = [r[method] for r in results]
        assert per_rank[0]["entries"] == 2
        assert any(expected_names in name for name in per_rank[0]["names"])
        assert {"intra_counts", "inter_counts"} <= set(per_rank[0]["names"])
        for r in per_rank:
            for name, value in r["expected"].items():
                assert torch.equal(r["restored"][name], value), (method, name)
        # The ranks really held different values (the test would pass trivially otherwise).
        name = per_rank[0]["names"][-1]
        assert not torch.equal(per_rank[0]["expected"][name], per_rank[1]["expected"][name])


def test_per_rank_buffers_are_excluded_from_ddp_broadcast() -> None:
    model = make("deepcluster")
    names = set(model.per_rank_buffer_names())
    assert {"intra.memory.embeddings", "intra.memory.indices", "intra.memory.write_position",
            "inter.memory.labels", "intra_counts"} <= names
    # No parameter and no BatchNorm statistic is per rank: those must stay synchronised.
    assert not names & {name for name, _ in model.named_parameters()}
    assert not any("running_" in name for name in names)


def test_checkpoint_from_another_world_size_restarts_queues_and_keeps_labels(caplog) -> None:
    saved = make("deepcluster")
    saved.intra.memory.update(torch.tensor([1, 2, 3]), [torch.randn(3, 8), torch.randn(3, 8)])
    saved.intra.memory.labels[0, :5] = torch.tensor([0, 1, 2, 0, 1])
    checkpoint = {"state_dict": saved.state_dict()}
    saved.on_save_checkpoint(checkpoint)
    checkpoint[RANK_STATE_KEY] = checkpoint[RANK_STATE_KEY] * 4  # as if written by 4 ranks
    restored = make("deepcluster")
    with caplog.at_level(logging.WARNING, logger="jointssl"):
        restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"])
    assert "written by 4 ranks, this run has 1" in caplog.text
    assert restored.intra.needs_memory()  # refilled before training
    assert torch.equal(restored.intra.memory.labels, saved.intra.memory.labels)
