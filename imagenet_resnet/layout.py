"""Names shared by `make prepare-imagenet` (data_prep, which imports this package) and the trainer:

Kept free of heavy imports: the up-to-date check and the trainer's readiness check read it.

    (Path(dest) / COMPLETE_MARKER).is_file()   # the last file a successful preparation writes
"""

TRAIN_TAR = "ILSVRC2012_img_train.tar"  # the release files, as downloaded
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
COMPLETE_MARKER = "COMPLETE"  # written last, only on success
MANIFEST = "manifest.json"
# The largest image any loader decodes: 8000 x 8000, about 200 MB as RGB. A file whose header
# claims more (a decompression bomb, or a scan no ResNet needs) is refused, never decoded.
MAX_IMAGE_PIXELS = 64_000_000
