"""Does a teacher predict the per-channel mean of the noise? (docs/notes/experiments.md, *The teacher*)

    python docs/world/experiments/noise_mean.py [TEACHER_DIR]

noises 128 training renders (``render_samples(training_combinations(), 128, 32, seed=3)``: the
first 128 of the build's teacher data, with their captions) to t = 100, 500, 800 and 950 and prints, per t, the correlation between the
per-channel spatial mean of the teacher's ε̂ and that of the true ε, and the rms error of that
mean next to its spread. A teacher that cannot predict the mean leaves an error that DDIM divides
by √ᾱ in its estimate of the clean image (13× at t = 950): a colour cast over the whole sample.
Default: the packaged teacher."""
import sys

import torch

from dreamportrait.world.assets import asset_dir
from dreamportrait.world.attributes import training_combinations
from dreamportrait.world.dataset import render_samples
from dreamportrait.world.teacher import Teacher


@torch.no_grad()
def main(directory) -> None:
    teacher = Teacher(directory)
    data = render_samples(training_combinations(), 128, teacher.unet.config.sample_size, seed=3)
    images, context = data.float_images(), teacher.encode(data.captions)
    generator = torch.Generator().manual_seed(0)
    for step in (100, 500, 800, 950):
        noise = torch.randn(images.shape, generator=generator)
        t = torch.full((len(images),), step)
        predicted = teacher.unet(teacher.scheduler.add_noise(images, noise, t), t, encoder_hidden_states=context).sample
        mean, predicted_mean = noise.mean((2, 3)).flatten(), predicted.mean((2, 3)).flatten()
        correlation = torch.corrcoef(torch.stack([mean, predicted_mean]))[0, 1]
        print(f"t = {step}: corr(mean ε, mean ε̂) {correlation:.2f}, rms error of the mean "
              f"{(predicted_mean - mean).square().mean().sqrt():.4f} (its spread {mean.std():.4f}), "
              f"√ᾱ {teacher.scheduler.alphas_cumprod[step].sqrt():.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else asset_dir("teacher"))
