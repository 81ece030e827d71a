"""Data layer: WIDER-style labels, the face Dataset, augmentation, and the
embedded dataset generated offline from scikit-image's bundled images."""

from featherface.data.collate import collate
from featherface.data.synthetic import (
    default_data_root,
    ensure_embedded_dataset,
    generate_embedded_dataset,
    plan_layouts,
    save_sample_grid,
)
from featherface.data.transforms import (
    EvalTransform,
    Photometric,
    TrainTransform,
    horizontal_flip,
    random_square_crop,
)
from featherface.data.widerface import FaceDataset, Sample, read_image_list, read_label_file

__all__ = [
    "EvalTransform",
    "FaceDataset",
    "Photometric",
    "Sample",
    "TrainTransform",
    "collate",
    "default_data_root",
    "ensure_embedded_dataset",
    "generate_embedded_dataset",
    "horizontal_flip",
    "plan_layouts",
    "random_square_crop",
    "read_image_list",
    "read_label_file",
    "save_sample_grid",
]
