"""``kdad-export``: write a trained checkpoint as one ONNX or TorchScript graph (:mod:`kdad.export`).

kdad-export ckpt=outputs/train/runs/<run>/checkpoints/last.ckpt format=onnx
kdad-export ckpt=... format=torchscript output=models/rd_bottle.pt
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from kdad.checkpoint import load_model, recorded_image_size
from kdad.cli.common import report_user_errors, start_run
from kdad.config import config_dir, register_resolvers
from kdad.errors import check_choice
from kdad.export import EXPORT_FORMATS, SUFFIXES, Exported, export_model

log = logging.getLogger("kdad")

register_resolvers()


def export(cfg: DictConfig) -> Exported:
    """Export ``cfg.ckpt`` in ``cfg.format`` to ``cfg.output`` (default: the run folder)."""
    run_dir = start_run(cfg)
    fmt = str(cfg.format)
    check_choice("format", fmt, EXPORT_FORMATS)
    model, meta = load_model(cfg.ckpt, expected_method=cfg.get("expected_method"))
    size = cfg.get("image_size")
    image_size = recorded_image_size(
        meta, cfg.ckpt, OmegaConf.to_container(size) if OmegaConf.is_config(size) else size
    )
    path = Path(str(cfg.output)).expanduser() if cfg.get("output") else run_dir / f"model{SUFFIXES[fmt]}"
    exported = export_model(
        model,
        path,
        image_size,
        fmt,
        opset=int(cfg.get("opset", 18)),
        exporter=str(cfg.get("exporter", "tracing")),
        verify=bool(cfg.get("verify", True)),
        thresholds=meta.get("thresholds"),
        checkpoint=str(cfg.ckpt),
    )
    verification = exported.metadata["verification"]
    checked = (
        f"; matches PyTorch within {max(verification['max_abs_difference'].values()):.2g} "
        f"at batch sizes {verification['batch_sizes']}"
        if verification
        else ""
    )
    print(f"exported {exported.metadata['method']} ({fmt}, input {image_size[0]}x{image_size[1]}){checked}")
    print(f"model: {exported.path}")
    print(f"sidecar: {exported.sidecar}")
    return exported


@hydra.main(config_path=config_dir(), config_name="export", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
