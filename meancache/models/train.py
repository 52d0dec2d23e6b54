"""Train and calibrate the bundled digits models (CPU, seeded, about 10 minutes each).

Each is a real diffusers pipeline (see :mod:`meancache.models.recipes`) trained as a rectified-flow model on
scikit-learn's digits: first its VAE (reconstruction plus a tiny KL term), then its transformer on the
VAE's normalised latents, ``z_sigma = (1 - sigma) x + sigma e`` with target ``e - x`` (``dz/dsigma``, what
the pipelines step with), logit-normal ``sigma`` and 10 % label dropout to the "no class" embedding.

Reproduce the shipped weights and schedules:
``python -m meancache.models.train --model digits-flux`` (or ``digits-qwen``); ``--schedules-only``
recalibrates existing weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from meancache.models.digits import CLASSES, NULL_CLASS, digits_dataset
from meancache.models.recipes import EMBEDDING_ROWS, RECIPES, DigitsRecipe

if TYPE_CHECKING:
    from meancache.models import DigitsModel

CALIBRATION_SEEDS = (100, 101, 102)  # disjoint from the seeds the demo and benchmarks evaluate (0, 1, 2)
SHIPPED_BUDGETS = (8, 10, 13, 17, 25)


def train_vae(recipe: DigitsRecipe, images: torch.Tensor, steps: int, batch: int = 64) -> torch.nn.Module:
    """Reconstruction + a tiny KL term; then fits the latent statistics that whiten the latents."""
    vae = recipe.build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        x = recipe.vae_input(images[torch.randint(0, len(images), (batch,))])
        posterior = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        recipe.fit_latent_statistics(vae, vae.encode(recipe.vae_input(images)).latent_dist.mode())
    return vae.eval()


def packed_latents(recipe: DigitsRecipe, vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images -> the packed, normalised latents the pipeline denoises."""
    with torch.no_grad():
        return recipe.pack(vae, vae.encode(recipe.vae_input(images)).latent_dist.mode())


def train_transformer(
    recipe: DigitsRecipe, latents: torch.Tensor, labels: torch.Tensor, steps: int, batch: int = 96
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Rectified flow on ``latents``; returns the transformer and the learned class embeddings (one row per
    class, row 10 the "no class" embedding)."""
    transformer = recipe.build_transformer()
    embeddings = {
        key: torch.nn.Parameter(torch.randn(EMBEDDING_ROWS, *shape) * 0.5)
        for key, shape in recipe.embedding_shapes.items()
    }
    optimizer = torch.optim.AdamW([*transformer.parameters(), *embeddings.values()], lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    for _ in range(steps):
        index = torch.randint(0, len(latents), (batch,))
        x, c = latents[index], labels[index].clone()
        c[torch.rand(batch) < 0.1] = NULL_CLASS
        sigma = torch.sigmoid(torch.randn(batch))  # logit-normal noise levels
        noise = torch.randn_like(x)
        z = (1 - sigma[:, None, None]) * x + sigma[:, None, None] * noise
        v = recipe.velocity(transformer, z, sigma, {key: e[c] for key, e in embeddings.items()})
        loss = F.mse_loss(v, noise - x)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return transformer.eval(), {key: e.detach() for key, e in embeddings.items()}


def build_bundle(recipe: DigitsRecipe, out: Path, vae_steps: int, transformer_steps: int, seed: int = 0) -> None:
    """Train both parts and write the pipeline folder (``from_pretrained``-loadable) with its class embeddings."""
    torch.manual_seed(seed)
    images, labels = digits_dataset()
    start = time.perf_counter()
    vae = train_vae(recipe, images, vae_steps)
    print(f"{recipe.name}: VAE trained in {time.perf_counter() - start:.0f} s")
    transformer, embeddings = train_transformer(recipe, packed_latents(recipe, vae, images), labels, transformer_steps)
    print(f"{recipe.name}: transformer trained in {time.perf_counter() - start:.0f} s")
    recipe.pipeline(vae, transformer).save_pretrained(out)
    save_file({k: v.contiguous() for k, v in embeddings.items()}, out / "class_embeddings.safetensors")


def calibration_calls(model: DigitsModel) -> list[dict]:
    """Pipeline calls generating digits 0-9 once per seed of ``CALIBRATION_SEEDS``, with fresh generators."""
    return [{**model.inputs(CLASSES), "generator": torch.Generator().manual_seed(s)} for s in CALIBRATION_SEEDS]


def calibrate_bundle(folder: Path, steps: int = 50) -> None:
    """Calibrate the bundle on digits 0-9 x ``CALIBRATION_SEEDS`` and write ``meancache_calibration.json``
    and, per budget of ``SHIPPED_BUDGETS``, the schedule ``MeanCacheConfig(budget=B)`` picks up: of the
    calibration's candidate PSSP schedules, the one whose runs on the same seeds end closest to the full
    runs (:func:`~meancache.integrations.diffusers.select_schedule`)."""
    from meancache.integrations.diffusers import calibrate_pipeline, select_schedule
    from meancache.models import load_digits_model

    model = load_digits_model(folder)
    model.pipe.set_progress_bar_config(disable=True)
    calibration = calibrate_pipeline(model.pipe, calibration_calls(model), steps)
    calibration.metadata |= {"model": model.recipe.name, "seeds": list(CALIBRATION_SEEDS), "classes": "0-9"}
    calibration.save(folder / "meancache_calibration.json")
    (folder / "meancache_schedules").mkdir(exist_ok=True)
    for budget in SHIPPED_BUDGETS:
        schedule = select_schedule(model.pipe, calibration_calls(model), calibration.candidate_schedules(budget), steps)
        schedule.save(folder / "meancache_schedules" / f"schedule_B{budget}.json")
        print(f"{model.recipe.name}: B={budget}: {schedule.compute_steps}, spans {schedule.spans}")


def main() -> None:
    from meancache.models import bundled_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(RECIPES), default="digits-flux")
    parser.add_argument("--out", type=Path, help="output folder (default: the bundled model's, in the package)")
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--transformer-steps", type=int, default=2500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedules-only", action="store_true", help="only recalibrate an existing bundle")
    args = parser.parse_args()
    out = args.out or bundled_model_path(args.model)
    if not args.schedules_only:
        build_bundle(RECIPES[args.model], out, args.vae_steps, args.transformer_steps, args.seed)
    calibrate_bundle(out)


if __name__ == "__main__":
    main()
