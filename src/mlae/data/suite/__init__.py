"""The embedded suite: small VTAB-like tasks generated on the fly, so that everything runs without a download.

Every task is 800 train / 200 val / >= 1000 test images of 32×32 RGB (bicubic-resized when another size is asked
for), class-balanced (equal counts per class, or as equal as the split size allows), deterministic in `seed`.
The three splits are drawn from independent random streams derived from (seed, task, split), so a test image is
never a training image. Renders are numpy, vectorised over pixels, anti-aliased by supersampling.

Each generator documents how its labels are defined; `SUITE_TASKS` repeats the definitions in one line.

    tasks     the registry (each task once: domain, label definition, class names, renderer), make_suite_task
    digits    scikit-learn's real handwritten digits, split per class
    sprites   dSprites-like: one sprite, labelled by its x position or rotation
    clevr     CLEVR-like scenes of solids, labelled by their number or the nearest one's depth
    norb      smallNORB-like box-built toys, labelled by the camera's azimuth or elevation
    textures  procedural texture families
    raycast   the ray caster behind clevr and norb; canvas: the pixel grid and helpers all renderers share
"""
from .canvas import SUITE_SIZE
from .tasks import SUITE_TASKS, check_suite_name, generate_split, make_suite_task, split_sizes, suite_class_names

__all__ = ["SUITE_TASKS", "SUITE_SIZE", "check_suite_name", "make_suite_task", "generate_split", "split_sizes", "suite_class_names"]
