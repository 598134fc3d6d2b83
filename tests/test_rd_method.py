"""RD on the shared base: construction, parameter counts, forward, frozen encoder, training step."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from kdad.data.batch import Batch
from kdad.losses import cosine_distillation_loss
from kdad.methods import AnomalyOutput, ReverseDistillation


def _batches(n: int, size: int, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return [
        Batch(
            image=images[i : i + 1],
            label=torch.zeros(1, dtype=torch.long),
            mask=torch.zeros(1, 1, size, size),
            path=[f"img{i}.png"],
        )
        for i in range(n)
    ]


def _collate(items: list[Batch]) -> Batch:
    return Batch(
        image=torch.cat([b.image for b in items]),
        label=torch.cat([b.label for b in items]),
        mask=torch.cat([b.mask for b in items]),  # type: ignore[list-item]
        path=[p for b in items for p in b.path],
    )


@pytest.mark.slow
def test_wide_resnet50_2_parameter_counts_match_the_spec() -> None:
    """rd_urd.md §2.2 / §8: 83,802,624 parameters receive gradients; the frozen encoder's used
    part is 24,862,528; the legacy conv4/bn4 bring the registered total to 92,195,328."""
    model = ReverseDistillation(backbone="wide_resnet50_2", weights="none")
    counts = model.parameter_counts()
    assert counts["trainable"] == 58_885_120 + 24_917_504 == 83_802_624
    assert counts["frozen"] == 24_862_528
    legacy = ReverseDistillation(backbone="wide_resnet50_2", weights="none", legacy_unused_conv4=True)
    assert legacy.parameter_counts()["trainable"] == 92_195_328


def test_plain_python_construction_and_forward() -> None:
    model = ReverseDistillation(backbone="resnet18", weights="none").eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
        out_float = model(images.float() / 255.0)
    assert isinstance(out, AnomalyOutput)
    assert out.anomaly_map.shape == (2, 1, 64, 64) and out.anomaly_map.dtype == torch.float32
    assert out.score.shape == (2,)
    torch.testing.assert_close(out.score, out.anomaly_map.amax(dim=(1, 2, 3)))
    torch.testing.assert_close(out.anomaly_map, out_float.anomaly_map)


def test_default_optimizer_is_the_papers_adam() -> None:
    model = ReverseDistillation(backbone="resnet18", weights="none")
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.005 and tuple(group["betas"]) == (0.5, 0.999) and group["weight_decay"] == 0
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in [*model.bottleneck.parameters(), *model.decoder.parameters()]}
    assert not any(id(p) in optimised for p in model.encoder.parameters())


def test_encoder_batchnorm_statistics_do_not_change_during_fit(tmp_path) -> None:
    """Lightning (< 2.2 at every epoch start; later versions restore saved modes) and user code
    call model.train(); the frozen encoder must stay in eval mode with unchanged BN statistics."""
    model = ReverseDistillation(backbone="resnet18", weights="none")
    model.train()
    assert not model.encoder.training and all(not m.training for m in model.encoder.modules())
    assert model.decoder.training
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    loader = DataLoader(_batches(4, 32), batch_size=2, collate_fn=_collate)
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(model, train_dataloaders=loader)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not model.encoder.training
    changed = [k for k, v in model.decoder.state_dict().items() if not torch.equal(v, decoder_before[k])]
    assert changed, "the decoder must have trained"


def test_training_step_loss_is_the_flat_cosine_of_encoder_and_decoder() -> None:
    torch.manual_seed(0)
    model = ReverseDistillation(backbone="resnet18", weights="none")
    model.train()
    batch = _collate(_batches(2, 64))
    torch.manual_seed(1)
    with torch.no_grad():
        x = model.normalize(batch.image)
        teacher = model.encoder(x)
        expected = cosine_distillation_loss(teacher, model.decoder(model.bottleneck(teacher)), "flat")
    model.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    got = model.training_step(batch, 0)
    # BN in train mode uses batch statistics; both passes see the same batch
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    got.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())


@pytest.mark.numerics
def test_maps_and_loss_stay_float32_under_bf16_autocast() -> None:
    model = ReverseDistillation(backbone="resnet18", weights="none").eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
    assert out.anomaly_map.dtype == torch.float32 and out.score.dtype == torch.float32
    # bf16 features: maps close to float32 ones, not equal
    assert torch.allclose(out.anomaly_map, reference.anomaly_map, atol=0.05 * float(reference.anomaly_map.max()))


def test_batchnorm_calibration_sets_the_cumulative_statistics() -> None:
    """The optional calibration pass: the first BN's running mean must equal the per-channel
    mean of conv1's output over all images (an independent computation)."""
    model = ReverseDistillation(backbone="resnet18", weights="none")
    batches = _batches(6, 32, seed=3)
    seen = model.calibrate_frozen_batchnorm(DataLoader(batches, batch_size=4, collate_fn=_collate))
    assert seen == 6
    assert not model.encoder.training
    x = model.normalize(torch.cat([b.image for b in batches]))
    conv1 = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    bn1 = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # momentum=None: a cumulative average that weights each batch equally (batches of 4 and 2)
    with torch.no_grad():
        m1 = conv1(x[:4]).mean(dim=(0, 2, 3))
        m2 = conv1(x[4:]).mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn1.running_mean, (m1 + m2) / 2, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(bn1.running_mean, torch.zeros_like(bn1.running_mean))
    assert bn1.momentum == 0.1, "momentum restored"
