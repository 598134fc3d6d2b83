"""Issue 8's speed levers keep results unchanged: the teacher-feature cache, channels-last
inference and the compile switch (speed itself is measured in experiments/bench, not here)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdad.callbacks import InferenceOptimization
from kdad.data.batch import Batch
from kdad.errors import KdadError
from kdad.feature_cache import FeatureCache
from kdad.methods import METHODS, ReverseDistillation


class CountingNet(nn.Module):
    """Two 'levels' of per-sample features; counts how many samples it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.seen += x.shape[0]
        return [x * 2.0, x.mean(dim=1, keepdim=True)]


def test_cache_computes_each_key_once_and_returns_the_same_values() -> None:
    net, cache = CountingNet(), FeatureCache(max_bytes=10**9)
    x = torch.randn(4, 3, 5, 5)
    first = cache(["a", "b", "c", "d"], x, net)
    assert net.seen == 4 and len(cache) == 4
    again = cache(["c", "a", "d", "b"], x[[2, 0, 3, 1]], net)  # another order: all hits
    assert net.seen == 4 and cache.hits == 4 and cache.misses == 4
    for level_first, level_again in zip(first, again):
        assert torch.equal(level_again, level_first[[2, 0, 3, 1]])
    # a batch mixing cached and new images is computed whole (as without the cache) and only
    # the new images are stored
    y = torch.randn(2, 3, 5, 5)
    mixed = cache(["b", "e", "a", "f"], torch.stack([x[1], y[0], x[0], y[1]]), net)
    assert net.seen == 8 and len(cache) == 6 and cache.misses == 6
    expected = net(torch.stack([x[1], y[0], x[0], y[1]]))
    for got, want in zip(mixed, expected):
        assert torch.equal(got, want)
    for got, want in zip(cache(["f", "e"], torch.stack([y[1], y[0]]), net), expected):
        assert torch.equal(got, want[[3, 1]])


def test_cache_respects_its_memory_bound_and_clear() -> None:
    net = CountingNet()
    x = torch.randn(3, 3, 4, 4)
    per_image = (3 * 4 * 4 + 4 * 4) * 4  # bytes of one sample's two levels (float32)
    cache = FeatureCache(max_bytes=2 * per_image)
    cache(["a", "b", "c"], x, net)
    assert len(cache) == 2 and cache.bytes == 2 * per_image
    cache(["a", "b", "c"], x, net)
    assert net.seen == 6  # "c" did not fit: its batch is recomputed
    cache(["d", "d"], torch.randn(2, 3, 4, 4), net)  # full: nothing stored, no double counting
    assert cache.bytes == 2 * per_image
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0
    with pytest.raises(ValueError):
        FeatureCache(-1)
    with pytest.raises(KdadError, match="cache_teacher_max_gib"):
        ReverseDistillation(backbone="resnet18", weights="none", cache_teacher_max_gib=-1)


def _train(model: ReverseDistillation, batches: list[Batch], epochs: int) -> list[float]:
    optimizer = model.configure_optimizers()
    losses = []
    model.train()
    for _ in range(epochs):
        for batch in batches:
            loss = model.training_step(batch, 0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    return losses


@pytest.mark.numerics
def test_rd_with_teacher_cache_trains_exactly_like_without(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ReverseDistillation, "log", lambda *a, **k: None)
    torch.manual_seed(0)
    cached = ReverseDistillation(backbone="resnet18", weights="none")  # cache_teacher=True is the default
    plain = copy.deepcopy(cached)
    plain.enable_feature_cache(False, 0)
    g = torch.Generator().manual_seed(1)
    batches = [
        Batch(
            image=torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8),
            label=torch.zeros(2, dtype=torch.long),
            mask=torch.zeros(2, 1, 32, 32),
            path=[f"{i}a", f"{i}b"],
        )
        for i in range(2)
    ]
    calls = {"n": 0}
    cached.encoder.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    losses_cached = _train(cached, batches, epochs=3)
    losses_plain = _train(plain, batches, epochs=3)
    assert calls["n"] == 2  # the encoder ran in epoch 1 only
    assert losses_cached == losses_plain
    for (name, a), b in zip(cached.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    # the cache is emptied after fit and not part of the checkpoint
    assert not any("cache" in key for key in cached.state_dict())
    cached.on_fit_end()
    assert cached.feature_cache is not None and len(cached.feature_cache) == 0


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.numerics
def test_channels_last_inference_gives_the_same_maps(name: str) -> None:
    torch.manual_seed(0)
    options = {"backbone": "resnet18", "weights": "none", **({"k": 2} if name == "adps" else {})}
    model = METHODS[name](**options).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    with torch.inference_mode():
        reference = model(images)
        model.optimize_for_inference(channels_last=True)
        fast = model(images)
    assert model.inference_channels_last
    torch.testing.assert_close(fast.anomaly_map, reference.anomaly_map, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.score, reference.score, rtol=1e-4, atol=1e-5)


def test_compile_switch_compiles_the_networks_only(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[type] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self)))
    model = ReverseDistillation(backbone="resnet18", weights="none")
    callback = InferenceOptimization(channels_last=False, compile=True)
    callback.on_test_start(None, model)  # type: ignore[arg-type]
    callback.on_predict_start(None, model)  # type: ignore[arg-type]  (applied once)
    names = {cls.__name__ for cls in compiled}
    assert len(compiled) == 3 and "AnomalyMetrics" not in names  # encoder, bottleneck, decoder
    assert not model.inference_channels_last
