"""Data layer: WIDER-style labels, the face Dataset, augmentation, image reading
(``images.read_image``: every common format to 8-bit RGB, a pixel limit checked
from the header), the embedded dataset generated offline from scikit-image's
bundled images, and folders of images without labels (``folder.image_files``)
with the batches drawn from them for finetuning by distillation alone
(``unlabelled.unlabelled_batches``).  Bad data raises ``DataError`` (a
ValueError) with one line naming the root, file and line."""

from facedet.data.collate import collate
from facedet.data.errors import DataError, NoUsableImagesError
from facedet.data.folder import image_files
from facedet.data.images import (
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV,
    ImageError,
    image_size,
    max_pixels_limit,
    read_image,
)
from facedet.data.synthetic import (
    default_data_root,
    ensure_embedded_dataset,
    generate_embedded_dataset,
    plan_layouts,
    save_sample_grid,
)
from facedet.data.transforms import (
    EvalTransform,
    Photometric,
    TrainTransform,
    horizontal_flip,
    random_square_crop,
)
from facedet.data.unlabelled import unlabelled_batches
from facedet.data.widerface import SPLITS, FaceDataset, Sample, read_image_list, read_label_file

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_PIXELS_ENV",
    "DataError",
    "EvalTransform",
    "FaceDataset",
    "ImageError",
    "NoUsableImagesError",
    "SPLITS",
    "Photometric",
    "Sample",
    "TrainTransform",
    "collate",
    "default_data_root",
    "ensure_embedded_dataset",
    "generate_embedded_dataset",
    "horizontal_flip",
    "image_files",
    "image_size",
    "max_pixels_limit",
    "plan_layouts",
    "random_square_crop",
    "read_image",
    "read_image_list",
    "read_label_file",
    "save_sample_grid",
    "unlabelled_batches",
]
