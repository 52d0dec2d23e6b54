"""Train and calibrate the bundled digits models (CPU, seeded: about 10 minutes each for the image models).

Each is a real diffusers pipeline (see :mod:`meancache.models.recipes`) trained as a rectified-flow model on
scikit-learn's digits (the video model on them sliding across the frame): first its VAE (reconstruction plus a
tiny KL term), then its transformer on the VAE's normalised latents, ``z_sigma = (1 - sigma) x + sigma e`` with
target ``e - x`` (``dz/dsigma``, what the pipelines step with), logit-normal ``sigma`` and 10 % label dropout to
the "no class" embedding.

Reproduce the shipped weights and schedules:
``python -m meancache.models.train --model digits-flux`` (or ``digits-qwen``, ``digits-video``);
``--schedules-only`` recalibrates existing weights, ``--evaluate-only`` measures them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from meancache.models.digits import (
    CLASSES,
    DIGIT_SIZE,
    IMAGE_SIZE,
    NULL_CLASS,
    displacement,
    recognised,
)
from meancache.models.recipes import EMBEDDING_ROWS, RECIPES, DigitsRecipe

if TYPE_CHECKING:
    from meancache.models import DigitsModel

CALIBRATION_SEEDS = (100, 101, 102)  # disjoint from the seeds the demo and benchmarks evaluate (0, 1, 2)
EVALUATION_SEEDS = (0, 1, 2)
SHIPPED_BUDGETS = (8, 10, 13, 17, 25)
LOG_EVERY = 50
"""Training steps between two lines of progress (mean loss since the last one)."""


def _log(recipe: DigitsRecipe, part: str, step: int, steps: int, losses: list[float], start: float) -> None:
    if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
        window = losses[-LOG_EVERY:]
        print(f"{recipe.name}: {part} step {step + 1}/{steps}: loss {sum(window) / len(window):.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip


def _encode(recipe: DigitsRecipe, vae: torch.nn.Module, samples: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The VAE's latent means of ``samples``, encoded ``chunk`` at a time."""
    with torch.no_grad():
        return torch.cat([vae.encode(recipe.vae_input(x)).latent_dist.mode() for x in samples.split(chunk)])


def train_vae(recipe: DigitsRecipe, samples: torch.Tensor, steps: int) -> torch.nn.Module:
    """Reconstruction + a tiny KL term; then fits the latent statistics that whiten the latents."""
    vae = recipe.build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        x = recipe.vae_input(samples[torch.randint(0, len(samples), (recipe.vae_batch,))])
        posterior = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        _log(recipe, "VAE", step, steps, losses, start)
    recipe.fit_latent_statistics(vae, _encode(recipe, vae, samples))
    return vae.eval()


def packed_latents(recipe: DigitsRecipe, vae: torch.nn.Module, samples: torch.Tensor) -> torch.Tensor:
    """Samples -> the packed, normalised latents the pipeline denoises."""
    with torch.no_grad():
        return recipe.pack(vae, _encode(recipe, vae, samples))


def train_transformer(
    recipe: DigitsRecipe, latents: torch.Tensor, labels: torch.Tensor, steps: int
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
    losses, start, batch = [], time.perf_counter(), recipe.transformer_batch
    for step in range(steps):
        index = torch.randint(0, len(latents), (batch,))
        x, c = latents[index], labels[index].clone()
        c[torch.rand(batch) < 0.1] = NULL_CLASS
        sigma = torch.sigmoid(torch.randn(batch))  # logit-normal noise levels
        noise = torch.randn_like(x)
        s = sigma.view(-1, *(1,) * (x.ndim - 1))
        z = (1 - s) * x + s * noise
        v = recipe.velocity(transformer, z, sigma, {key: e[c] for key, e in embeddings.items()})
        loss = F.mse_loss(v, noise - x)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        _log(recipe, "transformer", step, steps, losses, start)
    return transformer.eval(), {key: e.detach() for key, e in embeddings.items()}


def build_bundle(recipe: DigitsRecipe, out: Path, vae_steps: int, transformer_steps: int, seed: int = 0) -> None:
    """Train both parts and write the pipeline folder (``from_pretrained``-loadable) with its class embeddings."""
    torch.manual_seed(seed)
    samples, labels = recipe.dataset()
    start = time.perf_counter()
    vae = train_vae(recipe, samples, vae_steps)
    print(f"{recipe.name}: VAE trained in {time.perf_counter() - start:.0f} s")
    transformer, embeddings = train_transformer(recipe, packed_latents(recipe, vae, samples), labels, transformer_steps)
    print(f"{recipe.name}: transformer trained in {time.perf_counter() - start:.0f} s")
    recipe.pipeline(vae, transformer).save_pretrained(out)
    save_file({k: v.contiguous() for k, v in embeddings.items()}, out / "class_embeddings.safetensors")


def calibration_calls(model: DigitsModel) -> list[dict]:
    """Pipeline calls generating digits 0-9 once per seed of ``CALIBRATION_SEEDS``, with fresh generators."""
    return [{**model.inputs(CLASSES), "generator": torch.Generator().manual_seed(s)} for s in CALIBRATION_SEEDS]


def calibrate_bundle(folder: Path, steps: int = 50) -> None:
    """Calibrate the bundle on digits 0-9 x ``CALIBRATION_SEEDS``, write ``meancache_calibration.json``, then
    select its shipped schedules (:func:`select_bundle_schedules`)."""
    from meancache.integrations.diffusers import calibrate_pipeline
    from meancache.models import load_digits_model

    model = load_digits_model(folder)
    model.pipe.set_progress_bar_config(disable=True)
    calibration = calibrate_pipeline(model.pipe, calibration_calls(model), steps)
    calibration.metadata |= {"model": model.recipe.name, "seeds": list(CALIBRATION_SEEDS), "classes": "0-9"}
    calibration.save(folder / "meancache_calibration.json")
    select_bundle_schedules(folder, steps)


def select_bundle_schedules(folder: Path, steps: int = 50) -> None:
    """Write, per budget of ``SHIPPED_BUDGETS``, the schedule ``MeanCacheConfig(budget=B)`` picks up: of the
    bundle's calibration's candidate PSSP schedules and the estimators of
    :data:`~meancache.method.estimators.SELECTABLE`, the pair whose replay on the full runs of the calibration calls
    drifts least (:func:`~meancache.calibration.select_by_replay`)."""
    from meancache.calibration import Calibration, select_by_replay
    from meancache.integrations.diffusers.selection import record_runs
    from meancache.models import load_digits_model

    model = load_digits_model(folder)
    model.pipe.set_progress_bar_config(disable=True)
    calibration = Calibration.load(folder / "meancache_calibration.json")
    runs = record_runs(model.pipe, calibration_calls(model), steps)
    (folder / "meancache_schedules").mkdir(exist_ok=True)
    for budget in SHIPPED_BUDGETS:
        schedule = select_by_replay(calibration.candidate_schedules(budget), runs)
        schedule.save(folder / "meancache_schedules" / f"schedule_B{budget}.json")
        print(
            f"{model.recipe.name}: B={budget}: {schedule.compute_steps}, spans {schedule.spans}, "
            f"estimator {schedule.metadata['estimator']}"
        )


def evaluate_bundle(folder: Path, steps: int = 50) -> dict[str, float]:
    """Generate digits 0-9 x ``EVALUATION_SEEDS`` with all ``steps`` steps and measure how often the classifier
    recognises the requested digit (``agreement``; a video model: in each frame, by :func:`recognised`) and,
    for a video model, how far the digit moves from the first to the last frame (:func:`displacement`; the
    training videos' digits move 16 pixels): the mean (``motion_px``) and the share of videos whose digit moves
    at least half that (``moving``)."""
    from meancache.models import load_digits_model

    model = load_digits_model(folder)
    model.pipe.set_progress_bar_config(disable=True)
    video = model.recipe.frames > 1
    agree, moves = [], []
    for seed in EVALUATION_SEEDS:
        with torch.inference_mode():
            latents = model.pipe(**model.inputs(CLASSES), num_inference_steps=steps, output_type="latent",
                                 generator=torch.Generator().manual_seed(seed), return_dict=False)[0]  # fmt: skip
            samples = torch.from_numpy(model.decode(latents))
        agree.append(recognised(samples, CLASSES).float().flatten())
        if video:
            moves.append(displacement(samples))
    result = {"agreement": float(torch.cat(agree).mean())}
    if video:
        travel = torch.cat(moves)
        result |= {
            "motion_px": float(travel.mean()),
            "moving": float((travel >= (IMAGE_SIZE - DIGIT_SIZE) / 2).float().mean()),
        }
    print(f"{model.recipe.name}: {steps} steps, digits 0-9 x seeds {list(EVALUATION_SEEDS)}: "
          + ", ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)  # fmt: skip
    return result


def main() -> None:
    from meancache.models import bundled_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(RECIPES), default="digits-flux")
    parser.add_argument("--out", type=Path, help="output folder (default: the bundled model's, in the package)")
    parser.add_argument("--vae-steps", type=int, help="VAE training steps (default: the recipe's)")
    parser.add_argument("--transformer-steps", type=int, help="transformer training steps (default: the recipe's)")
    parser.add_argument("--no-schedules", action="store_true", help="do not calibrate the schedules")
    parser.add_argument("--evaluate-only", action="store_true", help="only evaluate an existing bundle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedules-only", action="store_true", help="only recalibrate an existing bundle")
    args = parser.parse_args()
    recipe, out = RECIPES[args.model], args.out or bundled_model_path(args.model)
    if args.evaluate_only:
        evaluate_bundle(out)
        return
    if not args.schedules_only:
        vae_steps, transformer_steps = (
            args.vae_steps or recipe.vae_steps,
            args.transformer_steps or recipe.transformer_steps,
        )
        build_bundle(recipe, out, vae_steps, transformer_steps, args.seed)
        evaluate_bundle(out)
    if not args.no_schedules:
        calibrate_bundle(out)


if __name__ == "__main__":
    main()
