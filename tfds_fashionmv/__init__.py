"""FashionMV for TensorFlow Datasets.

`import tfds_fashionmv` registers the `fashionmv` builder, with configs `products` and
`triplets`; then `tfds.data_source("fashionmv/products", data_dir=...)` reads a built
copy without TensorFlow.
"""

from tfds_fashionmv.fashionmv_dataset_builder import Builder, FashionMVConfig
from tfds_fashionmv.release import ReleaseError

__all__ = ["Builder", "FashionMVConfig", "ReleaseError"]
