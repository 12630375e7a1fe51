"""Names shared by `make prepare-imagenet` (data_prep, which imports this package) and the trainer:

Kept free of heavy imports: the up-to-date check and the trainer's readiness check read it.

    (Path(dest) / COMPLETE_MARKER).is_file()   # the last file a successful preparation writes
"""

TRAIN_TAR = "ILSVRC2012_img_train.tar"  # the release files, as downloaded
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
COMPLETE_MARKER = "COMPLETE"  # written last, only on success
MANIFEST = "manifest.json"
