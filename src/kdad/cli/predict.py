"""``kdad-predict``: score new images with a trained checkpoint (:mod:`kdad.predict`).

kdad-predict ckpt=outputs/train/runs/<run>/checkpoints/last.ckpt input=/data/new_images
kdad-predict ckpt=... input=photo.png threshold=0.42 device=cpu output_dir=predictions
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from kdad.cli.common import report_user_errors, start_run
from kdad.config import config_dir, register_resolvers
from kdad.predict import Predictor, resolve_inputs

log = logging.getLogger("kdad")

register_resolvers()


def _plain(value: Any) -> Any:
    """A Hydra list (``input=[a,b]``, ``overlay_range=[0,1]``) as a Python list; other values as they are."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Predict ``cfg.input`` with ``cfg.ckpt``; returns the content of predictions.json."""
    run_dir = start_run(cfg)
    output_dir = Path(str(cfg.output_dir)).expanduser() if cfg.get("output_dir") else run_dir
    inputs = resolve_inputs(_plain(cfg.input))  # input errors before the model is loaded
    predictor = Predictor.from_checkpoint(
        cfg.ckpt,
        image_size=_plain(cfg.get("image_size")),
        threshold=cfg.get("threshold"),
        pixel_threshold=cfg.get("pixel_threshold"),
        device=str(cfg.get("device", "auto")),
        batch_size=int(cfg.get("batch_size", 8)),
    )
    report = predictor.run(
        inputs,
        output_dir,
        overlays=bool(cfg.get("overlay", True)),
        overlay_alpha=float(cfg.get("overlay_alpha", 0.5)),
        overlay_range=_plain(cfg.get("overlay_range")),
        skip_unreadable=bool(cfg.get("skip_unreadable", False)),
        progress=bool(cfg.get("progress", True)),
    )
    thresholds = report["thresholds"]
    print(
        f"{report['num_anomalous']} of {report['num_images']} images anomalous "
        f"(score > {thresholds['image']:.6g}; {thresholds['image_source']})"
        + (f"; {len(report['skipped'])} unreadable skipped" if report["skipped"] else "")
    )
    print(f"predictions: {output_dir / 'predictions.csv'}")
    return report


@hydra.main(config_path=config_dir(), config_name="predict", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
